"""Section 4 of BENCHMARKS.md: `virsh migrate` between the lab's two libvirtds.

Two guests side by side, a VF guest and a virtio-net guest (each at its own address),
defined in libvirt on host a and moved a -> b -> a ... with `virsh migrate --live`;
the peer pings the one moving every 10 ms. Every round migrates each configuration
once, in an order rotated round by round: the VF guest in the VF's transparent and in
its cooperative mode (`vfnic link set ... migration`), both carrying the VF in QEMU's
stream (dbus-vmstate), and the virtio-net guest. Per run:
the wall time of the virsh command, libvirt's own elapsed time and QEMU's downtime
(`virsh domjobinfo --completed` on the destination), the network downtime, and what
the two NICs recorded (Save and Load inside QEMU's pause, bytes, DMA pages and bytes
carried, whether the guest ran before its VF's config was back, the mailbox).
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any

from vfnic.bench.common import Section, log, rotated_rounds, short_tmpdir, stat_text, table
from vfnic.bench.migration import Config, Run, driver_recoveries, suspend_points

CONFIG = Config("virsh", "VF transparent, virsh migrate", "vf", "transparent")
COOP = Config("virsh-coop", "VF cooperative, virsh migrate", "vf", "cooperative")
VIRTIO = Config("virsh-virtio", "virtio-net, virsh migrate (libvirt)", "virtio")
NAMES = {CONFIG.key: "vfnic-bench", COOP.key: "vfnic-bench", VIRTIO.key: "virtio-bench"}
_ports = itertools.count(49152)


def jobinfo(text: str) -> dict[str, float]:
    """`virsh domjobinfo` lines "Time elapsed:  1234 ms" -> {"Time elapsed": 1234.0}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([^:]+):\s+([0-9.]+)\s*ms\s*$", line)
        if m:
            out[m.group(1).strip()] = float(m.group(2))
    return out


def migrate_once(lab: Any, src: Any, dst: Any, run: Run, window: float, target: str) -> None:
    """One `virsh migrate --live` of the run's guest (answering at ``target``)."""
    from vfnic.device.nic import control_call
    from vfnic.migrate.lab import LabError, Pinger

    name = NAMES[run.config]
    vf = run.config in (CONFIG.key, COOP.key)
    if vf:
        mode = COOP.mode if run.config == COOP.key else CONFIG.mode
        control_call(lab.nic_dir(src.host), {"op": "vf-migration", "vf": 0, "mode": mode})
        seen = {h: max((r["seq"] for r in control_call(lab.nic_dir(h), {"op": "migrations"})),
                       default=0) for h in "ab"}
    pinger = Pinger(lab, target)
    pinger.start()
    try:
        time.sleep(1.0)
        uri = f"tcp://{lab.host_ip(dst.host)}:{next(_ports)}"
        t0 = time.monotonic()
        done = src.virsh("migrate", "--live", name, dst.uri, "--migrateuri", uri,
                         check=False, timeout=300)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"virsh migrate: {done.stderr.strip()}")
        try:
            lab.wait_reachable(window, target=target)
            run.recovered = True
        except LabError:
            run.recovered = False
        time.sleep(0.5)
    finally:
        pinger.stop()
    info = jobinfo(dst.virsh("domjobinfo", name, "--completed", check=False).stdout)
    rec: dict[str, Any] = {"result": "completed"}  # virtio-net: no VF
    drec: dict[str, Any] = {}
    takeovers = recoveries = 0
    if vf:
        srecs = control_call(lab.nic_dir(src.host),
                             {"op": "migrations", "settle": 10, "since": seen[src.host]})
        drecs = control_call(lab.nic_dir(dst.host),
                             {"op": "migrations", "settle": 10, "since": seen[dst.host]})
        rec = ([r for r in srecs if r["role"] == "source"] or [{}])[-1]
        drec = ([r for r in drecs if r["role"] == "destination"] or [{}])[-1]
        console = (lab.nic_dir(dst.host) / "console.log").read_text(errors="replace")
        # The driver's own fallback (a VF found at reset, taken over): counted apart.
        takeovers = len(re.findall(r"taken over in ([0-9.]+) ms", console))
        recoveries = driver_recoveries(console)
    run.total_ms = wall * 1000
    run.vm_downtime_ms = info.get("Total downtime")
    run.net_downtime_ms = pinger.downtime_ms() if run.recovered else None
    run.ping = pinger.loss()
    run.summary = {"libvirt_elapsed_ms": info.get("Time elapsed"),
                   "save_ms": rec.get("save_ms"), "load_ms": drec.get("load_ms"),
                   "bytes": rec.get("bytes"), "pages": rec.get("pages"),
                   "dma_bytes": rec.get("dma_bytes"),
                   "replay_ms": drec.get("replay_ms"),
                   "early_access": drec.get("early_access"),
                   "driver_takeovers": takeovers,
                   "msix_restored": drec.get("msix_restored"),
                   "driver_recoveries": recoveries,
                   "suspended_at_ms": rec.get("suspended_at_ms"),
                   "suspend_mailbox_ms": rec.get("suspend_mailbox_ms"),
                   "suspend_point": rec.get("suspend_point"),
                   "suspend_overtaken": rec.get("suspend_overtaken"),
                   "resume_mailbox_ms": drec.get("resume_mailbox_ms"),
                   "source": rec.get("result"), "error": rec.get("error") or drec.get("error")}
    run.ok = bool(run.recovered) and rec.get("result") == "completed" and (
        not vf or drec.get("result") == "completed")
    if not run.ok:
        run.error = f"source {rec.get('result')} {run.summary['error'] or ''}".strip()


