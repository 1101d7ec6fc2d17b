"""Section "migration": live migration of one guest between the lab's two hosts.

Configurations (the same guest image, 512 MiB, 1 vCPU, idle but for what its
NIC needs; every one repeated):
  VF transparent                the VF in QEMU's stream through dbus-vmstate, DMA
                                dirty log, NIC announce
  VF cooperative                the same, driver suspend/resume + GARP
  virtio-net                    QEMU's own device and announce
  no NIC                        VM downtime baseline
Every migration is `vfnic migrate`'s (vfnic.migrate.orchestrator; without a NIC
folder for the baselines). One guest per kind (VF, virtio-net, none) is booted
and each is migrated back and forth (a -> b -> a ...); every round migrates every
configuration once, in an order rotated round by round, so that all of them share
the machine's moments. The lab's Pinger pings the guest from the peer every
10 ms; network downtime is the longest gap between two replies (minus the interval).

Also measured here, beside the migrations: the PF agent's own cost of a
SUSPEND/RESUME message (in process) and the mailbox round trip to a host-side
driver polling as fast as it can.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vfnic.bench.common import (
    ForeignCpu,
    Section,
    Worker,
    log,
    met,
    rotated_rounds,
    serve,
    short_tmpdir,
    stat_text,
    table,
    wait_console,
    worker_argv,
)
from vfnic.host.vm import DEFAULT_GUEST_DRIVER

PING_INTERVAL = 0.01
DRIVER_NAMES = {"kernel": "the kernel driver vfnic_vf", "python": "the Python driver model"}
_ports = itertools.count(4700)
_taps = itertools.count()


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    guest: str  # "vf", "virtio" or "none"
    mode: str | None = None  # the VF's migration mode (None: no VF)
    downtime_limit_ms: int = 300  # QEMU's default


# With QEMU's default downtime-limit (300 ms) the final RAM pass takes whatever RAM was
# left when QEMU switched over (up to 300 ms of it at max-bandwidth): its cost depends
# on where in RAM each guest's data lies, which differs between the guests. The pair
# at 30 ms leaves QEMU at most 30 ms of RAM for the pause, so that the devices weigh.
LOW_LIMIT_MS = 30
CONFIGS = (
    Config("vf-transparent", "VF transparent", "vf", "transparent"),
    Config("vf-cooperative", "VF cooperative", "vf", "cooperative"),
    Config("virtio", "virtio-net (QEMU)", "virtio"),
    Config("none", "no NIC", "none"),
    Config("vf-transparent-dl30", f"VF transparent, downtime-limit {LOW_LIMIT_MS} ms", "vf",
           "transparent", LOW_LIMIT_MS),
    Config("virtio-dl30", f"virtio-net (QEMU), downtime-limit {LOW_LIMIT_MS} ms", "virtio",
           None, LOW_LIMIT_MS),
)


@dataclass
class Run:
    config: str
    index: int
    direction: str = ""
    ok: bool = False
    error: str | None = None
    total_ms: float | None = None
    vm_downtime_ms: float | None = None
    pause_ms: float | None = None  # source stopped -> destination running
    net_downtime_ms: float | None = None
    recovered: bool | None = None
    window_s: float | None = None
    ping: tuple[int, int] | None = None  # (sent, replies) over the whole window
    summary: dict[str, Any] = field(default_factory=dict)


# -- one guest, migrated back and forth ------------------------------------------------------


def log_console(vm: Any, lines: int = 25) -> None:
    """The end of a guest's console (for a VF guest: its driver's log), into the log."""
    try:
        text = vm.console_log.read_text(errors="replace")
    except (AttributeError, OSError):
        return
    for line in text.splitlines()[-lines:]:
        log(f"  console| {line}")


# -- QEMU's own account of its pause (trace events, log backend) -----------------------------

TRACE_EVENTS = ("migration_completion_vm_stop", "ram_save_complete", "vmstate_save",
                "vmstate_load", "dbus_vmstate_pre_save", "dbus_vmstate_saving",
                "dbus_vmstate_post_load", "dbus_vmstate_loading",
                "migration_return_path_end_before", "source_return_path_thread_shut",
                "savevm_state_cleanup", "process_incoming_migration_co_end")


def driver_recoveries(console: str) -> int:
    """How often the kernel driver restored a lost MSI-X/config itself (its fallback),
    from its log on a guest console (kmod/main.c vfnic_check_function)."""
    return len(re.findall(r"(?:MSI-X|PCI config) restored in", console))


def trace_args(path: Path) -> list[str]:
    """QEMU options that log the migration's steps to ``path``, timestamped (UTC, us)."""
    args = ["-D", str(path), "-msg", "timestamp=on"]
    for event in TRACE_EVENTS:
        args += ["-trace", f"enable={event}"]
    return args


def _trace(path: Path) -> list[tuple[float, str, str]]:
    """(time, event, arguments) of each trace line QEMU wrote."""
    import datetime

    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 2 or not parts[0].endswith("Z"):
            continue
        try:
            t = datetime.datetime.fromisoformat(parts[0][:-1] + "+00:00").timestamp()
        except ValueError:
            continue
        out.append((t, parts[1], parts[2] if len(parts) > 2 else ""))
    return out


