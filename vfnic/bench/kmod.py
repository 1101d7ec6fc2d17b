"""Section "kmod": the VF's kernel driver (vfnic_vf.ko) against the Python driver
model and virtio-net, in the same run.

The same TCG guest image is booted on host a of the lab three ways: the VF with
the kernel driver, the VF with the Python driver model (a TAP bridged from
userspace), and QEMU's virtio-net on a TAP on the same LAN bridge. Each guest
runs the datapath section's benchmark server (UDP both directions, ping from
the peer: vfnic/bench/datapath.py); the kinds are interleaved in rounds (the
order rotated each round) and every cell is a median over the rounds with its
range. In each VF guest the PF first sends SUSPEND / RESUME through the mailbox
(`vfnic serve`'s management socket) and the driver's acknowledgements carry the
time it took, as the driver itself measured it.
"""

from __future__ import annotations

import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

from vfnic.bench.common import Section, log, met, rotated_rounds, short_tmpdir, stat_text, table
from vfnic.bench.datapath import (
    DIRECTIONS,
    GUEST_KINDS,
    GUEST_NAMES,
    PAYLOADS,
    guest_datapath,
    label,
    plot_guest_rates,
    received_rate,
)

SUSPEND_CYCLES = 20
# Migrations measured here: the VF guest runs the guest's default driver (the kernel one).
MIGRATION_CONFIGS = ("vf-transparent", "vf-cooperative", "virtio", "vf-transparent-dl30",
                     "virtio-dl30")


def suspend_resume(nic_dir: Path, cycles: int) -> dict[str, Any]:
    """SUSPEND then RESUME (with the gratuitous ARP) ``cycles`` times; the driver's
    own µs from each acknowledgement and the mailbox round trip seen by the PF.
    A command not acknowledged in 5 s is counted in "errors" and the cycles go on."""
    from vfnic.device.nic import control_call

    out: dict[str, Any] = {"suspend_us": [], "resume_us": [], "suspend_ms": [],
                           "resume_ms": [], "errors": []}
    for _ in range(cycles):
        for state in ("suspend", "resume"):
            try:
                r = control_call(nic_dir, {"op": "vf-state", "vf": 0, "state": state,
                                           "timeout": 5.0})
            except Exception as exc:  # counted and reported; a driver that stopped
                out["errors"].append(f"{state}: {exc}")  # answering is not waited for
                if len(out["errors"]) >= 3:
                    return out
                continue
            out[f"{state}_us"].append(float(r["driver_us"]))
            out[f"{state}_ms"].append(float(r["mailbox_ms"]))
    return out


def migrations(lab: Any, nic_dirs: dict[str, Path], runs: int, sec: Section) -> dict[str, Any]:
    """Network downtime per migration mode, `vfnic migrate` a <-> b, the VF guest with the
    kernel driver, and virtio-net: the migration section's machinery (PingPong)."""
    from vfnic.bench.migration import CONFIGS, PingPong

    cfgs = [c for c in CONFIGS if c.key in MIGRATION_CONFIGS]
    out: dict[str, Any] = {c.key: [] for c in cfgs}
    # Both guests side by side (each at its own address), every configuration once per
    # round in a rotated order, as in the migration section.
    pps = {kind: PingPong(lab, kind, nic_dirs) for kind in ("vf", "virtio")}
    try:
        for i, cfg in rotated_rounds(cfgs, runs):
            log(f"kmod: migration {cfg.label}, run {i + 1}/{runs}")
            try:
                r = pps[cfg.guest].migrate(cfg, i, 5.0)
            except Exception as exc:  # reported, the runs go on
                sec.fail(f"migration {cfg.key} run {i + 1}", exc)
                continue
            if not r.ok:
                sec.failures.append(f"migration {cfg.key} run {i + 1}: {r.error}")
            out[cfg.key].append(r)
    finally:
        for pp in pps.values():
            pp.close()
    return out