def run(quick: bool = False, runs: int | None = None, plot_path: Path | None = None) -> Section:
    from vfnic.libvirt.lab import LibvirtHost, lab_domain
    from vfnic.migrate.lab import GUEST_IP, VIRTIO_GUEST_IP, Lab, require_root, virtio_netsetup

    sec = Section("virsh", "virsh migrate")
    nruns = runs or (2 if quick else 10)
    window = 10.0
    results: dict[str, list[Run]] = {CONFIG.key: [], COOP.key: [], VIRTIO.key: []}
    with short_tmpdir("vfv-") as tmp:
        require_root()
        lab = Lab(tmp)
        lab.up()
        try:
            lab.start_nic("a", 2, 1)
            lab.start_nic("b", 2, 2)
            bridge = lab.bridge_to_lan("a")
            lab.bridge_to_lan("b")
            # The VF guest shows its driver's log on the console: the destination's console
            # then says how long the driver took to take the new VF over.
            xmls = {CONFIG.key: lab_domain(lab, NAMES[CONFIG.key],
                                           "exec tail -F /run/vfnic-driver.log\n"),
                    VIRTIO.key: lab_domain(lab, NAMES[VIRTIO.key],
                                           virtio_netsetup(VIRTIO_GUEST_IP)
                                           + "exec sleep 1000000\n", virtio_bridge=bridge)}
            ips = {CONFIG.key: GUEST_IP, COOP.key: GUEST_IP, VIRTIO.key: VIRTIO_GUEST_IP}
            plan = [CONFIG, COOP, VIRTIO]
            with LibvirtHost(lab, "a") as a, LibvirtHost(lab, "b") as b:
                # Both guests run side by side (each at its own address), and every round
                # migrates each configuration once, in an order rotated round by round:
                # they share the machine's moments and each moves a -> b and b -> a.
                where: dict[str, tuple[Any, Any]] = {}  # domain -> (its host, the other)
                try:
                    for cfg in (CONFIG, VIRTIO):
                        a.virsh("define", str(xmls[cfg.key]))
                        a.virsh("start", NAMES[cfg.key])
                        where[NAMES[cfg.key]] = (a, b)
                    for cfg in (CONFIG, VIRTIO):
                        lab.wait_reachable(180, f"the {cfg.label} guest", target=ips[cfg.key])
                    for i, this in rotated_rounds(plan, nruns):
                        name = NAMES[this.key]
                        src, dst = where[name]
                        r = Run(this.key, i, direction=f"{src.host}→{dst.host}",
                                window_s=window)
                        log(f"virsh: {this.label}, run {i + 1}/{nruns} {r.direction}")
                        try:
                            migrate_once(lab, src, dst, r, window, ips[this.key])
                        except Exception as exc:  # recorded; the next run goes on
                            r.error = f"{type(exc).__name__}: {exc}"
                        results[this.key].append(r)
                        log(f"virsh: {r.direction}: " + (
                            f"{r.total_ms:.0f} ms, VM downtime {r.vm_downtime_ms} ms, "
                            f"network downtime {r.net_downtime_ms} ms" if r.ok
                            else f"FAILED {r.error}"))
                        if r.total_ms is not None:  # the guest moved
                            where[name] = (dst, src)
                finally:
                    for name, (host, _) in where.items():
                        host.virsh("destroy", name, check=False)
                        for h in (a, b):
                            h.virsh("undefine", name, check=False)
        finally:
            lab.down()
    report(sec, results, plot_path, window)
    return sec


