"""Real QEMU: live migration of a guest that uses its VF's registers, with the
device state carried by vfnic, and every failure path leaving the guest
running on the source with its VF intact."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfnic.device.nic import NicServer
from vfnic.host.vm import VM, VfioUserFunction, guest_net_args
from vfnic.migrate.orchestrator import Host, Options, migrate
from vfnic.savevm import snapshot

# The guest keeps reading a register it wrote once; after a migration the
# destination must show the same value, and the tick count must go on.
TICKER = r"""
python3 - <<'PY'
import glob, mmap, os, struct, time
for d in glob.glob("/sys/bus/pci/devices/*"):
    if open(d + "/device").read().strip() == "0x5fe1":
        break
fd = os.open(d + "/config", os.O_RDWR)
cmd = struct.unpack("<H", os.pread(fd, 2, 4))[0]
os.pwrite(fd, struct.pack("<H", cmd | 6), 4)
regs = memoryview(mmap.mmap(os.open(d + "/resource0", os.O_RDWR | os.O_SYNC), 0x4000)).cast("I")
regs[0x28 // 4] = 0xCAFE0001
for i in range(100000):
    print("tick", i, hex(regs[0x28 // 4]), flush=True)
    time.sleep(0.2)
PY
"""
PORT = iter(range(47100, 47200))


def ticks(vm: VM) -> list[tuple[int, str]]:
    text = vm.console_log.read_text(errors="replace") if vm.console_log.exists() else ""
    return [(int(n), v) for n, v in re.findall(r"tick (\d+) (0x[0-9a-f]+)", text)]


def wait_ticks(vm: VM, more_than: int, timeout: float = 120) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = ticks(vm)
        if len(t) > more_than:
            return t
        time.sleep(0.2)
    raise AssertionError(f"guest stopped ticking (console {vm.console_log})")


@pytest.fixture
def pair(short_dir: Path) -> Iterator[tuple[NicServer, NicServer, VM, VM, str]]:
    a = NicServer(short_dir / "a", 2, nic_id=1)
    b = NicServer(short_dir / "b", 2, nic_id=2)
    a.start()
    b.start()
    uri = f"tcp:127.0.0.1:{next(PORT)}"
    # The ticker uses the VF's registers from userspace: no kernel driver on it.
    raw = guest_net_args(driver="python")
    va = VM([VfioUserFunction(a.dir / "vf0.sock", "vf0")], command=TICKER, token="ticker",
            kernel_args=raw)
    vb = VM([VfioUserFunction(b.dir / "vf0.sock", "vf0")], command=TICKER, token="ticker",
            extra_args=["-S", "-incoming", uri], kernel_args=raw)
    try:
        va.start()
        wait_ticks(va, 2)
        vb.start()
        yield a, b, va, vb, uri
    finally:
        va.stop()
        vb.stop()
        a.stop()
        b.stop()


def run(a: NicServer, b: NicServer, va: VM, vb: VM, opts: Options):  # type: ignore[no-untyped-def]
    return migrate(Host(str(va.qmp_socket), str(a.dir), 0),
                   Host(str(vb.qmp_socket), str(b.dir), 0), opts, progress=lambda _l: None)


def test_transparent_migration_carries_vf_state(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, va, vb, uri = pair
    summary = run(a, b, va, vb, Options(uri, quit_source=False))
    assert summary.status == "completed", summary.error
    assert summary.regs_equal is True
    assert summary.vm_downtime_ms is not None and summary.device_state_bytes > 0
    before = ticks(va)[-1][0]
    after = wait_ticks(vb, 0)
    time.sleep(1.5)
    after = ticks(vb)
    # The guest continued on B where it stopped on A, and reads the value it wrote.
    assert after[-1][0] > before
    assert all(v == "0xcafe0001" for _, v in after)
    # The VF on B now has A's identity (its MAC), not B's own.
    assert b.nic.vfs[0].mac == a.nic.vfs[0].mac


@pytest.mark.parametrize("phase", ["setup", "precopy", "switchover", "restore"])
def test_cancel_at_any_phase_leaves_the_guest_on_the_source(pair, phase: str) -> None:  # type: ignore[no-untyped-def]
    a, b, va, vb, uri = pair
    state_before = snapshot.save(a.nic.vfs[0])
    summary = run(a, b, va, vb, Options(uri, cancel_at=phase))
    assert summary.status == "cancelled"
    n = len(ticks(va))
    wait_ticks(va, n + 2, timeout=30)  # still running on A
    assert a.nic.vfs[0].migration.state.name == "RUNNING"
    assert a.nic.vfs[0].running
    assert a.nic.vfs[0].bank.get("MTA") == 0xCAFE0001
    assert snapshot.save(a.nic.vfs[0])[:64] == state_before[:64]
    assert not vb.running() or vb.qmp("query-status")["status"] != "running"  # type: ignore[index]


def test_corrupted_stream_is_refused_and_the_source_resumes(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, va, vb, uri = pair
    b_before = snapshot.save(b.nic.vfs[0])
    summary = run(a, b, va, vb, Options(uri, corrupt_stream=True))
    assert summary.status == "failed" and "checksum" in (summary.error or "") or \
        "EINVAL" in (summary.error or "")
    n = len(ticks(va))
    wait_ticks(va, n + 2, timeout=30)
    assert a.nic.vfs[0].bank.get("MTA") == 0xCAFE0001
    assert snapshot.save(b.nic.vfs[0]) == b_before  # destination VF unchanged


def test_destination_killed_mid_stream(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, va, vb, uri = pair
    summary = run(a, b, va, vb, Options(uri, kill_destination_at="precopy",
                                        destination_pid=vb.pid))
    assert summary.status == "failed"
    n = len(ticks(va))
    wait_ticks(va, n + 2, timeout=30)
    assert a.nic.vfs[0].migration.state.name == "RUNNING"
    assert a.nic.vfs[0].bank.get("MTA") == 0xCAFE0001
