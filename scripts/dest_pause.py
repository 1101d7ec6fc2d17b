"""The destination's part of QEMU's pause, step by step, from its own trace.

Migrates lab guests back and forth with the migration benchmark's runner
(vfnic.bench.migration), QEMU tracing a few more events, and splits the destination's
loading of the device states (after the last RAM) into:

  dbus-vmstate      QEMU finding the helpers on the bus, then the Load call
  DMA map updates   loading kvm-tpr-opt and mch changes guest memory regions: QEMU's
                    vfio-user client sends DMA_UNMAP/DMA_MAP for them and waits for
                    the server's replies (a virtio-net guest has no such messages)
  rest              every other device state, to the end of the load

    python scripts/dest_pause.py [--runs N] CONFIG ...

CONFIG is a key of vfnic.bench.migration.CONFIGS (e.g. vf-transparent-dl30,
virtio-dl30); the configurations are interleaved, N runs each. Needs root.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import vfnic.bench.migration as bm
from vfnic.bench.common import short_tmpdir, table
from vfnic.migrate.lab import Lab

EXTRA_EVENTS = ("qemu_loadvm_state_post_main", "vfio_user_send_write")

# (step, first event of the step, the event that ends it), searched in this order; the
# dbus-vmstate step comes from the benchmark's own account (bm.pause_steps)
STEPS = (
    ("DMA map updates (kvm-tpr-opt)", "vmstate_load kvm-tpr-opt", "vmstate_load fw_cfg"),
    ("DMA map updates (mch)", "/mch", "vmstate_load PCIHost"),
    ("rest", "vmstate_load PCIHost", "qemu_loadvm_state_post_main"),
)


def destination_steps(trace: Path) -> dict[str, float]:
    """ms per step of the destination's last device-state load in this trace."""
    events = [(t, f"{name} {args}") for t, name, args in bm._trace(trace)]
    ends = [i for i, (_, e) in enumerate(events) if e.startswith("qemu_loadvm_state_post_main")]
    if not ends:
        return {}
    # the device states follow the last RAM record ('vmstate_load ram')
    start = max((i for i in range(ends[-1]) if events[i][1].startswith("vmstate_load ram")),
                default=0)
    out: dict[str, float] = {}
    i = start
    for step, first, last in STEPS:
        a = next((k for k in range(i, ends[-1] + 1) if first in events[k][1]), None)
        if a is None:
            continue
        b = next((k for k in range(a, ends[-1] + 1) if last in events[k][1]), None)
        if b is None:
            continue
        out[step] = (events[b][0] - events[a][0]) * 1000
        i = b
    out["device states"] = (events[ends[-1]][0] - events[start + 1][0]) * 1000
    out["vfio-user messages"] = sum(
        1 for _, e in events[start:ends[-1]] if e.startswith("vfio_user_send_write"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("configs", nargs="+")
    args = p.parse_args()
    configs = {c.key: c for c in bm.CONFIGS}
    unknown = [k for k in args.configs if k not in configs]
    if unknown:
        p.error(f"unknown configuration {unknown[0]} (one of {', '.join(configs)})")
    bm.TRACE_EVENTS = bm.TRACE_EVENTS + EXTRA_EVENTS  # type: ignore[assignment]
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in args.configs}
    with short_tmpdir("vfd-") as tmp:
        lab = Lab(tmp)
        lab.up()
        try:
            nics = {"a": lab.start_nic("a", 2, 1), "b": lab.start_nic("b", 2, 2)}
            guests = {k: bm.PingPong(lab, configs[k].guest, nics) for k in args.configs}
            for i in range(args.runs):
                for key in args.configs:
                    pp = guests[key]
                    if pp.vm is None:
                        pp.boot()
                    r = pp.migrate(configs[key], i, 2.0)
                    steps = destination_steps(pp.vm.run_dir / "trace.log") if pp.vm else {}
                    qemu = r.summary.get("qemu_steps", {})
                    if "vf_find_dst_ms" in qemu and "vf_load_ms" in qemu:
                        steps["dbus-vmstate"] = qemu["vf_find_dst_ms"] + qemu["vf_load_ms"]
                    steps.update({"VM downtime": r.vm_downtime_ms or 0.0,
                                  "guest pause": r.pause_ms or 0.0,
                                  "network downtime": r.net_downtime_ms or 0.0})
                    rows[key].append(steps)
                    print(key, i, {k: round(v, 1) for k, v in steps.items()}, flush=True)
            for pp in guests.values():
                pp.close()
        finally:
            lab.down()
    names = ["VM downtime", "guest pause", "network downtime", "device states",
             "dbus-vmstate", *(s for s, _, _ in STEPS), "vfio-user messages"]
    out = []
    for name in names:
        cells: list[object] = [name]
        for key in args.configs:
            vals = [r[name] for r in rows[key] if name in r]
            cells.append(f"{statistics.median(vals):.1f} ({min(vals):.1f}–{max(vals):.1f})"
                         if vals else "–")
        out.append(cells)
    print(table(["ms (median, min–max)", *args.configs], out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