def pause_steps(src_log: Path, dst_log: Path) -> dict[str, float]:
    """The steps of QEMU's pause of one migration, in ms, from both QEMUs' traces:
    the final RAM pass (and its pages), the device states (the VF's dbus-vmstate Save
    among them: QEMU finding the helpers, then Save), the wait for the destination to
    load the rest (the VF's Load among it) and the whole stop -> cleanup."""
    src, dst = _trace(src_log), _trace(dst_log)
    stops = [i for i, (_, ev, _) in enumerate(src) if ev == "migration_completion_vm_stop"]
    if not stops:
        return {}
    src = src[stops[-1]:]  # this QEMU's last outgoing migration

    def first(events: list[tuple[float, str, str]], name: str, after: float = 0.0,
              arg: str = "") -> float | None:
        return next((t for t, ev, a in events if ev == name and t >= after and arg in a), None)

    out: dict[str, float] = {}
    t_stop = src[0][0]
    ram = [(t, a) for t, ev, a in src if ev == "ram_save_complete"]
    ram_end = first(src, "ram_save_complete", arg="done=1")
    if ram and ram_end is not None:
        out["ram_ms"] = (ram_end - ram[0][0]) * 1000
        digits = "".join(c for c in ram[0][1].split("dirty=")[-1].split(",")[0] if c.isdigit())
        out["ram_pages"] = float(digits or 0)
    sent = first(src, "migration_return_path_end_before")
    if ram_end is not None and sent is not None:
        out["devices_ms"] = (sent - ram_end) * 1000
    def helper_step(events: list[tuple[float, str, str]], start: str, call: str, next_: str,
                    find_key: str, call_key: str) -> None:
        """dbus-vmstate's step: QEMU finding the helpers (start -> call), then the
        call itself (until the next device's vmstate)."""
        t0, t1 = first(events, start), first(events, call)
        if t0 is not None and t1 is not None:
            out[find_key] = (t1 - t0) * 1000
            t2 = first(events, next_, after=t1)
            if t2 is not None:
                out[call_key] = (t2 - t1) * 1000

    helper_step(src, "dbus_vmstate_pre_save", "dbus_vmstate_saving", "vmstate_save",
                "vf_find_src_ms", "vf_save_ms")
    shut = first(src, "source_return_path_thread_shut")
    if sent is not None and shut is not None:
        out["dest_wait_ms"] = (shut - sent) * 1000
    helper_step(dst, "dbus_vmstate_post_load", "dbus_vmstate_loading", "vmstate_load",
                "vf_find_dst_ms", "vf_load_ms")
    cleanup = first(src, "savevm_state_cleanup")
    if cleanup is not None:
        out["stop_to_end_ms"] = (cleanup - t_stop) * 1000
    return out


