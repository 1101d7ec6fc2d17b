"""`python -m vfnic.bench`: run the benchmark sections, write BENCHMARKS.md and
docs/bench/migration.png and virsh.png. Progress goes to stderr. Exit status 1 if anything
failed (the failures are also written into BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from vfnic.bench import report
from vfnic.bench.common import ForeignCpu, Section, log, machine

REPO = Path(__file__).resolve().parents[2]


def command_line(argv: list[str]) -> str:
    if not argv and os.environ.get("MAKELEVEL"):
        return "make bench"
    return " ".join(["python -m vfnic.bench", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m vfnic.bench", description=__doc__)
    p.add_argument("--only", default=",".join(report.ORDER),
                   help="comma-separated sections: regs, datapath, migration, virsh, isolation, "
                   "kmod (default: all)")
    p.add_argument("--runs", type=int, default=None,
                   help="migration runs per configuration (default 15, virsh 10; 2 with --quick); "
                        "kmod: rounds (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="shorter runs, for trying the bench out (numbers still written)")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "bench" / "migration.png")
    p.add_argument("--no-write", action="store_true", help="print the report, write nothing")
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in report.ORDER]
    if unknown:
        p.error(f"unknown section(s): {', '.join(unknown)}")
    if os.geteuid() != 0:
        log("warning: not root: the datapath and migration sections need network namespaces")

    m = machine()
    cmd = command_line(argv)
    log(f"vfnic bench: {', '.join(keys)} on {m['nproc']} × {m['cpu']}, {m['accel']}; "
        f"{m['qemu']}")
    t0 = time.monotonic()
    done: list[tuple[Section, str]] = []
    for key in report.ORDER:
        if key not in keys:
            continue
        log(f"=== section {key} ===")
        started = time.monotonic()
        foreign = ForeignCpu()
        try:
            if key == "regs":
                from vfnic.bench import regs

                sec = regs.run(args.quick)
            elif key == "datapath":
                from vfnic.bench import datapath

                sec = datapath.run(args.quick, None if args.no_write
                                   else args.plot.with_name("datapath.png"))
            elif key == "isolation":
                from vfnic.bench import isolation

                sec = isolation.run(args.quick)
            elif key == "migration":
                from vfnic.bench import migration

                plot = None if args.no_write else args.plot
                sec = migration.run(args.quick, args.runs, plot)
            elif key == "kmod":
                from vfnic.bench import kmod

                sec = kmod.run(args.quick, args.runs,
                               None if args.no_write else args.plot.with_name("kmod.png"))
            else:
                from vfnic.bench import virsh

                plot = None if args.no_write else args.plot.with_name("virsh.png")
                sec = virsh.run(args.quick, args.runs, plot)
        except Exception as exc:  # the section itself broke: report it, go on
            sec = Section(key, key)
            sec.fail(f"section {key}", exc)
        sec.seconds = time.monotonic() - started
        sec.foreign = foreign.text()
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        done.append((sec, load))
        log(f"=== section {key} done in {sec.seconds:.0f} s"
            + (f", {len(sec.failures)} failure(s)" if sec.failures else "") + " ===")
        if not args.no_write:
            report.write(args.output, done, m, cmd)  # after each section: partial results kept
    if args.no_write:
        for sec, load in done:
            print(report.render(sec, m, cmd, load) + "\n")
    else:
        log(f"wrote {args.output}" + (f" and {args.plot}" if "migration" in keys else ""))
    failures = [f for sec, _ in done for f in sec.failures]
    log(f"vfnic bench: finished in {time.monotonic() - t0:.0f} s"
        + (f", {len(failures)} failure(s):" if failures else ", no failures"))
    for f in failures:
        log(f"  {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
