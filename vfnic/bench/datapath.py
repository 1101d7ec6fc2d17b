"""Section "datapath": packets through a VF.

Host side (no QEMU): the VF driver model (HostBus + VfDriver, "guest memory" a
memfd shared with the server) in worker processes against `vfnic serve`:
  vf0 -> vf1           through the NIC's internal switch
  vf0 -> uplink        out of the uplink TAP, over the lab's LAN bridge to the peer
  uplink -> vf0        the peer sends, the VF driver counts
Inside a TCG guest: the guest (booted with vfnic.ip: the VF is vfnic0, driven
by the kernel driver vfnic_vf.ko, or by the Python driver model bridging the VF
to a TAP) and the peer exchange UDP, and the peer pings the guest; the same
guest with QEMU's virtio-net on a TAP on the same LAN bridge, in the same run,
one after the other.

Frame sizes: UDP payload 18 B (60 B frames, 64 B on the wire with the FCS) and
1472 B (1514 B frames: full 1500 B IP packets).
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from vfnic.bench.common import (
    Section,
    Worker,
    log,
    serve,
    short_tmpdir,
    table,
    wait_console,
    worker_argv,
)
from vfnic.migrate.lab import VIRTIO_NETSETUP

PAYLOADS = (18, 1472)
CTL_PORT = 5009
# Guest kinds: the VF with the kernel driver, the VF with the Python driver model, virtio-net.
GUEST_KINDS = ("kvf", "vf", "virtio")
# The guest rows' directions: (result key, direction).
DIRECTIONS = (("tx", "guest → peer"), ("rx", "peer → guest"))
GUEST_NAMES = {"kvf": "vfnic VF (kernel driver vfnic_vf)",
               "vf": "vfnic VF (Python driver + TAP)", "virtio": "virtio-net (TAP)"}
_ids = itertools.count()


def frame_len(payload: int) -> int:
    return max(60, payload + 42)


def label(payload: int) -> str:
    return f"{frame_len(payload) + 4} B" if payload < 46 else f"{frame_len(payload)} B (1500 IP)"


def mbps(frames: float, payload: int) -> float:
    """Frame throughput in Mbit/s (Ethernet header + payload, no FCS/preamble)."""
    return frames * frame_len(payload) * 8 / 1e6


def _rate(count: int, span: float) -> float:
    return count / span if span > 0 and count > 1 else 0.0


# -- host side --------------------------------------------------------------------------


def send_then_count(rx_argv: list[str], tx_argv: Callable[[Worker], list[str]], dur: float,
                    settle: float = 0.5, tx_ready_timeout: float | None = 60.0
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the receiving worker, then the sender (its argv from the ready receiver),
    run the sender to its end, give frames in flight ``settle`` seconds, and return
    both results; both workers are ended whatever happens."""
    rx = Worker(rx_argv)
    try:
        tx = Worker(tx_argv(rx), ready_timeout=tx_ready_timeout)
        try:
            txr = tx.result(stop=False, timeout=dur + 60)
        finally:
            tx.kill()
        time.sleep(settle)
        return txr, rx.result()
    finally:
        rx.kill()


def host_pair(sock_tx: Path, sock_rx: Path, payload: int, dur: float) -> dict[str, Any]:
    """Driver on one VF sends to a driver on another VF of the same NIC."""
    txr, rxr = send_then_count(
        worker_argv("hostdrv-rx", "--sock", str(sock_rx)),
        lambda rx: worker_argv("hostdrv-tx", "--sock", str(sock_tx), "--dst-mac",
                               rx.ready["mac"], "--payload", str(payload), "--dur", str(dur)),
        dur, settle=0.3)
    return {"tx": txr, "rx": rxr}


def host_to_uplink(lab: Any, sock: Path, payload: int, dur: float) -> dict[str, Any]:
    from vfnic.migrate.lab import PEER_IP

    peer_mac = _mac_of(lab, "peer", f"{lab.ident}peer0")
    txr, rxr = send_then_count(
        worker_argv("udp-recv", "--bind", PEER_IP, "--port", "5001", netns=lab.ns("peer")),
        lambda _rx: worker_argv("hostdrv-tx", "--sock", str(sock), "--dst-mac", peer_mac,
                                "--dst-ip", PEER_IP, "--src-ip", "10.77.0.3", "--port",
                                "5001", "--payload", str(payload), "--dur", str(dur)),
        dur)
    return {"tx": txr, "rx": {"frames": rxr["count"], "bytes": rxr["bytes"],
                              "span": rxr["span"]}}