class PingPong:
    """A guest of one kind living on host a or b of the lab, moved by each run."""

    def __init__(self, lab: Any, kind: str, nic_dirs: dict[str, Path]) -> None:
        self.lab = lab
        self.kind = kind
        self.nic_dirs = nic_dirs
        self.token = f"bench{kind}"
        self.vm: Any = None
        self.side = "a"
        self.boots = 0
        self.params: dict[str, Any] = {}  # QEMU's migration parameters at boot
        from vfnic.migrate.lab import GUEST_IP, VIRTIO_GUEST_IP

        # The guests run side by side on the LAN: each its own address.
        self.ip = VIRTIO_GUEST_IP if kind == "virtio" else GUEST_IP

    def _command(self) -> str:
        from vfnic.migrate.lab import virtio_netsetup

        net = virtio_netsetup(self.ip) if self.kind == "virtio" else ""
        # The VF guest shows its driver's log on the console (kept in the bench log when
        # a run fails).
        tail = "exec tail -F /run/vfnic-driver.log" if self.kind == "vf" else "exec sleep 1000000"
        return f"{net}\necho @@bench-guest-up\n{tail}\n"

    def _vm(self, side: str, incoming: str | None) -> tuple[Any, str | None]:
        from vfnic.bench.datapath import virtio_args
        from vfnic.host.vm import VM, VfioUserFunction, guest_net_args

        functions = []
        kernel_args: list[str] = []
        extra: list[str] = []
        tap = None
        if self.kind == "vf":
            functions = [VfioUserFunction(self.nic_dirs[side] / "vf0.sock", "vf0")]
            kernel_args = guest_net_args(f"{self.ip}/24")  # the default driver
        elif self.kind == "virtio":
            tap = f"{self.lab.ident}m{next(_taps)}"
            extra += virtio_args(tap)
        if incoming:
            extra += ["-S", "-incoming", incoming]
        vm = VM(functions, command=self._command(), kernel_args=kernel_args, extra_args=extra,
                token=self.token, netns=self.lab.ns(side))
        vm.extra_args += trace_args(vm.run_dir / "trace.log")
        return vm, tap

    def boot(self) -> None:

        self.close()
        self.side = "a"
        t0 = time.monotonic()
        vm, tap = self._vm("a", None)
        self.vm = vm
        vm.start()
        if tap:
            self.lab.plug_into_lan("a", tap)
        wait_console(vm, r"@@bench-guest-up", 240, f"the {self.kind} guest")
        with contextlib.suppress(Exception):
            params = vm.qmp("query-migrate-parameters")
            if isinstance(params, dict):
                self.params = params
        if self.kind != "none" and not self.wait_reachable(120):
            raise RuntimeError(f"the {self.kind} guest is not reachable from the peer")
        self.boots += 1
        log(f"migration: {self.kind} guest up after {time.monotonic() - t0:.1f} s")

    def wait_reachable(self, timeout: float) -> bool:
        from vfnic.migrate.lab import sh

        deadline = time.monotonic() + timeout
        flushed = False
        start = time.monotonic()
        while time.monotonic() < deadline:
            if self.lab.reachable(self.ip):
                return True
            if not flushed and time.monotonic() - start > 2:
                # If no announce of the guest's move reached the LAN bridge, it still sends
                # the guest's MAC to the old host's port: forget what it learned (flood
                # until relearned).
                sh("ip", "-n", self.lab.ns("fab"), "link", "set", "dev", "lan", "type",
                   "bridge", "fdb_flush", check=False)
                sh("ip", "-n", self.lab.ns("peer"), "neigh", "flush", "all", check=False)
                flushed = True
            if not self.vm.running():
                return False
        return False

    def migrate(self, cfg: Config, index: int, window: float) -> Run:
        from vfnic.migrate.lab import Pinger
        from vfnic.migrate.orchestrator import Host, Options, migrate

        run = Run(cfg.key, index)
        if self.vm is None or not self.vm.running():
            self.boot()
        elif self.kind != "none" and not self.wait_reachable(30):
            log(f"migration: {self.kind} guest unreachable before the run, rebooting it")
            self.boot()
        src, dst_side = self.side, ("b" if self.side == "a" else "a")
        run.direction = f"{src}→{dst_side}"
        port = next(_ports)
        uri = f"tcp:{self.lab.host_ip(dst_side)}:{port}"
        dst, tap = self._vm(dst_side, uri)
        pinger: Pinger | None = None
        watch: Worker | None = None
        try:
            dst.start()
            if tap:
                self.lab.plug_into_lan(dst_side, tap)
            if self.kind != "none":
                watch = Worker(worker_argv("l2-watch", "--iface", f"{self.lab.ident}peer0",
                                           "--ip", self.ip, netns=self.lab.ns("peer")))
                pinger = Pinger(self.lab, self.ip, PING_INTERVAL)
                pinger.start()
                time.sleep(1.5)
                if not pinger.replies():
                    raise RuntimeError("no ping replies before the migration")
            t_start = time.time()
            vf = self.kind == "vf"
            summary = migrate(
                Host(str(self.vm.qmp_socket), str(self.nic_dirs[src]) if vf else None, 0),
                Host(str(dst.qmp_socket), str(self.nic_dirs[dst_side]) if vf else None, 0),
                Options(uri, mode=cfg.mode, quit_source=True,
                        downtime_limit_ms=cfg.downtime_limit_ms),
                progress=lambda line: log(f"  migrate: {line}"))
            run.summary = asdict(summary)
            if summary.status != "completed":
                raise RuntimeError(f"migration {summary.status}: {summary.error}")
            run.total_ms = summary.total_ms
            run.vm_downtime_ms = summary.vm_downtime_ms
            # Guest pause: source stopped (STOP event) -> destination running (RESUME
            # event), both by QEMU's clock, for every configuration alike.
            tl = summary.timeline_ms
            running = tl.get("destination-resumed", tl.get("destination-running"))
            if "source-stopped" in tl and running is not None:
                run.pause_ms = running - tl["source-stopped"]
            t_end = time.time()
            if pinger is not None:
                deadline = t_end + window
                recovered_at = None
                while time.time() < deadline:
                    if recovered_at is None and pinger.replies_after(t_end):
                        recovered_at = time.time()
                    if recovered_at is not None and time.time() > recovered_at + 1.0:
                        break
                    time.sleep(0.05)
                pinger.stop()
                t_stop = time.time()
                if watch is not None:
                    seen = watch.result()
                    watch = None
                    run.summary["announces"] = seen["counts"]
                    run.summary["announces_after_ms"] = {
                        k: round((v - t_start) * 1000) for k, v in seen["first"].items()}
                run.ping = pinger.loss()
                run.window_s = window
                if not pinger.replies_after(t_end):
                    run.recovered = False
                    run.net_downtime_ms = None
                    last = max((t for t, _ in pinger.replies() if t <= t_end), default=t_start)
                    run.summary["silent_s"] = t_stop - last
                else:
                    run.recovered = True
                    run.net_downtime_ms = pinger.downtime_ms(after=t_start - 1.5)
                pinger = None
            run.summary["qemu_steps"] = pause_steps(self.vm.run_dir / "trace.log",
                                                    dst.run_dir / "trace.log")
            if vf:
                run.summary["driver_recoveries"] = driver_recoveries(
                    dst.console_log.read_text(errors="replace"))
            run.ok = True
            old = self.vm
            self.vm, self.side = dst, dst_side
            old.stop()
            return run
        except BaseException as exc:
            dst.stop()
            if not isinstance(exc, Exception):  # Ctrl-C: clean up on the way out
                raise
            run.error = f"{type(exc).__name__}: {exc}"
            log(f"migration: {cfg.key} run {index} FAILED: {run.error}")
            log_console(self.vm)
            if self.vm is not None and not self.vm.running():
                self.vm.stop()
                self.vm = None  # rebooted by the next run
            return run
        finally:
            if pinger is not None:
                pinger.stop()
            if watch is not None:
                watch.kill()

    def close(self) -> None:
        if self.vm is not None:
            self.vm.stop()
            self.vm = None


