"""Section 4 of BENCHMARKS.md: `virsh migrate` between the lab's two libvirtds.

One guest, defined in libvirt on host a, moved a -> b -> a ... with `virsh migrate
--live`; the peer pings it every 10 ms. Per run: the wall time of the virsh command,
libvirt's own elapsed time and QEMU's downtime (`virsh domjobinfo --completed` on
the destination), the network downtime, and what the source NIC's follower recorded
(when it suspended the VF driver, the mailbox round trip).
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any

from vfnic.bench.common import Section, log, short_tmpdir, stat_text, table
from vfnic.bench.migration import Config, Run, ping_once

NAME = "vfnic-bench"
CONFIG = Config("virsh", "VF, virsh migrate (cooperative, libvirt)", "vf", "cooperative")
_ports = itertools.count(49152)


def jobinfo(text: str) -> dict[str, float]:
    """`virsh domjobinfo` lines "Time elapsed:  1234 ms" -> {"Time elapsed": 1234.0}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([^:]+):\s+([0-9.]+)\s*ms\s*$", line)
        if m:
            out[m.group(1).strip()] = float(m.group(2))
    return out


def migrate_once(lab: Any, src: Any, dst: Any, run: Run, window: float) -> None:
    from vfnic.device.nic import control_call
    from vfnic.migrate.lab import GUEST_IP, Pinger

    pinger = Pinger(lab)
    pinger.start()
    try:
        time.sleep(1.0)
        uri = f"tcp://{lab.host_ip(dst.host)}:{next(_ports)}"
        t0 = time.monotonic()
        done = src.virsh("migrate", "--live", NAME, dst.uri, "--migrateuri", uri,
                         check=False, timeout=300)
        wall = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"virsh migrate: {done.stderr.strip()}")
        deadline = time.monotonic() + window
        while not ping_once(lab.ns("peer"), GUEST_IP):
            if time.monotonic() > deadline:
                break
        run.recovered = time.monotonic() <= deadline
        time.sleep(0.5)
    finally:
        pinger.stop()
    info = jobinfo(dst.virsh("domjobinfo", NAME, "--completed", check=False).stdout)
    records = control_call(lab.nic_dir(src.host), {"op": "migrations"})
    rec = records[-1] if records else {}
    run.total_ms = wall * 1000
    run.vm_downtime_ms = info.get("Total downtime")
    run.net_downtime_ms = pinger.downtime_ms() if run.recovered else None
    run.ping = pinger.loss()
    run.summary = {"libvirt_elapsed_ms": info.get("Time elapsed"),
                   "suspended_at_ms": rec.get("suspended_at_ms"),
                   "suspend_mailbox_ms": rec.get("suspend_mailbox_ms"),
                   "suspend_driver_us": rec.get("suspend_driver_us"),
                   "follower": rec.get("result"), "follower_error": rec.get("error")}
    run.ok = bool(run.recovered) and rec.get("result") == "completed"
    if not run.ok:
        run.error = f"follower {rec.get('result')} {rec.get('error', '')}".strip()


def run(quick: bool = False, runs: int | None = None, plot_path: Path | None = None) -> Section:
    from vfnic.libvirt.lab import LibvirtHost, lab_domain
    from vfnic.migrate.lab import GUEST_IP, Lab, require_root

    sec = Section("virsh", "virsh migrate")
    nruns = runs or (2 if quick else 10)
    window = 10.0
    results: list[Run] = []
    with short_tmpdir("vfv-") as tmp:
        require_root()
        lab = Lab(tmp)
        lab.up()
        try:
            lab.start_nic("a", 2, 1)
            lab.start_nic("b", 2, 2)
            xml = lab_domain(lab, NAME)
            with LibvirtHost(lab, "a") as a, LibvirtHost(lab, "b") as b:
                a.virsh("define", str(xml))
                a.virsh("start", NAME)
                deadline = time.monotonic() + 180
                while not ping_once(lab.ns("peer"), GUEST_IP):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the guest did not come up on its VF")
                src, dst = a, b
                for i in range(nruns):
                    r = Run(CONFIG.key, i, direction=f"{src.host}→{dst.host}", window_s=window)
                    log(f"virsh: run {i + 1}/{nruns} {r.direction}")
                    try:
                        migrate_once(lab, src, dst, r, window)
                    except Exception as exc:  # recorded; the next run goes on
                        r.error = f"{type(exc).__name__}: {exc}"
                    results.append(r)
                    log(f"virsh: {r.direction}: " + (
                        f"{r.total_ms:.0f} ms, VM downtime {r.vm_downtime_ms} ms, network "
                        f"downtime {r.net_downtime_ms} ms" if r.ok else f"FAILED {r.error}"))
                    if r.total_ms is not None:  # the guest moved
                        src, dst = dst, src
        finally:
            lab.down()
    report(sec, results, plot_path, window)
    return sec


