"""The kernel driver's RESUME inside a cooperative migration against SUSPEND/RESUME
cycles on the same destination right after it and two seconds later (and on the source
before it): the driver's own microseconds, from its acknowledgements.

    python scripts/resume_after_migration.py [--runs N] [--cycles N]

One VF guest (the kernel driver) in a fresh lab, migrated back and forth with `vfnic
migrate` in cooperative mode by the migration section's machinery (PingPong). Needs
root.
"""

from __future__ import annotations

import argparse
import time

from vfnic.bench import migration as M
from vfnic.bench.common import short_tmpdir, stat_text
from vfnic.bench.kmod import suspend_resume
from vfnic.migrate.lab import Lab


def _ms(values: list[float]) -> str:
    """Driver microseconds as ms, median (min-max)."""
    return stat_text([v / 1000 for v in values], "{:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="migrations")
    p.add_argument("--cycles", type=int, default=5, help="SUSPEND/RESUME cycles per point")
    args = p.parse_args()
    cfg = next(c for c in M.CONFIGS if c.key == "vf-cooperative")
    rows: list[str] = []
    with short_tmpdir("vfc-") as tmp:
        lab = Lab(tmp)
        lab.up()
        try:
            dirs = {"a": lab.start_nic("a", 2, 1), "b": lab.start_nic("b", 2, 2)}
            pp = M.PingPong(lab, "vf", dirs)
            pp.boot()
            time.sleep(2)
            try:
                for i in range(args.runs):
                    before = suspend_resume(dirs[pp.side], args.cycles)
                    run = pp.migrate(cfg, i, 3.0)
                    at_once = suspend_resume(dirs[pp.side], args.cycles)
                    time.sleep(2)
                    later = suspend_resume(dirs[pp.side], args.cycles)
                    s = run.summary
                    rows.append(
                        f"| {i + 1} | {run.direction} | {_ms(before['resume_us'])} | "
                        f"{_ms([float(s['suspend_us'])] if s.get('suspend_us') else [])} | "
                        f"{_ms([float(s['resume_us'])] if s.get('resume_us') else [])} | "
                        f"{_ms(at_once['resume_us'])} | {_ms(later['resume_us'])} |")
                    print(rows[-1], flush=True)
            finally:
                pp.close()
        finally:
            lab.down()
    print("\n| run | hosts | resume on the source before, ms | suspend in the migration | "
          "resume in the migration | resume on the destination at once | 2 s later |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