# -- device-side costs of SUSPEND / RESUME ------------------------------------------------


def pf_agent_cost(n: int = 2000) -> dict[str, float]:
    """µs the device model spends on a PF -> VF message: posting it (mailbox words,
    PFSTS, interrupt cause) and handling the VF's ACK doorbell. In process, no transport."""
    from vfnic.device.nic import Nic
    from vfnic.regs import mailbox as M
    from vfnic.regs import table as T

    nic = Nic(2)
    fn = nic.vfs[0]
    offs = {r.name: r.offset for r in T.VF_TABLE}
    out: dict[str, float] = {}
    for name, msg in (("suspend", M.MsgType.SUSPEND), ("resume", M.MsgType.RESUME)):
        post: list[float] = []
        ack: list[float] = []
        reply = (int(msg) | M.FLAG_ACK).to_bytes(4, "little")
        for _ in range(n):
            t0 = time.perf_counter_ns()
            with nic.lock:
                nic.pf_agent.post(fn, msg)
            t1 = time.perf_counter_ns()
            # what the VF driver writes: its reply word, then the ACK doorbell
            fn.region_write(0, offs[f"VFMBMEM{M.REQ_BASE}"], reply)
            fn.region_write(0, offs["VFMAILBOX"], T.MBX_PFSTS.to_bytes(4, "little"))
            t2 = time.perf_counter_ns()
            with nic.lock:  # as the server's session does for a guest write
                fn.region_write(0, offs["VFMBDOORBELL"], T.MBX_ACK.to_bytes(4, "little"))
            t3 = time.perf_counter_ns()
            post.append((t1 - t0) / 1000)
            ack.append((t3 - t2) / 1000)
            nic.pf_agent.pending.clear()
        out[f"{name}_post_us"] = statistics.median(post)
        out[f"{name}_ack_us"] = statistics.median(ack)
    return out


def mailbox_rtt(cycles: int) -> dict[str, list[float]]:
    """SUSPEND/RESUME through `vfnic serve`'s management socket to a host-side driver
    that polls VFMAILBOX as fast as it can (no TCG): the mailbox round trip floor."""
    from vfnic.device.nic import control_call

    out: dict[str, list[float]] = {"suspend_ms": [], "resume_ms": [], "suspend_us": [],
                                   "resume_us": []}
    timeouts: list[str] = []
    with short_tmpdir("vfb-") as tmp, serve(tmp / "nic", vfs=2) as nic:
        w = Worker(worker_argv("mbx-driver", "--sock", str(nic / "vf0.sock")))
        try:
            for _ in range(cycles):
                for state in ("suspend", "resume"):
                    try:
                        r = control_call(nic, {"op": "vf-state", "vf": 0, "state": state,
                                               "timeout": 2.0})
                    except Exception as exc:  # counted and reported, the cycles go on
                        timeouts.append(f"{state}: {exc}")
                        continue
                    out[f"{state}_ms"].append(float(r["mailbox_ms"]))
                    out[f"{state}_us"].append(float(r["driver_us"]))
            w.result()
        finally:
            w.kill()
    out["errors"] = timeouts  # type: ignore[assignment]
    return out


# -- the section --------------------------------------------------------------------------


def _vals(runs: list[Run], attr: str) -> list[float]:
    return [float(getattr(r, attr)) for r in runs if r.ok and getattr(r, attr) is not None]


def _sum_vals(runs: list[Run], key: str) -> list[float]:
    return [float(r.summary[key]) for r in runs if r.ok and r.summary.get(key) is not None]


def announce_text(runs: list[Run]) -> str:
    """Announcing frames the peer saw per run (median): gratuitous ARPs for the guest's
    address, RARPs, IPv6 neighbour advertisements."""
    seen = [r.summary["announces"] for r in runs if r.ok and "announces" in r.summary]
    if not seen:
        return "–"
    med = [statistics.median(float(a[k]) for a in seen) for k in ("garp", "rarp", "na")]
    return " / ".join(f"{m:g}" for m in med)


def net_text(runs: list[Run]) -> str:
    ok = [r for r in runs if r.ok]
    if not ok or all(r.recovered is None for r in ok):
        return "n/a (no NIC)"
    vals = [r.net_downtime_ms for r in ok if r.recovered and r.net_downtime_ms is not None]
    lost = [r for r in ok if r.recovered is False]
    if not lost:
        return stat_text(vals, "{:.0f}")
    window = max(r.window_s or 0 for r in lost)
    if not vals:
        return f"no recovery within {window:.0f} s (all {len(ok)} runs)"
    return (f"no recovery within {window:.0f} s in {len(lost)} of {len(ok)} runs; "
            f"the other {len(vals)}: {stat_text(vals, '{:.0f}')}")