def run(quick: bool = False, rounds: int | None = None,
        plot_path: Path | None = None) -> Section:
    from vfnic.migrate.lab import Lab, require_root

    sec = Section("kmod", "Guest kernel driver")
    dur = 2.0 if quick else 5.0
    rounds = rounds or (1 if quick else 3)
    ping = 30 if quick else 100
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in GUEST_KINDS}
    moves: dict[str, Any] = {}
    with short_tmpdir("vfk-") as tmp:
        require_root()
        lab = Lab(tmp / "lab")
        (tmp / "lab").mkdir()
        lab.up()
        try:
            nic_a = lab.start_nic("a", vfs=2, nic_id=1)
            for rnd in range(rounds):
                kinds = GUEST_KINDS[rnd % 3:] + GUEST_KINDS[:rnd % 3]
                for kind in kinds:
                    log(f"kmod: round {rnd + 1}/{rounds}, {kind} guest: ping, UDP both ways")
                    before = (partial(suspend_resume, nic_a, SUSPEND_CYCLES)
                              if kind != "virtio" else None)
                    g = sec.attempt(f"round {rnd + 1} {kind} guest", partial(
                        guest_datapath, lab, kind, nic_a, dur, ping, before))
                    if g is not None:
                        results[kind].append(g)
            nic_dirs = {"a": nic_a, "b": lab.start_nic("b", vfs=2, nic_id=2)}
            moves = sec.attempt("migrations", partial(
                migrations, lab, nic_dirs, 2 if quick else 5 * rounds // 3 or 1, sec)) or {}
        finally:
            lab.down()
    sec.data["rounds"] = results

    sec.add(f"The same guest image (TCG, 1 vCPU, 512 MiB) on host a of the lab, three "
            f"ways in the same run: **{GUEST_NAMES['kvf']}**, **{GUEST_NAMES['vf']}** and "
            f"**{GUEST_NAMES['virtio']}**, {rounds} round(s), the three kinds interleaved "
            f"(order rotated each round). In each guest python3 UDP sender/receiver, the "
            f"same in the peer namespace, {dur:g} s per row, unthrottled (the datapath "
            f"section's server and peer). *received/s* counted by the receiver between "
            f"its first and last datagram; median over the rounds (min–max).")
    rows: list[list[object]] = []
    targets: list[str] = []
    for key, direction in DIRECTIONS:
        for payload in PAYLOADS:
            got = {kind: [v for v in (received_rate(r, key, payload) for r in results[kind])
                          if v is not None] for kind in GUEST_KINDS}
            base = statistics.median(got["virtio"]) if got["virtio"] else 0.0
            if got["kvf"] and base:
                x = statistics.median(got["kvf"]) / base
                targets.append(f"- packets/s {direction}, {label(payload)}: kernel driver "
                               f"{x:.2f}× virtio-net's (target ≥ 1.0×) {met(x >= 1.0)}")
            for kind in GUEST_KINDS:
                vals = got[kind]
                ratio = f"{statistics.median(vals) / base:.2f}×" if vals and base else "–"
                rows.append([direction, label(payload), GUEST_NAMES[kind],
                             stat_text(vals, "{:,.0f}"), ratio])
    sec.add(table(["direction", "frame", "guest NIC", "received/s", "vs virtio-net"], rows))
    if plot_path is not None and any(results.values()):
        image = plot_guest_rates(plot_path, {k: v for k, v in results.items() if v},
                                 f"A TCG guest's UDP packets/s, {rounds} interleaved "
                                 f"round(s): kernel driver vs Python driver vs virtio-net",
                                 sec)
        if image:
            sec.add(image)

    prow: list[list[object]] = []
    for kind in GUEST_KINDS:
        pings = [r["ping"] for r in results[kind] if "avg" in r.get("ping", {})]
        if pings:
            prow.append([GUEST_NAMES[kind], stat_text([p["min"] for p in pings], "{:.3f}"),
                         stat_text([p["avg"] for p in pings], "{:.3f}"),
                         stat_text([p["max"] for p in pings], "{:.3f}"),
                         sum(int(p.get("received", 0)) for p in pings)])
    avg = {kind: [r["ping"]["avg"] for r in results[kind] if "avg" in r.get("ping", {})]
           for kind in ("kvf", "virtio")}
    if avg["kvf"] and avg["virtio"]:
        k, v = statistics.median(avg["kvf"]), statistics.median(avg["virtio"])
        targets.append(f"- ping RTT (avg): kernel driver {k:.3f} ms, virtio-net {v:.3f} ms "
                       f"(target ≤ virtio-net's) {met(k <= v)}")
    if prow:
        sec.add(f"Ping RTT, peer → guest (`ping -c {ping} -i 0.05`, before the UDP rows), ms, "
                f"median over the rounds of each round's min / avg / max:")
        sec.add(table(["guest NIC", "min", "avg", "max", "replies"], prow))

    srow: list[list[object]] = []
    for kind in ("kvf", "vf"):
        sr = [r["before"] for r in results[kind] if isinstance(r.get("before"), dict)]
        if not sr:
            continue
        su = [v for s in sr for v in s["suspend_us"]]
        ru = [v for s in sr for v in s["resume_us"]]
        sm = [v for s in sr for v in s["suspend_ms"]]
        rm = [v for s in sr for v in s["resume_ms"]]
        errors = sum(len(s["errors"]) for s in sr)
        cycles = f"{len(su)}" + (f" ({errors} not acknowledged)" if errors else "")
        srow.append([GUEST_NAMES[kind], cycles, stat_text([v / 1000 for v in su], "{:.3f}"),
                     stat_text(sm, "{:.2f}"), stat_text([v / 1000 for v in ru], "{:.3f}"),
                     stat_text(rm, "{:.2f}")])
    if srow:
        sec.add(f"Driver suspend and resume as the driver reports them (word 1 of its "
                f"SUSPEND / RESUME acknowledgement, measured in the guest), and the mailbox "
                f"round trip the PF sees (post to acknowledgement), {SUSPEND_CYCLES} cycles "
                f"per VF guest once it is up, before its datapath rows; RESUME with the "
                f"gratuitous ARP and "
                f"unsolicited NA. Median (min–max), ms. Target: ≤ 1 ms each in the guest "
                f"(the 2015 prototype: 5 ms and 20 ms).")
        sec.add(table(["guest driver", "cycles", "suspend: driver ms", "suspend: mailbox ms",
                       "resume: driver ms", "resume: mailbox ms"], srow))
    if moves:
        from vfnic.bench.migration import CONFIGS, net_text

        mrows = []
        for c in CONFIGS:
            if c.key in moves:
                rs = moves[c.key]
                ok = [r for r in rs if r.ok]
                mrows.append([c.label if c.guest != "vf" else f"{c.label} (kernel driver)",
                              f"{len(ok)}/{len(rs)}", net_text(rs),
                              stat_text([r.vm_downtime_ms for r in ok
                                         if r.vm_downtime_ms is not None], "{:.0f}")])
        sec.add("Network downtime per migration (`vfnic migrate` between the lab's hosts a "
                "and b, back and forth, the peer pinging the guest every 10 ms; the "
                "migration section's runner, the VF guest with its default driver, vfnic_vf, "
                "and the virtio-net guest side by side, every configuration once per round in "
                "a rotated order; at QEMU's default downtime-limit and at 30 ms, where QEMU's "
                "final RAM pass no longer outweighs the devices: see section 3), ms, median "
                "(min–max):")
        sec.add(table(["configuration", "runs ok", "network downtime ms", "VM downtime ms"],
                      mrows))
        sec.data["migrations"] = {k: [r.__dict__ for r in v] for k, v in moves.items()}
        down = {k: [r.net_downtime_ms for r in v if r.ok and r.recovered and
                    r.net_downtime_ms is not None] for k, v in moves.items()}
        for vf_key, base_key, limit in (("vf-transparent", "virtio", "QEMU's default"),
                                        ("vf-transparent-dl30", "virtio-dl30", "30 ms")):
            if down.get(vf_key) and down.get(base_key):
                t, v = statistics.median(down[vf_key]), statistics.median(down[base_key])
                targets.append(f"- network downtime, transparent mode, kernel driver "
                               f"(downtime-limit {limit}): {t:.0f} ms, virtio-net {v:.0f} ms: "
                               f"{t / v:.2f}× (target ≤ 1.0×) {met(t <= v)}")
    ksr = [r["before"] for r in results["kvf"] if isinstance(r.get("before"), dict)]
    for state in ("suspend", "resume"):
        us = [v for sr in ksr for v in sr[f"{state}_us"]]
        if us:
            ms = statistics.median(us) / 1000
            targets.append(f"- driver {state} (median, as the kernel driver reports it): "
                           f"{ms:.3f} ms (target ≤ 1 ms) {met(ms <= 1.0)}")
    if targets:
        sec.add("Targets of issue 9 in this run:\n\n" + "\n".join(targets))
    return sec


if __name__ == "__main__":  # pragma: no cover - manual use
    print("\n\n".join(run(quick="--quick" in sys.argv).parts))
