"""The server's per-frame path in process, no client and no QEMU: frames/s of
  tx   a TX doorbell of vf0 (32 descriptors) -> DataPath.transmit -> switch -> vf1's RX ring
  rx   a burst of 32 frames from the uplink -> switch -> vf1's RX ring (Switch.from_uplink_burst)
with guest memory a memfd sealed against shrinking mapped as DMA regions (as QEMU's memory)
and vf1's queue interrupt an eventfd.

  python scripts/frame_path.py [--rounds N] [--frames N] [--batch N] [--rs-every N]
                               [--gap MS] [--vfs N] [--before DIR]

Time is the measuring thread's CPU time (user + system, time.thread_time), so other
processes on a shared machine slow it less than they slow the wall clock. --batch 1
is a lone frame (a ping): the per-batch work, once per frame. --rs-every: TX descriptors
ask for a report (RS) every N frames (default: once per batch, as vfnic_vf does; 1: every
frame, as the Python driver model does). --gap MS sleeps that long before each batch,
as a lone ping's frame finds the server (frames then default to 200): on a shared
machine its code and data have left the CPU's caches meanwhile, and the same path costs
several times its back-to-back figure.

With --before DIR (a checkout of the tree to compare, e.g. `git archive REV vfnic |
tar -x -C DIR`), each round runs both trees in fresh processes, interleaved, and
prints medians (min-max) of each. Without, it runs this tree only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

MEM = 0x10000  # IOVA of the guest memory
SIZE = 0x100000
RING = 256  # descriptors per ring
BATCH = 32  # frames per doorbell / uplink burst (--batch)
TX_RING, RX_RING, BUFFERS = 0x0, 0x2000, 0x8000  # offsets in the guest memory


def measure(kind: str, frames: int, batch: int = BATCH, rs_every: int = BATCH,
            gap: float = 0.0, vfs: int = 2) -> float:
    """ns per frame of ``kind`` ("tx" or "rx") through the tree on sys.path."""
    from vfnic.device import pci
    from vfnic.device.nic import Nic
    from vfnic.regs import descriptors as D
    from vfnic.regs import table as T
    from vfnic.vfiouser import wire

    nic = Nic(vfs)  # vf0 sends, vf1 receives; the others idle, as a NIC's spare VFs
    src, dst = nic.vfs[:2]
    mem = {}
    for fn in (src, dst):
        # sealed as QEMU's memory-backend-memfd seals guest RAM (its default, seal=on)
        fd = os.memfd_create("frame-path", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        mem[fn.name] = fd
        fn.dma.map(MEM, SIZE, 3, 0, os.dup(fd))
        fn.config.set(pci.COMMAND, 2, fn.config.get(pci.COMMAND, 2) | pci.COMMAND_MASTER)
        fn.session = types.SimpleNamespace(endpoint=None)  # type: ignore[assignment]
        fn.irq_fds[(wire.PciIrq.MSI, 0)] = os.eventfd(0, os.EFD_NONBLOCK)
        for ring, off in ((T.TX, TX_RING), (T.RX, RX_RING)):
            fn.bank.set(ring.DBAL(0), MEM + off)
            fn.bank.set(ring.DLEN(0), RING * D.DESC_SIZE)
            fn.bank.set(ring.XDCTL(0), T.QCTL_ENABLE)
        fn.bank.set(T.EIMS, 0xFFFFFFFF)
        fn.bank.set_bits(T.CTRL, T.CTRL_SLU)
        nic._update_link(fn)
        fn.load_mac(fn.perm_mac)
    frame = dst.rx_mac + src.rx_mac + (0x88B5).to_bytes(2, "big") + bytes(46)
    os.pwrite(mem["vf0"], frame, BUFFERS)
    for i in range(RING):
        cmd = D.CMD_EOP | (D.CMD_RS if i % rs_every == rs_every - 1 else 0)
        os.pwrite(mem["vf0"], D.TX_DESC.pack(MEM + BUFFERS, len(frame), 0, cmd, 0, 0, 0),
                  TX_RING + i * D.DESC_SIZE)
        os.pwrite(mem["vf1"], struct.pack("<QQ", MEM + BUFFERS + i * 2048, 0),
                  RX_RING + i * D.DESC_SIZE)
    rounds = frames // batch
    start = time.thread_time()
    with nic.lock:
        for _ in range(rounds):
            if gap:
                time.sleep(gap)  # not counted: thread CPU time
            dst.bank.set(T.RDT(0), (dst.bank.get(T.RDH(0)) - 1) % RING)  # all posted
            if kind == "tx":
                src.bank.set(T.TDT(0), (src.bank.get(T.TDH(0)) + batch) % RING)
                src.datapath.on_tail_write(T.TX, 0)
            else:
                nic.switch.from_uplink_burst([frame] * batch)
    elapsed = time.thread_time() - start
    got = dst.bank.get(T.GPRC)
    if got != rounds * batch:
        raise SystemExit(f"{kind}: vf1 received {got} of {rounds * batch} frames")
    return elapsed / (rounds * batch) * 1e9


def run_tree(tree: Path, kind: str, frames: int, batch: int, rs_every: int,
             gap_ms: float, vfs: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, __file__, "--one", kind, "--frames", str(frames),
                          "--batch", str(batch), "--rs-every", str(rs_every),
                          "--gap", str(gap_ms), "--vfs", str(vfs)],
                         env=env, check=True, capture_output=True, text=True, cwd=tree)
    return float(json.loads(out.stdout)["ns"])


def stat(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--frames", type=int, help="frames per round (default 9600, with "
                    "--gap 200)")
    ap.add_argument("--before", type=Path, help="a tree to compare with, interleaved")
    ap.add_argument("--batch", type=int, default=BATCH, help="frames per doorbell / burst")
    ap.add_argument("--rs-every", type=int, help="RS every N TX descriptors (default: --batch)")
    ap.add_argument("--gap", type=float, default=0.0, metavar="MS",
                    help="sleep before each batch (a lone frame's cold path)")
    ap.add_argument("--vfs", type=int, default=2, help="VFs of the NIC (default 2; "
                    "`vfnic serve` has 4)")
    ap.add_argument("--one", choices=("tx", "rx"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    rs_every = args.rs_every or args.batch
    if not 0 <= args.gap <= 1000:
        ap.error("--gap must be between 0 and 1000 ms")
    if not 2 <= args.vfs <= 8:
        ap.error("--vfs must be between 2 and 8 (TotalVFs)")
    frames = args.frames or (200 if args.gap else 9600)
    if args.one:
        print(json.dumps({"ns": measure(args.one, frames, args.batch, rs_every,
                                        args.gap / 1000, args.vfs)}))
        return
    here = Path(__file__).resolve().parent.parent
    trees = {"after": here} if args.before is None else {"before": args.before, "after": here}
    res: dict[str, dict[str, list[float]]] = {k: {t: [] for t in trees} for k in ("tx", "rx")}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for kind in res:
            for tree in order:
                res[kind][tree].append(run_tree(trees[tree], kind, frames, args.batch,
                                                rs_every, args.gap, args.vfs))
    gap = f", {args.gap:g} ms before each batch" if args.gap else ""
    print(f"{args.rounds} interleaved rounds of {frames} frames (60 B), {args.vfs} VFs, "
          f"batches of {args.batch}, RS every {rs_every}{gap}, thread CPU time; "
          "median (min–max)")
    for kind, by_tree in res.items():
        cols = [f"{t}: {stat(v)} ns/frame = {1e9 / statistics.median(v):,.0f} frames/s"
                for t, v in by_tree.items()]
        print(f"{kind}: " + "; ".join(cols))


if __name__ == "__main__":
    main()