def run(quick: bool = False, runs: int | None = None, plot_path: Path | None = None) -> Section:
    from vfnic.migrate.lab import Lab, require_root

    sec = Section("migration", "Live migration")
    nruns = runs or (2 if quick else 15)
    window = 5.0 if quick else 10.0
    results: dict[str, list[Run]] = {c.key: [] for c in CONFIGS}
    boots: dict[str, int] = {}
    group_load: dict[str, str] = {}
    params: dict[str, Any] = {}

    log("migration: PF agent cost per message (in process)")
    pf = sec.attempt("PF agent cost", pf_agent_cost)
    log("migration: mailbox round trip to a host-side driver")
    mbx = sec.attempt("mailbox round trip (host-side driver)",
                      lambda: mailbox_rtt(10 if quick else 30))

    with short_tmpdir("vfm-") as tmp:
        lab = None
        try:
            require_root()
            lab = Lab(tmp)
            lab.up()
            nic_dirs = {"a": lab.start_nic("a", 2, 1), "b": lab.start_nic("b", 2, 2)}
            # Every guest booted once, and every round migrates each configuration once,
            # in an order rotated every round: the configurations share the machine's
            # moments (noise, other load) and every one moves a -> b and b -> a.
            kinds = ("vf", "virtio", "none")
            pps = {kind: PingPong(lab, kind, nic_dirs) for kind in kinds}
            foreign = ForeignCpu()
            try:
                for i, cfg in rotated_rounds(CONFIGS, nruns):
                    log(f"migration: {cfg.label}, run {i + 1}/{nruns}")
                    try:
                        r = pps[cfg.guest].migrate(cfg, i, window)
                    except Exception as exc:  # e.g. the guest did not boot
                        r = Run(cfg.key, i, error=f"{type(exc).__name__}: {exc}")
                        log(f"migration: {cfg.key} run {i} FAILED: {r.error}")
                    results[cfg.key].append(r)
                    if r.ok:
                        log(f"migration: {cfg.key}: total {r.total_ms:.0f} ms, VM "
                            f"downtime {r.vm_downtime_ms} ms, network "
                            + (f"{r.net_downtime_ms:.0f} ms" if r.net_downtime_ms
                               is not None else ("n/a" if r.recovered is None
                                                 else "no recovery")))
            finally:
                group_load["all"] = foreign.text()
                for kind, pp in pps.items():
                    boots[kind] = pp.boots
                    params.update(pp.params)
                    pp.close()
        except Exception as exc:
            sec.fail("migration lab", exc)
        finally:
            if lab is not None:
                lab.down()

    sec.data["runs"] = {k: [asdict(r) for r in v] for k, v in results.items()}
    sec.data["pf_agent"] = pf
    sec.data["mailbox"] = mbx
    for key, rs in results.items():
        for r in rs:
            if not r.ok:
                sec.failures.append(f"{key} run {r.index + 1}: {r.error}")

    # -- main table --
    rows: list[list[object]] = []
    for c in CONFIGS:
        rs = results[c.key]
        ok = [r for r in rs if r.ok]
        rows.append([c.label, f"{len(ok)}/{len(rs)}", stat_text(_vals(rs, "total_ms"), "{:.0f}"),
                     stat_text(_vals(rs, "vm_downtime_ms"), "{:.0f}"),
                     stat_text(_vals(rs, "pause_ms"), "{:.0f}"), net_text(rs),
                     announce_text(rs),
                     stat_text([v / 2**20 for v in _sum_vals(rs, "ram_transferred")], "{:.0f}")])
    sec.add(f"One guest per kind (512 MiB, 1 vCPU, TCG), migrated back and forth between the "
            f"lab's hosts a and b over their migration network (veth + bridge); {nruns} runs "
            f"per configuration, all configurations interleaved (each round migrates every "
            f"one once, in an order rotated round by round; the three guests run side by "
            f"side). "
            f"Every migration by `vfnic migrate`'s orchestrator (the baselines without a "
            f"NIC folder). Median (min–max) over the runs that completed. *Migration "
            f"time*: the orchestrator's total, connecting to both QEMUs to the destination "
            f"running (VF: and resumed). *VM downtime*: "
            f"QEMU's `downtime` from `query-migrate`. *Guest pause*: source stopped (QMP "
            f"STOP event) → destination running (its RESUME event), both by QEMU's clock. "
            f"*Network downtime*: "
            f"the peer pings every {PING_INTERVAL * 1000:.0f} ms; the longest gap between two "
            f"replies minus the interval; watched for up to {window:.0f} s after the "
            f"migration returned. *GARP / RARP / NA*: frames announcing the guest's new "
            f"place that reached the peer during the run (median per run): gratuitous ARPs "
            f"for its address, RARPs (QEMU's and the NIC's announce), IPv6 unsolicited "
            f"neighbour advertisements.")
    sec.add(table(["configuration", "runs ok", "migration time ms", "VM downtime ms (QEMU)",
                   "guest pause ms", "network downtime ms",
                   "GARP / RARP / NA seen by the peer", "RAM sent MiB"], rows))
    if group_load:
        sec.add("Other load during these runs: " + "; ".join(group_load.values()) + ".")
    sec.add("![migration time, VM downtime and network downtime by configuration]"
            "(docs/bench/migration.png)")

    # -- where the VF's pause goes --
    sec.add(pause_breakdown(results, params))
    sec.add(qemu_steps_text(results))

    # -- VF details --
    drows: list[list[object]] = []
    for c in CONFIGS:
        if c.guest != "vf":
            continue
        rs = results[c.key]
        drows.append([c.label, stat_text(_sum_vals(rs, "save_ms"), "{:.2f}"),
                      stat_text(_sum_vals(rs, "load_ms"), "{:.2f}"),
                      stat_text(_sum_vals(rs, "device_state_bytes"), "{:,.0f}"),
                      stat_text(_sum_vals(rs, "device_pages"), "{:.0f}"),
                      stat_text(_sum_vals(rs, "device_dma_bytes"), "{:.0f}"),
                      stat_text([v / 1000 for v in _sum_vals(rs, "suspend_us")], "{:.1f}"),
                      stat_text(_sum_vals(rs, "suspend_ms"), "{:.1f}"),
                      stat_text([v / 1000 for v in _sum_vals(rs, "resume_us")], "{:.1f}"),
                      stat_text(_sum_vals(rs, "resume_ms"), "{:.1f}")])
    sec.add("VF state transfer and the guest driver's suspend/resume, from the "
            "orchestrator's `Summary` of the same runs (the NICs' VMState1 helpers). *Save*: "
            "STOP_COPY + the whole stream (snapshot and the extents of guest memory the VF "
            "wrote by DMA: *DMA pages* touched, *DMA bytes* carried), inside QEMU's "
            "pause; *Load*: RESUMING + stream checked + restored + STOP on the destination. "
            "*driver*: what the guest's VF driver reports for its own work (word 1 of its "
            "ACK); *mailbox*: the PF's round trip, management socket to ACK, under TCG. "
            f"The VF guest's driver: {DRIVER_NAMES[DEFAULT_GUEST_DRIVER]} (the guest's "
            f"default).")
    sec.add(table(["configuration", "Save ms", "Load ms", "device state bytes",
                   "DMA pages", "DMA bytes", "suspend: driver ms", "suspend: mailbox ms",
                   "resume: driver ms", "resume: mailbox ms"], drows))
    if mbx:
        sec.add("Mailbox round trip without TCG: a host-side driver (`HostBus` + `VfDriver`) "
                "that polls VFMAILBOX as fast as it can, SUSPEND/RESUME sent through "
                f"`vfnic serve`'s management socket, {len(mbx['suspend_ms'])} cycles:")
        if mbx.get("errors"):
            sec.failures += [f"mailbox round trip: {e}" for e in mbx["errors"]]
        sec.add(table(["message", "mailbox round trip ms", "driver's own work ms"], [
            ["SUSPEND", stat_text(mbx["suspend_ms"], "{:.2f}"),
             stat_text([v / 1000 for v in mbx["suspend_us"]], "{:.2f}")],
            ["RESUME", stat_text(mbx["resume_ms"], "{:.2f}"),
             stat_text([v / 1000 for v in mbx["resume_us"]], "{:.2f}")]]))

    # -- targets --
    sec.add(targets_text(results, pf))
    if text := notes(results):
        sec.add(text)
    sec.add(runs_detail(results))
    if plot_path is not None:
        from vfnic.bench.plot import migration_plot

        try:
            migration_plot(results, CONFIGS, plot_path, window)
            log(f"migration: plot written to {plot_path}")
        except Exception as exc:
            sec.fail("plot", exc)
    sec.data["boots"] = boots
    sec.data["group_load"] = group_load
    return sec