def uplink_to_host(lab: Any, sock: Path, payload: int, dur: float) -> dict[str, Any]:
    from vfnic.migrate.lab import sh

    def sender(rx: Worker) -> list[str]:  # the peer reaches the driver's MAC directly
        sh("ip", "-n", lab.ns("peer"), "neigh", "replace", "10.77.0.3", "lladdr",
           rx.ready["mac"], "dev", f"{lab.ident}peer0", "nud", "permanent")
        return worker_argv("udp-send", "--dst", "10.77.0.3", "--port", "5001", "--size",
                           str(payload), "--dur", str(dur), netns=lab.ns("peer"))

    txr, rxr = send_then_count(worker_argv("hostdrv-rx", "--sock", str(sock)), sender, dur,
                               tx_ready_timeout=None)
    return {"tx": {"sent": txr["sent"], "elapsed": txr["elapsed"], "dropped": txr["errors"]},
            "rx": rxr}


def _mac_of(lab: Any, ns: str, ifname: str) -> str:
    from vfnic.migrate.lab import sh

    out = sh("ip", "-n", lab.ns(ns), "-j", "link", "show", ifname).stdout
    return str(json.loads(out)[0]["address"])


def host_rows(results: dict[str, dict[str, Any]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for key, r in results.items():
        path, payload_s = key.rsplit(" ", 1)
        payload = int(payload_s)
        if "error" in r:
            rows.append([path, label(payload), "failed", r["error"], "", "", ""])
            continue
        tx, rx = r["tx"], r["rx"]
        sent_rate = tx["sent"] / tx["elapsed"] if tx["elapsed"] else 0.0
        got = _rate(rx["frames"], rx["span"])
        lost = tx["sent"] - rx["frames"]
        mpc = rx.get("device", {}).get("MPC")
        rows.append([path, label(payload), f"{sent_rate:,.0f}", f"{got:,.0f}",
                     f"{mbps(got, payload):,.1f}",
                     f"{lost:,} of {tx['sent']:,} ({100 * lost / max(tx['sent'], 1):.1f} %)",
                     "–" if mpc is None else f"{mpc:,}"])
    return rows


# -- inside the guest ---------------------------------------------------------------------

GUEST_SERVER = """
__NETSETUP__
echo "guest interfaces: $(ls /sys/class/net | tr '\\n' ' ')"
python3 -m vfnic.bench.guest_server --port __PORT__
"""

def guest_command(kind: str) -> str:
    net = VIRTIO_NETSETUP if kind == "virtio" else ""
    return GUEST_SERVER.replace("__PORT__", str(CTL_PORT)).replace("__NETSETUP__", net)


def virtio_args(tap: str, mac: str = "52:54:00:12:34:56") -> list[str]:
    return ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile="]


def guest_datapath(lab: Any, kind: str, nic_dir: Path | None, dur: float,
                   ping: int, before: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Boot one guest (a GUEST_KINDS kind) in host a, run ``before`` once it is up (its
    result in "before"), then the peer's side (which ends the guest's server)."""
    from vfnic.host.vm import VM, VfioUserFunction, guest_net_args
    from vfnic.migrate.lab import GUEST_IP, PEER_IP, sh

    sh("ip", "-n", lab.ns("peer"), "neigh", "flush", "all", check=False)
    if kind != "virtio":
        assert nic_dir is not None
        driver = "kernel" if kind == "kvf" else "python"
        vm = VM([VfioUserFunction(nic_dir / "vf0.sock", "vf0")], command=guest_command(kind),
                kernel_args=guest_net_args(f"{GUEST_IP}/24", driver), netns=lab.ns("a"))
    else:
        tap = f"{lab.ident}d{next(_ids)}"
        vm = VM([], command=guest_command(kind), extra_args=virtio_args(tap),
                netns=lab.ns("a"))
    try:
        t0 = time.monotonic()
        vm.start()
        if kind == "virtio":
            lab.plug_into_lan("a", tap)
        wait_console(vm, r"@@bench-server-ready", 240, "the guest's benchmark server")
        log(f"datapath: {kind} guest up after {time.monotonic() - t0:.1f} s")
        early = before() if before is not None else None
        w = Worker(worker_argv("peer-guest", "--guest", GUEST_IP, "--me", PEER_IP,
                               "--ctl", str(CTL_PORT), "--dur", str(dur), "--ping", str(ping),
                               "--sizes", ",".join(str(p) for p in PAYLOADS),
                               *(["--nic-dir", str(nic_dir)] if kind != "virtio" else []),
                               netns=lab.ns("peer")),
                   ready_timeout=None, show_stderr=True)
        try:
            res = w.result(stop=False, timeout=600)
        finally:
            w.kill()
        if before is not None:
            res["before"] = early
        console = vm.console_log.read_text(errors="replace")
        m = re.search(r"virtio-net interface: (\S+)", console)
        if m:
            res["ifname"] = m.group(1)
        return res
    finally:
        vm.stop()


def _lost_where(t: dict[str, Any], ifname: str, tx: bool) -> str:
    """The guest's own drop counters over one run (interface queue, UDP socket) and,
    for the VF, the device's statistics registers."""
    c = t["guest"].get("counters", {})
    dev = t.get("device")
    if tx:
        out = (f"guest: {ifname} tx_dropped {c.get(f'{ifname}.tx_dropped', 0):,}, "
               f"UDP SndbufErrors {c.get('udp.SndbufErrors', 0):,}")
        if dev:
            out += f"; VF sent (GPTC) {dev['GPTC']:,}, TXERRC {dev['TXERRC']:,}"
        return out
    out = (f"guest: {ifname} rx_dropped {c.get(f'{ifname}.rx_dropped', 0):,}, "
           f"UDP RcvbufErrors {c.get('udp.RcvbufErrors', 0):,}")
    if dev:
        out += f"; VF received (GPRC) {dev['GPRC']:,}, missed (MPC) {dev['MPC']:,}"
    return out


def received_rate(r: dict[str, Any], key: str, payload: int) -> float | None:
    """What the receiving side counted per second in row ``key`` ("tx": guest -> peer,
    "rx": peer -> guest) of one guest's results, None if the row did not run."""
    t = r.get(f"{key}{payload}")
    if not t:
        return None
    dst = "peer" if key == "tx" else "guest"
    return _rate(t[dst]["count"], t[dst]["span"])


def plot_guest_rates(path: Path, results: dict[str, list[dict[str, Any]]], title: str,
                     sec: Section) -> str | None:
    """Plot every guest kind's received packets/s and ping RTT (over its rounds) to
    ``path``; returns the section's image line, None (and a failure noted) if the
    plot could not be made."""
    from vfnic.bench.plot import rate_plot

    rows: list[str] = []
    received: dict[str, dict[str, list[float]]] = {k: {} for k in results}
    for key, direction in DIRECTIONS:
        for payload in PAYLOADS:
            row = f"{direction}\n{label(payload)}"
            rows.append(row)
            for kind, rounds in results.items():
                received[kind][row] = [v for v in (received_rate(r, key, payload)
                                                   for r in rounds) if v is not None]
    ping = {kind: [float(r["ping"]["avg"]) for r in rounds if "avg" in r.get("ping", {})]
            for kind, rounds in results.items()}
    nics = [(k, GUEST_NAMES[k]) for k in GUEST_KINDS if k in results]
    try:
        rate_plot(path, rows, nics, received, ping, title)
    except Exception as exc:  # reported in the section; the numbers stand without it
        sec.fail("plot", exc)
        return None
    log(f"{sec.key}: plot written to {path}")
    return f"![{title}](docs/bench/{path.name})"


def guest_rows(kind: str, r: dict[str, Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    name = GUEST_NAMES[kind]
    ifname = "vfnic0" if kind != "virtio" else str(r.get("ifname", "eth0"))
    # (result key, direction, sending side, receiving side)
    for key, direction, src, dst in (("tx", "guest → peer", "guest", "peer"),
                                     ("rx", "peer → guest", "peer", "guest")):
        for payload in PAYLOADS:
            t = r.get(f"{key}{payload}")
            if not t:
                continue
            sent = t[src]["sent"]
            offered = sent / t[src]["elapsed"]
            got = _rate(t[dst]["count"], t[dst]["span"])
            lost = sent - t[dst]["count"]
            rows.append([name, direction, label(payload), f"{offered:,.0f}",
                         f"{got:,.0f}", f"{mbps(got, payload):,.2f}",
                         f"{100 * lost / max(sent, 1):.1f} %",
                         _lost_where(t, ifname, key == "tx")])
    return rows


def _nic_irqs(counters: dict[str, int]) -> int:
    """The guest's interrupts of the NIC under test: the VF's queue vector, or
    virtio-net's input/output vectors (not virtio-blk's)."""
    return sum(v for k, v in counters.items() if k.startswith("irq.")
               and (k.startswith("irq.vfnic_vf-rxtx") or "-input." in k or "-output." in k))


def _per(n: float, frames: int) -> str:
    return f"{n / frames:.3f}"


def cost_rows(kind: str, r: dict[str, Any]) -> list[list[object]]:
    """Per frame the guest moved (VF: GPTC/GPRC; virtio-net: the interface's packets):
    what it cost on the bus and in the server, from the server's counters
    (`{"op": "counters"}`) and the guest's /proc/interrupts."""
    rows: list[list[object]] = []
    ifname = "vfnic0" if kind != "virtio" else str(r.get("ifname", "eth0"))
    for key, direction in DIRECTIONS:
        for payload in PAYLOADS:
            t = r.get(f"{key}{payload}")
            if not t:
                continue
            c = t["guest"].get("counters", {})
            dev, srv = t.get("device"), t.get("server")
            frames = (dev["GPTC" if key == "tx" else "GPRC"] if dev else
                      c.get(f"{ifname}.{key}_packets", 0))
            if not frames:
                continue

            per = partial(_per, frames=frames)
            irqs = per(_nic_irqs(c))
            if srv is None:
                rows.append([GUEST_NAMES[kind], direction, label(payload), f"{frames:,}",
                             "–", "–", "–", "–", irqs, "–"])
                continue
            msgs = sum(v for k, v in srv.items() if k.startswith("message."))
            bell = srv.get("write.TDT0" if key == "tx" else "write.RDT0", 0)
            batches = srv.get(f"{key}_batches", 0)
            signals = sum(v for k, v in srv.items() if k.startswith("signal."))
            rows.append([GUEST_NAMES[kind], direction, label(payload), f"{frames:,}",
                         per(msgs), per(bell),
                         f"{srv.get(f'{key}_frames', 0) / max(batches, 1):.1f}",
                         per(signals), irqs, f"{srv.get('server_cpu_us', 0) / frames:.1f}"])
    return rows


# -- the section --------------------------------------------------------------------------


def run(quick: bool = False, plot_path: Path | None = None) -> Section:
    from vfnic.migrate.lab import Lab, require_root

    sec = Section("datapath", "Datapath")
    dur = 2.0 if quick else 5.0
    host: dict[str, dict[str, Any]] = {}
    guest: dict[str, dict[str, Any]] = {}
    with short_tmpdir("vfb-") as tmp:
        # vf0 -> vf1 needs no lab: one NIC, no uplink, unix sockets only.
        with serve(tmp / "nic", vfs=2) as nic:
            for payload in PAYLOADS:
                log(f"datapath: host driver vf0 -> vf1, {label(payload)}, {dur:g} s")
                key = f"vf0 → vf1 (internal switch) {payload}"
                r = sec.attempt(key, partial(host_pair, nic / "vf0.sock", nic / "vf1.sock",
                                             payload, dur))
                host[key] = r if r is not None else {"error": sec.failures[-1]}
        try:
            require_root()
            lab = Lab(tmp / "lab")
            (tmp / "lab").mkdir()
            lab.up()
        except Exception as exc:  # reported, the rest goes on
            sec.fail("lab (network namespaces)", exc)
            lab = None
        if lab is not None:
            try:
                nic_a = lab.start_nic("a", vfs=2, nic_id=1)
                for payload in PAYLOADS:
                    log(f"datapath: host driver vf0 -> uplink -> peer, {label(payload)}")
                    key = f"vf0 → uplink TAP → bridge → peer UDP socket {payload}"
                    r = sec.attempt(key, partial(host_to_uplink, lab, nic_a / "vf0.sock",
                                                 payload, dur))
                    host[key] = r if r is not None else {"error": sec.failures[-1]}
                for payload in PAYLOADS:
                    log(f"datapath: peer -> uplink -> host driver vf1, {label(payload)}")
                    key = f"peer UDP socket → bridge → uplink TAP → vf1 {payload}"
                    r = sec.attempt(key, partial(uplink_to_host, lab, nic_a / "vf1.sock",
                                                 payload, dur))
                    host[key] = r if r is not None else {"error": sec.failures[-1]}
                for kind in GUEST_KINDS:
                    log(f"datapath: TCG guest on {kind}: ping, UDP both ways, {dur:g} s each")
                    g = sec.attempt(f"guest datapath ({kind})", partial(
                        guest_datapath, lab, kind, nic_a, dur, 30 if quick else 100))
                    if g is not None:
                        guest[kind] = g
            finally:
                lab.down()
    sec.data["host"] = host
    sec.data["guest"] = guest

    sec.add(f"Host-side VF driver model (`HostBus` + `VfDriver`, one process per driver, "
            f"`tx_batch` of 32 frames per TDT doorbell) against `vfnic serve` (one Python "
            f"process: every frame crosses it). {dur:g} s per row; the sender sends as fast as "
            f"it can. *Received/s* is counted by the receiver between its first and last "
            f"frame; *lost* are frames the sender's driver queued that never arrived (for "
            f"the peer's socket sender: datagrams it sent).")
    sec.add(table(["path", "frame", "sent/s", "received/s", "Mbit/s (frames)", "lost",
                   "receiver MPC"], host_rows(host)))
    if guest:
        rows: list[list[object]] = []
        for kind in GUEST_KINDS:
            if kind in guest:
                rows += guest_rows(kind, guest[kind])
        sec.add(f"Inside a TCG guest (1 vCPU, 512 MiB) on host a of the lab, to and from the "
                f"peer namespace through the LAN bridge: python3 UDP sender/receiver in the "
                f"guest, the same in the peer, {dur:g} s per row, unthrottled. Both guests in "
                f"the same run, one after the other. *offered/s*: datagrams the sender's "
                f"socket accepted; *received/s*: counted by the receiver between its first "
                f"and last datagram. *Drop counters* over each row: the guest's own "
                f"(interface queue, UDP socket) and, for the VF, its statistics registers "
                f"(frames the VF moved; MPC: frames it dropped because no RX descriptor was "
                f"free, i.e. the guest driver did not refill its ring fast enough, or the "
                f"queue was stopped).")
        sec.add(table(["guest NIC", "direction", "frame", "offered/s", "received/s",
                       "Mbit/s (frames)", "lost", "drop counters"], rows))
        prow: list[list[object]] = []
        for kind in GUEST_KINDS:
            p = guest.get(kind, {}).get("ping", {})
            if "avg" in p:
                prow.append([GUEST_NAMES[kind],
                             f"{p['min']:.3f}", f"{p['avg']:.3f}", f"{p['max']:.3f}",
                             f"{p['mdev']:.3f}", f"{p.get('received', '?')}/{p.get('sent', '?')}"])
        crow: list[list[object]] = []
        for kind in GUEST_KINDS:
            if kind in guest:
                crow += cost_rows(kind, guest[kind])
        if crow:
            sec.add("What each frame cost, over the same rows (per frame the VF moved, GPTC "
                    "or GPRC; for virtio-net the interface's packets): vfio-user messages "
                    "from QEMU to `vfnic serve` (posted register writes and reads), doorbells "
                    "(TDT writes for TX, RDT for RX), frames per batch the server moved (one "
                    "transmit or one RX delivery), MSI-X signals the server sent, interrupts "
                    "of the NIC in the guest (/proc/interrupts), and the server process's "
                    "CPU time (all its threads, user + system, including the TAP syscalls) "
                    "per frame. From the server's `{\"op\": \"counters\"}` on control.sock.")
            sec.add(table(["guest NIC", "direction", "frame", "frames", "messages/frame",
                           "doorbells/frame", "frames/batch", "MSI-X/frame",
                           "guest irqs/frame", "server CPU µs/frame"], crow))
        if prow:
            sec.add("Ping RTT, peer → guest, before the UDP runs (`ping -i 0.05`), ms:")
            sec.add(table(["guest NIC", "min", "avg", "max", "mdev", "replies"], prow))
        if "virtio" in guest and "ifname" in guest["virtio"]:
            sec.add(f"(The virtio-net guest's interface is `{guest['virtio']['ifname']}`.)")
        if plot_path is not None:
            image = plot_guest_rates(plot_path, {k: [v] for k, v in guest.items()},
                                     "A TCG guest's UDP packets/s: vfnic VF vs virtio-net "
                                     "(one run)", sec)
            if image:
                sec.add(image)
    return sec


if __name__ == "__main__":  # pragma: no cover - manual use
    print("\n\n".join(run(quick="--quick" in sys.argv).parts))
