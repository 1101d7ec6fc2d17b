"""Section "regs": BAR0 register access cost.

1. Our vfio-user client against a `vfnic serve` process: read round trips and
   posted writes per second, for three CPU placements of the two processes.
   Floors measured beside it: the device model's register read alone (in
   process, no transport) and a Python AF_UNIX echo round trip.
2. Inside a TCG guest: python3 mmaps the VF's resource0 and times reads of
   STATUS and posted writes of MTA, next to a read of a register QEMU emulates
   itself (virtio-blk BAR4) and the bare Python loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vfnic.bench.common import (
    Section,
    Stat,
    Worker,
    log,
    met,
    percentile,
    serve,
    short_tmpdir,
    stat_text,
    table,
    worker_argv,
)

STATUS, MTA = 0x0008, 0x0028
READ_TARGET_US = 50.0


@contextlib.contextmanager
def affinity(cpus: set[int] | None) -> Iterator[None]:
    """Pin this process to ``cpus`` for the duration (None: leave it alone)."""
    if cpus is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


BUSY_POLL_US = 200


def placements() -> list[tuple[str, str | None, set[int] | None]]:
    """(name, server taskset cpus, client cpus)."""
    out: list[tuple[str, str | None, set[int] | None]] = [
        ("unpinned", None, None), ("same core (both on CPU 0)", "0", {0})]
    if (os.cpu_count() or 1) >= 2:
        out.append(("different cores (client CPU 0, server CPU 1)", "1", {0}))
    return out


BUSY = f"unpinned, busy polling {BUSY_POLL_US} us (client and server)"


def _rate(fn: Callable[[int], None], n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def client_run(sock: str, n_read: int, n_write: int,
               timed: bool, busy_poll_us: int = 0) -> dict[str, Any]:
    """One run against one (fresh) server: rates, and optionally per-op latencies."""
    from vfnic.vfiouser.client import VfioUserClient

    c = VfioUserClient(sock, busy_poll=busy_poll_us / 1e6)
    try:
        def reads(n: int) -> None:
            for _ in range(n):
                c.read32(0, STATUS)

        def posted(n: int) -> None:
            for i in range(n):
                c.write32(0, MTA, i, posted=True)
            c.read32(0, MTA)  # the server handles messages in order: all writes done

        def writes(n: int) -> None:
            for i in range(n):
                c.write32(0, MTA, i)

        reads(200)  # warm up
        out: dict[str, Any] = {"read": _rate(reads, n_read), "posted": _rate(posted, n_write),
                               "write": _rate(writes, n_read)}
        if timed:
            lat: list[float] = []
            for _ in range(n_read):
                t0 = time.perf_counter_ns()
                c.read32(0, STATUS)
                lat.append((time.perf_counter_ns() - t0) / 1000)
            out["lat"] = lat
    finally:
        c.close()
    return out


def client_runs(folder: Path, srv_cpus: str | None, cli_cpus: set[int] | None, runs: int,
                n_read: int, n_write: int, busy_poll_us: int = 0) -> dict[str, Any]:
    """``runs`` runs, each against a fresh `vfnic serve` (the scheduler places a new
    process pair each time; that placement is much of the variance)."""
    reads, posted, writes = [], [], []
    lat: list[float] = []
    for r in range(runs):
        with serve(folder / f"r{r}", vfs=2, cpus=srv_cpus, busy_poll_us=busy_poll_us) as nic, \
                affinity(cli_cpus):
            res = client_run(str(nic / "vf0.sock"), n_read, n_write, timed=True,
                             busy_poll_us=busy_poll_us)
        reads.append(res["read"])
        posted.append(res["posted"])
        writes.append(res["write"])
        lat += res["lat"]
    return {"read_rates": reads, "posted_rates": posted, "write_rates": writes,
            "read_p50": percentile(lat, 50), "read_p99": percentile(lat, 99),
            "read_min": min(lat)}


def echo_floor(path: Path, runs: int, n: int, echo_cpu: int | None,
               cli_cpus: set[int] | None) -> list[float]:
    """Round trips per second of a 32-byte message through a Python echo process
    (pinned to ``echo_cpu``: it inherits our affinity when it is started)."""
    import socket

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with affinity(None if echo_cpu is None else {echo_cpu}):
        w = Worker(worker_argv("echo", "--path", str(path)))
    try:
        with affinity(cli_cpus):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            msg = bytes(32)

            def rt(k: int) -> None:
                for _ in range(k):
                    s.sendall(msg)
                    s.recv(4096)

            rt(200)
            rates = [_rate(rt, n) for _ in range(runs)]
            s.close()
        w.result(stop=False, timeout=10)
        return rates
    finally:
        w.kill()


def device_model_floor(n: int) -> float:
    """Reads per second of the device model itself (vfnic.device.nic.Nic, in process)."""
    from vfnic.device.nic import Nic

    nic = Nic(2)
    fn = nic.vfs[0]

    def reads(k: int) -> None:
        for _ in range(k):
            fn.region_read(0, STATUS, 4)

    reads(1000)
    return max(_rate(reads, n) for _ in range(3))


# -- inside the guest ---------------------------------------------------------------------

def guest_regs(runs: int, secs: float, busy_poll_us: int = 0) -> dict[str, Any]:
    from vfnic.host.vm import VM, VfioUserFunction, guest_net_args

    with short_tmpdir("vfb-") as tmp, serve(tmp / "nic", vfs=2,
                                            busy_poll_us=busy_poll_us) as nic:
        # vfnic/bench/guest_regs.py, a module of the image's /opt/vfnic
        script = f"python3 -m vfnic.bench.guest_regs --secs {secs!r} --runs {runs}"
        # QEMU's "edu" device: a register QEMU emulates itself, for comparison.
        # The script maps the VF's BAR0 itself: no kernel driver may hold it.
        vm = VM([VfioUserFunction(nic / "vf0.sock", "vf0")], command=script,
                extra_args=["-device", "edu"], kernel_args=guest_net_args(driver="python"))
        with vm:
            status = vm.wait_exec(timeout=120 + 6 * runs * secs)
        m = re.search(r"@@REGS (\{.*\})", vm.output)
        if status != 0 or not m:
            raise RuntimeError(f"guest script failed (status {status}): {vm.output[-800:]}")
        return dict(json.loads(m.group(1)))


# -- the section --------------------------------------------------------------------------


def _us(rates: list[float]) -> list[float]:
    return [1e6 / r for r in rates]


def run(quick: bool = False) -> Section:
    sec = Section("regs", "Register access")
    runs = 3 if quick else 7
    n_read, n_write = (2000, 5000) if quick else (5000, 20000)
    rows: list[list[object]] = []
    per: dict[str, dict[str, Any]] = {}
    with short_tmpdir("vfb-") as tmp:
        runs_of = [(name, srv, cli, 0) for name, srv, cli in placements()]
        runs_of.append((BUSY, None, None, BUSY_POLL_US))
        for i, (name, srv_cpus, cli_cpus, busy) in enumerate(runs_of):
            log(f"regs: client -> vfnic serve, {name}")

            def one(srv_cpus: str | None = srv_cpus, cli_cpus: set[int] | None = cli_cpus,
                    i: int = i, busy: int = busy) -> dict[str, Any]:
                return client_runs(tmp / f"p{i}", srv_cpus, cli_cpus, runs, n_read, n_write,
                                   busy)

            res = sec.attempt(f"client register benchmark ({name})", one)
            if res is None:
                rows.append([name, "failed", "", "", "", ""])
                continue
            per[name] = res
            rr = Stat.of(res["read_rates"])
            assert rr is not None
            rows.append([
                name,
                stat_text(res["read_rates"], "{:,.0f}"),
                stat_text(_us(res["read_rates"]), "{:.1f}"),
                f"{res['read_p50']:.1f} / {res['read_p99']:.1f}",
                stat_text(res["write_rates"], "{:,.0f}"),
                stat_text(res["posted_rates"], "{:,.0f}"),
                stat_text(_us(res["posted_rates"]), "{:.1f}"),
            ])
        log("regs: floors (device model in process, Python AF_UNIX echo)")
        floors: dict[str, Any] = {}
        dm = sec.attempt("device model floor", lambda: device_model_floor(20000))
        if dm is not None:
            floors["device_model"] = dm
        for name, srv_cpus, cli_cpus in placements():
            def echo(srv_cpus: str | None = srv_cpus,
                     cli_cpus: set[int] | None = cli_cpus) -> list[float]:
                cpu = None if srv_cpus is None else int(srv_cpus)
                return echo_floor(tmp / "echo.sock", runs, n_write, cpu, cli_cpus)

            r = sec.attempt(f"echo floor ({name})", echo)
            if r is not None:
                floors[f"echo {name}"] = r
    sec.data["client"] = per
    sec.data["floors"] = floors

    unpinned = per.get("unpinned")
    med_read_us = None
    if unpinned:
        med_read_us = 1e6 / (Stat.of(unpinned["read_rates"]) or Stat(1, 1, 1, 1)).median
    sec.data["read_rtt_us"] = med_read_us
    best = min((1e6 / (Stat.of(r["read_rates"]) or Stat(1, 1, 1, 1)).median
                for r in per.values()), default=None)

    log("regs: register access from inside a TCG guest")
    guest = sec.attempt("in-guest register benchmark",
                        lambda: guest_regs(3 if quick else 5, 1.0 if quick else 2.0))
    sec.data["guest"] = guest
    log(f"regs: register access from inside a TCG guest, server --busy-poll {BUSY_POLL_US}")
    guest_busy = sec.attempt("in-guest register benchmark (busy polling)",
                             lambda: guest_regs(3 if quick else 5, 1.0 if quick else 2.0,
                                                BUSY_POLL_US))
    sec.data["guest_busy"] = guest_busy

    # -- markdown --
    sec.add(f"Our vfio-user client (`vfnic.vfiouser.client.VfioUserClient`, Python) against a "
            f"`python -m vfnic.cli serve` process: BAR0 reads of STATUS (a full round trip: "
            f"request, server, reply), non-posted and posted writes of MTA. Median of {runs} "
            f"runs (min–max), each run against a freshly started server; reads: {n_read:,} "
            f"per run, posted writes: {n_write:,} per run followed by one read that waits "
            f"for them all. p50/p99 over {n_read:,} individually timed reads per run, "
            f"all runs pooled.")
    sec.add(table(["placement", "reads/s", "read RTT µs", "read p50 / p99 µs",
                   "non-posted writes/s", "posted writes/s", "µs per posted write"], rows))
    frows: list[list[object]] = []
    if "device_model" in floors:
        frows.append(["device model only: `Nic` register read in process, no transport",
                      f"{floors['device_model']:,.0f}", f"{1e6 / floors['device_model']:.2f}"])
    for k, v in floors.items():
        if k.startswith("echo "):
            s = Stat.of(v)
            assert s is not None
            frows.append([f"Python AF_UNIX echo round trip, 32 B ({k[5:]})",
                          stat_text(v, "{:,.0f}"), f"{1e6 / s.median:.1f}"])
    if frows:
        sec.add("Floors, measured in the same run:")
        sec.add(table(["what", "round trips/s", "µs"], frows))
    same = floors.get("echo same core (both on CPU 0)")
    split = floors.get("echo different cores (client CPU 0, server CPU 1)")
    if same and split:
        s_us = 1e6 / statistics.median(same)
        d_us = 1e6 / statistics.median(split)
        sec.add(f"A round trip between two processes costs {s_us:.1f} µs on one core and "
                f"{d_us:.1f} µs across the two cores of this machine (the Python echo "
                f"above): each cross-core wakeup adds about {(d_us - s_us) / 2:.0f} µs.")
    if med_read_us is not None:
        ok = med_read_us < READ_TARGET_US
        sec.add(f"**Target: read round trip < {READ_TARGET_US:.0f} µs** — {met(ok)} with the "
                f"default (unpinned) scheduling: median {med_read_us:.1f} µs"
                + (f"; best placement {best:.1f} µs ({met(best < READ_TARGET_US)} there)."
                   if best is not None else "."))
        sec.data["read_target_met"] = ok
        busy_res = per.get(BUSY)
        busy_s = Stat.of(busy_res["read_rates"]) if busy_res else None
        if busy_s is not None:
            b_us = 1e6 / busy_s.median
            sec.add(f"With busy polling (`vfnic serve --busy-poll {BUSY_POLL_US}` and "
                    f"`VfioUserClient(busy_poll={BUSY_POLL_US / 1e6:g})`: each side polls "
                    f"its socket for {BUSY_POLL_US} µs before sleeping), unpinned: median "
                    f"{b_us:.1f} µs — {met(b_us < READ_TARGET_US)}.")
            sec.data["read_rtt_busy_us"] = b_us
    if guest:
        grows: list[list[object]] = []

        def g(key: str, label: str) -> None:
            if key in guest:
                s = Stat.of(guest[key])
                assert s is not None
                grows.append([label, stat_text(guest[key], "{:,.0f}"),
                              f"{1e6 / s.median:.1f}"])

        g("reads", "VF BAR0 read (STATUS), through QEMU's vfio-user client to vfnic")
        g("writes", "VF BAR0 posted write (MTA), + one read per 500")
        g("emulated", "QEMU-emulated register read (`-device edu` BAR0 ID), no vfio-user")
        g("loop", "the Python loop alone (a read of guest RAM)")
        guest_busy = sec.data.get("guest_busy") or {}
        for key, label in (("reads", "VF BAR0 read (STATUS), server --busy-poll "
                            f"{BUSY_POLL_US}"),
                           ("writes", f"VF BAR0 posted write (MTA), server --busy-poll "
                            f"{BUSY_POLL_US}")):
            if key in guest_busy:
                s_b = Stat.of(guest_busy[key])
                assert s_b is not None
                grows.append([label, stat_text(guest_busy[key], "{:,.0f}"),
                              f"{1e6 / s_b.median:.1f}"])
        sec.add("Inside a TCG guest (1 vCPU): python3 mmaps the VF's `resource0` and times "
                "register accesses for 2 s per run; median of the guest's runs (min–max):")
        sec.add(table(["guest access", "per second", "µs each"], grows))
        if "emulated_error" in guest:
            sec.add(f"(QEMU-emulated register baseline unavailable: {guest['emulated_error']})")
    return sec


if __name__ == "__main__":  # pragma: no cover - manual use
    print("\n\n".join(run(quick="--quick" in sys.argv).parts))