def report(sec: Section, results: dict[str, list[Run]], plot_path: Path | None,
           window: float) -> None:
    configs = (CONFIG, COOP, VIRTIO)
    for cfg in configs:
        sec.failures += [f"{cfg.label} run {r.index} ({r.direction}): {r.error}"
                         for r in results[cfg.key] if not r.ok]

    def vals(key: str, get: Any) -> list[float]:
        return [float(v) for v in (get(r) for r in results[key] if r.ok) if v is not None]

    sec.add("Two lab guests (512 MiB, 1 vCPU, TCG each), side by side at their own addresses, "
            "defined in libvirt on host a and each moved "
            "back and forth with `virsh -c <host> migrate --live <guest> <other host> "
            "--migrateuri tcp://<other host>:<port>` between the two lab libvirtds (libvirt "
            "12.8 from the sid root, one per host: vfnic/libvirt/lab.py); the peer pings the "
            "guest every 10 ms. The VF guest's VF state rides QEMU's own migration stream "
            "(the domain's dbus-vmstate object; each host's `vfnic serve` offers the VF's "
            "VMState1 helper), in the VF's transparent and cooperative modes; the other is a "
            "virtio-net guest whose NIC is a libvirt TAP on a bridge in each host, cabled to "
            "the same LAN (QEMU announces it after the move). Every round migrates each "
            "configuration once, in an order rotated round by round. Median "
            "(min–max). *virsh migrate*: wall time of the command. *VM downtime*: `virsh "
            "domjobinfo --completed` on the destination. *Network downtime*: longest gap "
            "between two ping replies minus the interval. *Save*/*Load*: the helpers' "
            "own time inside QEMU's pause (source Save, destination Load). *State*: bytes "
            "QEMU carried for the VF, and the guest pages the VF wrote by DMA among them. "
            "*Early*: migrations where the destination guest ran before its VF's PCI config "
            "was back in QEMU (goal 0). *MSI-X back*: migrations where the destination NIC "
            "wrote the guest's MSI-X table and Message Control back into QEMU (with *early*, "
            "the guest may have run just before). "
            "*Takeovers*: migrations where the guest driver fell back to taking over a VF "
            "found at reset; *recoveries*: where it restored a lost MSI-X/config itself (both "
            "counted from the destination's console since the lab started).")
    rows = []
    for cfg in configs:
        k = cfg.key
        vf = k != VIRTIO.key
        both = [float(r.summary["save_ms"]) + float(r.summary["load_ms"])
                for r in results[k] if r.ok and r.summary.get("save_ms") is not None
                and r.summary.get("load_ms") is not None]
        early = sum(1 for r in results[k] if r.summary.get("early_access"))
        takeovers = sum(1 for r in results[k] if r.summary.get("driver_takeovers"))
        recoveries = sum(1 for r in results[k] if r.summary.get("driver_recoveries"))
        msix = sum(1 for r in results[k] if r.summary.get("msix_restored"))
        rows.append([cfg.label, f"{len(vals(k, lambda r: r.total_ms))}/{len(results[k])}",
                     stat_text(vals(k, lambda r: r.total_ms), "{:.0f}"),
                     stat_text(vals(k, lambda r: r.vm_downtime_ms), "{:.0f}"),
                     stat_text(vals(k, lambda r: r.net_downtime_ms), "{:.0f}"),
                     stat_text(vals(k, lambda r: r.summary.get("save_ms")), "{:.2f}")
                     if vf else "–",
                     stat_text(vals(k, lambda r: r.summary.get("load_ms")), "{:.2f}")
                     if vf else "–",
                     stat_text(both, "{:.2f}") if vf else "–",
                     stat_text(vals(k, lambda r: r.summary.get("bytes")), "{:.0f}")
                     if vf else "–",
                     stat_text(vals(k, lambda r: r.summary.get("pages")), "{:.0f}")
                     if vf else "–",
                     stat_text(vals(k, lambda r: r.summary.get("dma_bytes")), "{:.0f}")
                     if vf else "–",
                     f"{early}/{len(results[k])}" if vf else "–",
                     f"{msix}/{len(results[k])}" if vf else "–",
                     f"{takeovers}/{len(results[k])}" if vf else "–",
                     f"{recoveries}/{len(results[k])}" if vf else "–"])
    sec.add(table(["configuration", "runs ok", "virsh migrate ms", "VM downtime ms",
                   "network downtime ms", "Save ms", "Load ms", "Save+Load ms",
                   "state bytes", "DMA pages", "DMA bytes", "early", "MSI-X back",
                   "takeovers", "recoveries"], rows))
    vio_net = vals(VIRTIO.key, lambda r: r.net_downtime_ms)
    vio_vm = vals(VIRTIO.key, lambda r: r.vm_downtime_ms)
    if vio_net and vio_vm:
        import statistics

        lines = []
        for cfg in (CONFIG, COOP):
            net = vals(cfg.key, lambda r: r.net_downtime_ms)
            vm = vals(cfg.key, lambda r: r.vm_downtime_ms)
            if net and vm:
                lines.append(
                    f"{cfg.label}: network downtime {statistics.median(net):.0f} ms vs "
                    f"virtio-net's {statistics.median(vio_net):.0f} ms "
                    f"({statistics.median(net) / statistics.median(vio_net):.2f}×, target "
                    f"≤ 1.0× for transparent); VM downtime {statistics.median(vm):.0f} ms vs "
                    f"{statistics.median(vio_vm):.0f} ms "
                    f"({statistics.median(vm) / statistics.median(vio_vm):.2f}×, target ≤ 1.1×).")
        sec.add(" ".join(lines))
    coop = [r.summary for r in results[COOP.key] if r.ok]
    if coop:
        sec.add(suspend_points(coop))
    sec.add(table(["configuration", "run", "hosts", "virsh migrate ms", "VM downtime ms",
                   "network downtime ms", "ping replies/sent", "result"],
                  [[cfg.label, r.index, r.direction,
                    f"{r.total_ms:.0f}" if r.total_ms is not None else "–",
                    r.vm_downtime_ms if r.vm_downtime_ms is not None else "–",
                    f"{r.net_downtime_ms:.0f}" if r.net_downtime_ms is not None else "–",
                    f"{r.ping[1]}/{r.ping[0]}" if r.ping else "–",
                    "ok" if r.ok else r.error]
                   for cfg in configs for r in results[cfg.key]]))
    if plot_path is not None and any(r.ok for rs in results.values() for r in rs):
        from vfnic.bench.plot import migration_plot

        try:
            migration_plot(results, list(configs), plot_path, window,
                           title="virsh migrate of a TCG guest between two libvirt hosts: "
                                 "vfnic VF vs virtio-net")
            sec.add(f"![virsh migrate: migration time, VM downtime and network downtime]"
                    f"(docs/bench/{plot_path.name})")
            log(f"virsh: plot written to {plot_path}")
        except Exception as exc:
            sec.fail("plot", exc)