def notes(results: dict[str, list[Run]]) -> str:
    """What this run's numbers say beside the tables, each computed from them (how to
    read them is fixed text in BENCHMARKS.md, after this section)."""
    lines: list[str] = []
    base = _vals(results.get("none", []), "vm_downtime_ms")
    if len(base) >= 3 and min(base) > 0 and max(base) / min(base) > 3:
        lines.append(f"- The no-NIC baseline's VM downtime alone ranged from {min(base):.0f} "
                     f"to {max(base):.0f} ms over identical runs: compare medians with that "
                     f"spread in mind.")
    rs = [r for r in results.get("vf-cooperative", [])
          if r.ok and r.net_downtime_ms is not None]
    if len(rs) >= 3:
        med = statistics.median(r.net_downtime_ms or 0.0 for r in rs)
        slow = [r for r in rs if (r.net_downtime_ms or 0) > 2 * med]
        if slow:
            lines.append(f"- {len(slow)} of {len(rs)} cooperative runs had a network downtime "
                         f"over twice the median "
                         f"({', '.join(f'{r.net_downtime_ms:.0f}' for r in slow)} ms vs "
                         f"{med:.0f} ms).")
    coop = [r for r in results.get("vf-cooperative", []) if r.ok]
    if coop:
        lines.append(suspend_points([r.summary.get("source", {}) for r in coop]))
    return "\n".join(["Notes on this run:", "", *lines]) if lines else ""


def suspend_points(records: list[dict[str, Any]]) -> str:
    """Where the cooperative source told the driver to suspend (its records'
    suspend_point) and how many suspends QEMU's switchover overtook."""
    points = [p for p in (rec.get("suspend_point") for rec in records) if p]
    caught = [float(p["left_pct"]) for p in points if p.get("syncs", 0) < 2]
    over = sum(1 for rec in records if rec.get("suspend_overtaken"))
    text = (f"- Cooperative suspend point (1/32 = 3.12 % of RAM left): caught in pass 1 in "
            f"{len(caught)} of {len(records)} migrations")
    if caught:
        text += f", at {min(caught):.2f}-{max(caught):.2f} % left"
    return text + f"; {len(points) - len(caught)} after pass 1; {over} suspends overtaken " \
        "by QEMU's switchover."