def report(sec: Section, results: list[Run], plot_path: Path | None, window: float) -> None:
    ok = [r for r in results if r.ok]
    sec.failures += [f"run {r.index} ({r.direction}): {r.error}" for r in results if not r.ok]

    def vals(get: Any) -> list[float]:
        return [float(v) for v in (get(r) for r in ok) if v is not None]

    sec.add("The lab's guest (512 MiB, 1 vCPU, TCG) defined in libvirt on host a and moved "
            "back and forth with `virsh -c <host> migrate --live vfnic-bench <other host> "
            "--migrateuri tcp://<other host>:<port>` between the two lab libvirtds (libvirt "
            "12.8 from the sid root, one per host: vfnic/libvirt/lab.py); the peer pings the "
            "guest every 10 ms. Median (min–max). *virsh migrate*: wall time of the command. "
            "*libvirt elapsed* and *VM downtime*: `virsh domjobinfo --completed` on the "
            "destination. *Network downtime*: longest gap between two ping replies minus the "
            "interval. *Suspend*: when the source NIC (following the QEMU through vf0.qmp) "
            "had the VF driver suspended, counted from the moment it saw the migration "
            "start, and the mailbox round trip of SUSPEND.")
    sec.add(table(
        ["configuration", "runs ok", "virsh migrate ms", "libvirt elapsed ms",
         "VM downtime ms", "network downtime ms", "suspended at ms", "SUSPEND mailbox ms"],
        [[CONFIG.label, f"{len(ok)}/{len(results)}",
          stat_text(vals(lambda r: r.total_ms), "{:.0f}"),
          stat_text(vals(lambda r: r.summary.get("libvirt_elapsed_ms")), "{:.0f}"),
          stat_text(vals(lambda r: r.vm_downtime_ms), "{:.0f}"),
          stat_text(vals(lambda r: r.net_downtime_ms), "{:.0f}"),
          stat_text(vals(lambda r: r.summary.get("suspended_at_ms")), "{:.0f}"),
          stat_text(vals(lambda r: r.summary.get("suspend_mailbox_ms")), "{:.1f}")]]))
    sec.add("In cooperative mode the network is down from the driver's suspend (before the "
            "final RAM pass) until the driver, on the destination, has found the fresh VF "
            "(its 5 ms watchdog), restored its PCI config, reset it, asked the PF for its MAC "
            "and restarted its rings: a Python driver under TCG. Section 3 has the same "
            "guest moved by `vfnic migrate` and the virtio-net and no-NIC baselines.")
    sec.add(table(["run", "hosts", "virsh migrate ms", "VM downtime ms", "network downtime ms",
                   "ping replies/sent", "result"],
                  [[r.index, r.direction,
                    f"{r.total_ms:.0f}" if r.total_ms is not None else "–",
                    r.vm_downtime_ms if r.vm_downtime_ms is not None else "–",
                    f"{r.net_downtime_ms:.0f}" if r.net_downtime_ms is not None else "–",
                    f"{r.ping[1]}/{r.ping[0]}" if r.ping else "–",
                    "ok" if r.ok else r.error] for r in results]))
    if plot_path is not None and ok:
        from vfnic.bench.plot import migration_plot

        try:
            migration_plot({CONFIG.key: results}, [CONFIG], plot_path, window,
                           title=f"virsh migrate of a TCG guest with a vfnic VF between two "
                                 f"libvirt hosts ({len(ok)} runs)")
            sec.add(f"![virsh migrate: migration time, VM downtime and network downtime]"
                    f"(docs/bench/{plot_path.name})")
            log(f"virsh: plot written to {plot_path}")
        except Exception as exc:
            sec.fail("plot", exc)
