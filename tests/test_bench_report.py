"""BENCHMARKS.md: a bench run replaces its section's block and keeps the rest of the
file, the fixed prose between the blocks included; the lab's Pinger (the one the
bench, the tests and the demo use) is read while it runs."""

from __future__ import annotations

import time
from pathlib import Path

from vfnic.bench.common import Section
from vfnic.bench.report import begin, end, write
from vfnic.migrate.lab import PEER_IP, Lab, Pinger

MACHINE = {"date": "today", "nproc": "2", "cpu": "cpu", "kernel": "k", "debian": "d",
           "python": "p", "qemu": "q", "accel": "TCG", "load": "0"}


def test_write_replaces_only_its_block(tmp_path: Path) -> None:
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n\n{begin('regs')}\nold regs\n{end('regs')}\n\n### Reading 1\n\n"
                   f"fixed prose\n\n{begin('migration')}\nold migration\n{end('migration')}\n"
                   f"\n<!-- layers:begin -->\nhand-written section\n<!-- layers:end -->\n")
    sec = Section("migration", "Live migration")
    sec.add("new numbers")
    write(doc, [(sec, "0")], MACHINE, "python -m vfnic.bench --only migration")
    text = doc.read_text()
    assert "new numbers" in text and "old migration" not in text
    for kept in ("# head", "old regs", "### Reading 1\n\nfixed prose", "hand-written section"):
        assert kept in text
    assert text.index("fixed prose") < text.index("new numbers")
    # a section not yet in the file goes after the one before it, nothing else moves
    assert text.index(end("migration")) < text.index(begin("virsh")) < text.index("layers:b")
    assert text.index(end("regs")) < text.index(begin("datapath")) < text.index("Reading 1")


def test_pinger_replies_are_read_while_it_runs(lab: Lab) -> None:
    pinger = Pinger(lab, PEER_IP, 0.05)  # the peer pings its own address: real ICMP
    pinger.start()
    t0 = time.time()
    try:
        deadline = time.monotonic() + 10
        while pinger.replies_after(t0) < 3:
            assert time.monotonic() < deadline, pinger.output
            time.sleep(0.05)
        assert pinger.proc is not None and pinger.proc.poll() is None  # still running
    finally:
        pinger.stop()
    sent, received = pinger.loss()
    assert sent >= 3 and received == len(pinger.replies()) >= 3
    assert pinger.downtime_ms() < 1000