STEPS = (("vf-suspended", "qemu-released", "VF driver suspended → QEMU let converge "
           "(cooperative: the rest of the first RAM pass)"),
         ("qemu-released", "source-stopped", "→ source stopped (cooperative)"),
         ("source-stopped", "source-completed", "source stopped → QEMU completed (final "
           "RAM pass, devices, the VF's Save inside)"),
         ("source-completed", "vf-restored", "→ destination NIC: VF loaded, its PCI config "
          "back in QEMU"),
         ("vf-restored", "destination-running", "→ destination running (`cont`)"),
         ("destination-running", "vf-resumed", "→ MAC announced (transparent) / driver "
          "resumed (cooperative)"))


def pause_breakdown(results: dict[str, list[Run]], params: dict[str, Any]) -> str:
    """Medians of the orchestrator's timeline steps, per VF configuration (ms)."""
    vf = [c for c in CONFIGS if c.guest == "vf"]
    rows: list[list[object]] = []
    for a, b, label in STEPS:
        row: list[object] = [label]
        for c in vf:
            vals = [r.summary["timeline_ms"][b] - r.summary["timeline_ms"][a]
                    for r in results.get(c.key, []) if r.ok
                    and a in r.summary.get("timeline_ms", {})
                    and b in r.summary.get("timeline_ms", {})]
            row.append(stat_text(vals, "{:.1f}"))
        rows.append(row)
    return ("Where the VF configurations' pause goes, from the orchestrator's timeline "
            "(ms, median and min–max over the runs; the stop is QEMU's STOP event). The "
            "VF's Save and Load run inside QEMU's own steps (their times: the table "
            "below); the final RAM pass is QEMU's and varies with how much RAM QEMU left "
            "for it (up to what it estimates it "
            f"can send within `downtime-limit`: QEMU's default "
            f"{params.get('downtime-limit', '?')} ms, or the {LOW_LIMIT_MS} ms of the "
            f"configurations so labelled; at `max-bandwidth` "
            f"{params.get('max-bandwidth', 0) / 2**20:.0f} MiB/s, which QEMU keeps in the "
            f"pause too)."
            "\n\n"
            + table(["step", *[c.label for c in vf]], rows))


def _steps(rs: list[Run], key: str) -> list[float]:
    return [float(r.summary["qemu_steps"][key]) for r in rs
            if r.ok and key in r.summary.get("qemu_steps", {})]


def _beyond_ram(rs: list[Run]) -> list[float]:
    """QEMU's pause without its final RAM pass: what the devices (and the machine) cost."""
    return [float(q["stop_to_end_ms"] - q["ram_ms"]) for r in rs if r.ok
            for q in [r.summary.get("qemu_steps", {})] if "stop_to_end_ms" in q and "ram_ms" in q]


def qemu_steps_text(results: dict[str, list[Run]]) -> str:
    """Medians of QEMU's own steps in its pause, per configuration (trace events)."""
    rows: list[list[object]] = []
    for c in CONFIGS:
        rs = results.get(c.key, [])
        vf = c.guest == "vf"
        rows.append([c.label, stat_text(_steps(rs, "stop_to_end_ms"), "{:.1f}"),
                     stat_text(_steps(rs, "ram_ms"), "{:.1f}"),
                     stat_text(_steps(rs, "ram_pages"), "{:.0f}"),
                     stat_text(_beyond_ram(rs), "{:.1f}"),
                     stat_text(_steps(rs, "devices_ms"), "{:.1f}"),
                     stat_text(_steps(rs, "vf_find_src_ms"), "{:.1f}") if vf else "–",
                     stat_text(_steps(rs, "vf_save_ms"), "{:.1f}") if vf else "–",
                     stat_text(_steps(rs, "dest_wait_ms"), "{:.1f}"),
                     stat_text(_steps(rs, "vf_find_dst_ms"), "{:.1f}") if vf else "–",
                     stat_text(_steps(rs, "vf_load_ms"), "{:.1f}") if vf else "–"])
    return ("QEMU's own account of its pause, from its trace events (`-trace` with the log "
            "backend, both QEMUs on one clock; ms, median and min–max): *stop → end*: the "
            "source's vCPUs stopped (`migration_completion_vm_stop`) to its cleanup; *final "
            "RAM pass* and the pages QEMU had left for it (`ram_save_complete`); *without "
            "the RAM pass*: stop → end minus the final RAM pass, what the devices and the "
            "machine cost; *device states*: after RAM until everything is sent "
            "(`migration_return_path_end_before`), the VF's dbus-vmstate step among it: "
            "QEMU finding the helpers on the bus (`dbus_vmstate_pre_save` → `_saving`) and "
            "the Save call; *destination*: the source waiting for the destination to load "
            "the rest (`source_return_path_thread_shut`), the VF's step among it: finding "
            "the helpers (`dbus_vmstate_post_load` → `_loading`) and the Load call.\n\n"
            + table(["configuration", "stop → end", "final RAM pass", "RAM pages left",
                     "without the RAM pass", "device states", "VF: find helpers",
                     "VF: Save", "destination", "VF: find helpers (dest)", "VF: Load"],
                    rows))


