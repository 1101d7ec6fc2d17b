"""Runs inside the guest (`python3 -m vfnic.bench.guest_regs`, standard library only):
register reads and posted writes on the vfnic VF's BAR0 through sysfs resource0,
next to a loop over guest RAM and QEMU's own emulated edu device.

Prints one line, ``@@REGS {json}``: rates (operations per second) per run for
"loop", "reads", "writes" and "emulated" (or "emulated_error").
"""

from __future__ import annotations

import argparse
import glob
import json
import mmap
import os
import struct
import time
from collections.abc import Callable

from vfnic.regs import table as T
from vfnic.regs.ids import VENDOR_ID, VF_DEVICE_ID

CHUNK = 500  # operations between clock reads
EDU_DEVICE_ID = 0x11E8  # QEMU's edu device (same vendor ID as ours)
PCI_COMMAND, COMMAND_MEMORY = 0x04, 1 << 1


def find(vendor: int, device: int) -> str | None:
    """The sysfs folder of the first function with these IDs."""
    for d in sorted(glob.glob("/sys/bus/pci/devices/*")):
        with open(d + "/vendor") as v, open(d + "/device") as dv:
            if int(v.read(), 16) == vendor and int(dv.read(), 16) == device:
                return d
    return None


def bar(d: str, index: int, size: int) -> memoryview:
    """BAR ``index`` of the function in ``d``, mapped as 32-bit words."""
    fd = os.open(d + "/config", os.O_RDWR)
    cmd = struct.unpack("<H", os.pread(fd, 2, PCI_COMMAND))[0]
    if not cmd & COMMAND_MEMORY:
        os.pwrite(fd, struct.pack("<H", cmd | COMMAND_MEMORY), PCI_COMMAND)
    os.close(fd)
    fd = os.open(f"{d}/resource{index}", os.O_RDWR | os.O_SYNC)
    m = mmap.mmap(fd, size)
    os.close(fd)
    return memoryview(m).cast("I")


def rate(op: Callable[[int], None], secs: float) -> float:
    n = 0
    t0 = time.perf_counter()
    end = t0 + secs
    while True:
        op(CHUNK)
        n += CHUNK
        t = time.perf_counter()
        if t >= end:
            return n / (t - t0)


def measure(secs: float, runs: int) -> dict[str, object]:
    vf = find(VENDOR_ID, VF_DEVICE_ID)
    if vf is None:
        raise SystemExit(f"no vfnic VF ({VENDOR_ID:04x}:{VF_DEVICE_ID:04x})")
    regs = bar(vf, 0, T.BAR0_SIZE)
    status, mta = T.STATUS.offset // 4, T.MTA.offset // 4

    def reads(k: int, r: memoryview = regs, i: int = status) -> None:
        for _ in range(k):
            r[i]

    def writes(k: int, r: memoryview = regs, i: int = mta, s: int = status) -> None:
        for n in range(k):
            r[i] = n  # a posted write
        r[s]  # one read: the writes have reached the device

    ram = memoryview(bytearray(T.BAR0_SIZE)).cast("I")

    def loop(k: int, r: memoryview = ram, i: int = status) -> None:
        for _ in range(k):
            r[i]

    out: dict[str, object] = {
        "loop": [rate(loop, secs / 4) for _ in range(runs)],
        "reads": [rate(reads, secs) for _ in range(runs)],
        "writes": [rate(writes, secs) for _ in range(runs)],
    }
    try:
        edu = find(VENDOR_ID, EDU_DEVICE_ID)
        if edu is None:
            raise LookupError("no edu device")
        ve = bar(edu, 0, 0x1000)

        def emu(k: int, r: memoryview = ve) -> None:
            for _ in range(k):
                r[0]  # the edu device's identification register, emulated by QEMU

        out["emulated"] = [rate(emu, secs) for _ in range(runs)]
    except (OSError, LookupError) as exc:
        out["emulated_error"] = f"{type(exc).__name__}: {exc}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python3 -m vfnic.bench.guest_regs")
    p.add_argument("--secs", type=float, default=1.0, help="seconds per run")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    print("@@REGS " + json.dumps(measure(args.secs, args.runs)), flush=True)


if __name__ == "__main__":
    main()
