"""A quick loop over the datapath benchmark's guest rows (vfnic.bench.datapath), for
iterating on the VF's per-frame path: 64 B frames (--payloads), both directions, ping first,
guests one after the other on one `vfnic serve` in a fresh lab, with the per-frame
costs (server counters, guest interrupts) of each row.

    python scripts/guest_datapath_quick.py [--dur S] [--ping N] KIND[:KERNEL_ARG+KERNEL_ARG] ...

KIND is kvf (the kernel driver), vf (the Python driver model) or virtio; kernel
arguments after a colon go to that guest (e.g. kvf:vfnic_vf.tx_bql=0 or
kvf:vfnic_vf.rx_usecs=0), so variants can be interleaved in one run. Needs root.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import vfnic.host.vm as vm
from vfnic.bench import datapath as dp
from vfnic.bench.common import short_tmpdir, table
from vfnic.migrate.lab import Lab


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dur", type=float, default=4.0, help="seconds per UDP row")
    p.add_argument("--json", help="write the raw results here")
    p.add_argument("--payloads", default="18", help="UDP payload sizes, comma-separated")
    p.add_argument("--ping", type=int, default=40, help="pings before the UDP rows")
    p.add_argument("kinds", nargs="+")
    args = p.parse_args()
    dp.PAYLOADS = tuple(int(x) for x in args.payloads.split(","))  # type: ignore[assignment]
    plain = vm.guest_net_args
    results: list[tuple[str, dict[str, Any]]] = []
    with short_tmpdir("vfq-") as tmp:
        lab = Lab(tmp / "lab")
        (tmp / "lab").mkdir()
        lab.up()
        try:
            nic = lab.start_nic("a", vfs=2, nic_id=1)
            for spec in args.kinds:
                kind, _, extra = spec.partition(":")
                more = extra.split("+") if extra else []
                vm.guest_net_args = lambda *a, _m=more, **k: plain(*a, **k) + _m  # type: ignore[misc]
                results.append((spec, dp.guest_datapath(lab, kind, nic, args.dur, args.ping)))
        finally:
            vm.guest_net_args = plain  # type: ignore[misc]
            lab.down()
    rows: list[list[object]] = []
    costs: list[list[object]] = []
    for spec, r in results:
        kind = spec.partition(":")[0]
        p_ = r.get("ping", {})
        for row in dp.guest_rows(kind, r):
            rows.append([spec, *row[1:5], f"{p_.get('avg', 0):.3f}"])
        costs += [[spec, *c[1:]] for c in dp.cost_rows(kind, r)]
    print(table(["guest", "direction", "frame", "offered/s", "received/s", "ping avg ms"], rows))
    print()
    print(table(["guest", "direction", "frame", "frames", "messages/frame", "doorbells/frame",
                 "frames/batch", "MSI-X/frame", "guest irqs/frame", "server CPU µs/frame"],
                costs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
