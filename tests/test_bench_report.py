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


def test_qemu_pause_steps_are_read_from_both_qemus_traces(tmp_path: Path) -> None:
    from vfnic.bench.migration import pause_steps

    # As QEMU 11.1's log backend writes them with -msg timestamp=on (lines from a lab run).
    (tmp_path / "src.log").write_text(
        "2026-12-01T06:15:04.954861Z migration_completion_vm_stop ret 0\n"
        "2026-12-01T06:15:04.955330Z ram_save_complete dirty=5747, done=0\n"
        "2026-12-01T06:15:05.197749Z ram_save_complete dirty=0, done=1\n"
        "2026-12-01T06:15:05.197836Z vmstate_save apic, apic\n"
        "2026-12-01T06:15:05.197887Z dbus_vmstate_pre_save \n"
        "2026-12-01T06:15:05.202171Z dbus_vmstate_saving id: vfnic.vf0\n"
        "2026-12-01T06:15:05.203486Z vmstate_save cpu_common, cpu_common\n"
        "2026-12-01T06:15:05.209668Z migration_return_path_end_before \n"
        "2026-12-01T06:15:05.235769Z source_return_path_thread_shut 0x0\n"
        "2026-12-01T06:15:05.236744Z savevm_state_cleanup \n")
    (tmp_path / "dst.log").write_text(
        "qemu-system-x86_64: a message without a trace event\n"
        "2026-12-01T06:15:05.217431Z dbus_vmstate_post_load version_id: 0\n"
        "2026-12-01T06:15:05.220456Z dbus_vmstate_loading id: vfnic.vf0\n"
        "2026-12-01T06:15:05.228581Z vmstate_load 0000:00:01.0/virtio-blk, virtio-blk\n")
    steps = pause_steps(tmp_path / "src.log", tmp_path / "dst.log")
    assert steps["ram_pages"] == 5747
    assert round(steps["ram_ms"], 1) == 242.4
    assert round(steps["vf_find_src_ms"], 1) == 4.3 and round(steps["vf_save_ms"], 1) == 1.3
    assert round(steps["devices_ms"], 1) == 11.9 and round(steps["dest_wait_ms"], 1) == 26.1
    assert round(steps["vf_find_dst_ms"], 1) == 3.0 and round(steps["vf_load_ms"], 1) == 8.1
    assert round(steps["stop_to_end_ms"], 1) == 281.9
    assert pause_steps(tmp_path / "none.log", tmp_path / "dst.log") == {}


def test_guest_packet_rates_come_as_a_plot(tmp_path: Path) -> None:
    """Section 2's and 6's packet rates and ping RTT are drawn too (a PNG beside
    BENCHMARKS.md, linked from the section), from the rounds' raw results."""
    from vfnic.bench.datapath import PAYLOADS, plot_guest_rates

    def guest(rate: float, rtt: float) -> dict[str, object]:
        rows = {f"{key}{p}": {"peer": {"count": int(rate) + 1, "span": 1.0},
                              "guest": {"count": int(rate) + 1, "span": 1.0}}
                for key in ("tx", "rx") for p in PAYLOADS}
        return {**rows, "ping": {"avg": rtt}}

    results = {"kvf": [guest(9000, 1.2), guest(11000, 1.4)], "virtio": [guest(15000, 0.8)]}
    sec = Section("kmod", "Guest kernel driver")
    path = tmp_path / "docs" / "bench" / "kmod.png"
    image = plot_guest_rates(path, results, "rates", sec)
    assert not sec.failures
    assert image == "![rates](docs/bench/kmod.png)"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_suspend_points_are_counted_from_the_source_records() -> None:
    from vfnic.bench.migration import suspend_points

    records = [{"suspend_point": {"syncs": 1, "left_pct": 2.5}},
               {"suspend_point": {"syncs": 1, "left_pct": 1.75}},
               {"suspend_point": {"syncs": 2, "left_pct": 0.0}, "suspend_overtaken": True},
               {}]
    assert suspend_points(records) == (
        "- Cooperative suspend point (1/32 = 3.12 % of RAM left): caught in pass 1 in 2 of 4 "
        "migrations, at 1.75-2.50 % left; 1 after pass 1; 1 suspends overtaken by QEMU's "
        "switchover.")