def runs_detail(results: dict[str, list[Run]]) -> str:
    rows: list[list[object]] = []
    for c in CONFIGS:
        for r in results.get(c.key, []):
            if not r.ok:
                rows.append([c.label, r.index + 1, r.direction, "failed", r.error or "", "",
                             "", ""])
                continue
            net = ("–" if r.recovered is None else
                   f"{r.net_downtime_ms:.0f}" if r.recovered and r.net_downtime_ms is not None
                   else f"no recovery within {r.window_s:.0f} s")
            ping = f"{r.ping[1]}/{r.ping[0]}" if r.ping else "–"
            rows.append([c.label, r.index + 1, r.direction, f"{r.total_ms:.0f}",
                         f"{r.vm_downtime_ms}", "–" if r.pause_ms is None else
                         f"{r.pause_ms:.0f}", net, ping])
    return ("<details><summary>Every run</summary>\n\n"
            + table(["configuration", "run", "hosts", "migration ms", "VM downtime ms",
                     "guest pause ms", "network downtime ms", "ping replies/sent"], rows)
            + "\n\n</details>")


def _median(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


# (VF configuration, the virtio-net configuration it is compared with)
PAIRS = (("vf-transparent", "virtio"), ("vf-cooperative", "virtio"),
         ("vf-transparent-dl30", "virtio-dl30"))


def targets_text(results: dict[str, list[Run]], pf: dict[str, float] | None) -> str:
    lines = ["**Targets**", ""]
    # 1. Save + Load inside QEMU's pause
    for key in (c.key for c in CONFIGS if c.guest == "vf"):
        rs = [r for r in results.get(key, []) if r.ok]
        both = [float(r.summary["save_ms"]) + float(r.summary["load_ms"]) for r in rs
                if r.summary.get("save_ms") is not None and r.summary.get("load_ms") is not None]
        v = _median(both)
        lines.append(f"- Save + Load together ≤ 5 ms ({key}): "
                     + ("no data" if v is None else f"{v:.2f} ms (median) {met(v <= 5)}"))
    # 2. VM downtime within 10 % of the virtio-net guest's (same downtime-limit)
    for key, base_key in PAIRS:
        base = _median(_vals(results.get(base_key, []), "vm_downtime_ms"))
        v = _median(_vals(results.get(key, []), "vm_downtime_ms"))
        if base is None or v is None:
            lines.append(f"- VM downtime ≤ 1.1× the virtio-net guest's ({key}): no data")
            continue
        lines.append(f"- VM downtime ≤ 1.1× the virtio-net guest's ({key} vs {base_key}): "
                     f"{v:.0f} ms vs {base:.0f} ms ({v / base:.2f}×) {met(v <= base * 1.10)}")
        # (the same without QEMU's final RAM pass, whose size QEMU picks anew every time)
        base_dev = _median(_beyond_ram(results.get(base_key, [])))
        dev = _median(_beyond_ram(results.get(key, [])))
        if base_dev is not None and dev is not None:
            lines.append(f"  - its part without the final RAM pass (QEMU's trace, not a "
                         f"target by itself): {dev:.1f} ms vs {base_dev:.1f} ms "
                         f"({dev / base_dev:.2f}×)")
    early = [r for c in CONFIGS if c.guest == "vf" for r in results.get(c.key, [])
             if r.ok and r.summary.get("early_access")]
    lines.append(f"- Guest ran before its VF's config was back: {len(early)} migrations "
                 f"(goal 0; `vfnic migrate` sends `cont` only after the NIC reports it)")
    vf_runs = [r for c in CONFIGS if c.guest == "vf" for r in results.get(c.key, []) if r.ok]
    msix = sum(1 for r in vf_runs
               if (r.summary.get("destination") or {}).get("msix_restored"))
    fallback = sum(1 for r in vf_runs if r.summary.get("driver_recoveries"))
    lines.append(f"- MSI-X table and Message Control put back by the destination NIC before "
                 f"the guest ran: {msix}/{len(vf_runs)} migrations; the kernel driver's own "
                 f"recovery of a lost MSI-X/config (the fallback): {fallback}")
    # 3. network downtime no worse than virtio-net (same downtime-limit)
    for key, base_key in PAIRS:
        vr = [r for r in results.get(base_key, []) if r.ok]
        vnet = _median([r.net_downtime_ms for r in vr if r.net_downtime_ms is not None])
        rs = [r for r in results.get(key, []) if r.ok]
        if not rs or vnet is None:
            lines.append(f"- Network downtime no worse than virtio-net ({key}): no data")
            continue
        if any(r.recovered is False for r in rs):
            lines.append(f"- Network downtime no worse than virtio-net ({key}): "
                         f"{net_text(rs)} vs {vnet:.0f} ms {met(False)}")
            continue
        v = _median([r.net_downtime_ms for r in rs if r.net_downtime_ms is not None])
        assert v is not None
        lines.append(f"- Network downtime no worse than virtio-net ({key} vs {base_key}): "
                     f"{v:.0f} ms vs "
                     f"{vnet:.0f} ms (medians) {met(v <= vnet)}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - manual use
    print("\n\n".join(run(quick="--quick" in sys.argv, plot_path=Path("/tmp/migration.png"))
                      .parts))
