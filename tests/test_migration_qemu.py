"""Real QEMU: a plain QMP live migration carries the VF's state in QEMU's own stream
(dbus-vmstate, one helper per VF in each host's NIC server), the VF's PCI config is
back in the destination QEMU before the guest runs, and every failure leaves the
guest running on the source with its VF RUNNING and its state intact."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfnic.device import snapshot
from vfnic.device.nic import NicServer, control_call
from vfnic.host.vm import VM, VfioUserFunction, guest_net_args, qmp_command
from vfnic.migrate.orchestrator import Host, Options, migrate
from vfnic.migrate.vmstate import attach
from vfnic.regs.ids import VF_DEVICE_ID

# The guest keeps reading a register it wrote once; after a migration the
# destination must show the same value, and the tick count must go on.
TICKER = r"""
python3 - <<'PY'
import glob, mmap, os, struct, time
for d in glob.glob("/sys/bus/pci/devices/*"):
    if open(d + "/device").read().strip() == "__VF_DEVICE__":
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
""".replace("__VF_DEVICE__", f"{VF_DEVICE_ID:#06x}")
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
    attach(a)
    attach(b)
    a.start()
    b.start()
    uri = f"tcp:127.0.0.1:{next(PORT)}"
    # B's VF 1 holds the guest: the Id names the VF inside the VM, not a host's VF index.
    # The ticker uses the VF's registers from userspace: no kernel driver on it.
    raw = guest_net_args(driver="python")
    va = VM([VfioUserFunction(a.dir / "vf0.sock", "nic0")], command=TICKER, token="ticker",
            kernel_args=raw)
    vb = VM([VfioUserFunction(b.dir / "vf1.sock", "nic0")], command=TICKER, token="ticker",
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
                   Host(str(vb.qmp_socket), str(b.dir), 1), opts, progress=lambda _l: None)


def test_qemu_command_line_has_the_bus_and_the_object(short_dir: Path) -> None:
    vm = VM([VfioUserFunction(short_dir / "vf0.sock", "nic0")], run_dir=short_dir / "vm")
    argv = vm.argv()
    obj = argv[argv.index("-object", argv.index("-append")) + 1]
    assert obj == f"dbus-vmstate,id=vmstate,addr=unix:path={vm.bus_socket}"
    assert f"unix:{short_dir / 'vm' / 'nic0.qmp'},server=on,wait=off" in argv


def test_plain_qmp_migration_carries_vf_state(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, va, vb, uri = pair
    summary = run(a, b, va, vb, Options(uri, quit_source=False))
    assert summary.status == "completed", summary.error
    assert summary.regs_equal is True
    assert summary.source["id"] == summary.destination["id"] == "vfnic.nic0"
    assert 0 < summary.device_state_bytes <= 1 << 20
    assert summary.save_ms is not None and summary.load_ms is not None
    assert summary.early_access is False  # config back before the guest ran
    assert summary.destination["result"] == "completed"
    before = ticks(va)[-1][0]
    wait_ticks(vb, 0)
    time.sleep(1.5)
    after = ticks(vb)
    # The guest continued on B where it stopped on A, reading the value it wrote:
    # its BAR is mapped in B's QEMU (config replayed) and the register was carried.
    assert after[-1][0] > before
    assert all(v == "0xcafe0001" for _, v in after)
    assert b.nic.vfs[1].mac == a.nic.vfs[0].mac
    assert b.nic.vfs[1].migration.state.name == "RUNNING"
    # QEMU seals its memfd RAM: the VF reaches it through a mapping, no syscall per access
    assert any(r.sealed and r.writable for r in b.nic.vfs[1].dma.regions)


@pytest.mark.parametrize("where", ["setup", "active"])
def test_cancel_before_save_leaves_the_guest_on_the_source(pair, where: str) -> None:  # type: ignore[no-untyped-def]
    a, b, va, vb, uri = pair
    state_before = snapshot.save(a.nic.vfs[0])
    summary = run(a, b, va, vb, Options(uri, cancel_at=where))
    assert summary.status == "cancelled"
    n = len(ticks(va))
    wait_ticks(va, n + 2, timeout=30)  # still running on A
    assert a.nic.vfs[0].migration.state.name == "RUNNING"
    assert a.nic.vfs[0].running
    assert a.nic.vfs[0].bank.get("MTA") == 0xCAFE0001
    assert snapshot.save(a.nic.vfs[0])[:64] == state_before[:64]


@pytest.mark.parametrize("fault", ["corrupt", "oversize"])
def test_failure_after_save_or_in_load_resumes_the_source_vf(pair, fault: str) -> None:  # type: ignore[no-untyped-def]
    """corrupt: Save succeeds, the destination's Load refuses the stream; oversize: the
    state cannot fit QEMU's 1 MiB, Save fails. Either way QEMU fails the migration,
    resumes the source (return-path) and the source VF runs again, state intact."""
    a, b, va, vb, uri = pair
    b_before = snapshot.save(b.nic.vfs[1])
    summary = run(a, b, va, vb, Options(uri, save_fault=fault))
    assert summary.status == "failed", summary
    rec = summary.source
    assert rec["result"] in ("failed", "cancelled"), rec
    assert rec["vf_running"] is True
    if fault == "oversize":
        assert "exceeds QEMU's dbus-vmstate limit" in rec["error"]
    else:
        assert rec["saved"] is True
        assert summary.destination.get("result") == "refused", summary.destination
        assert "checksum" in summary.destination["error"]
    n = len(ticks(va))
    wait_ticks(va, n + 2, timeout=30)
    assert a.nic.vfs[0].migration.state.name == "RUNNING" and a.nic.vfs[0].running
    assert a.nic.vfs[0].bank.get("MTA") == 0xCAFE0001
    assert snapshot.save(b.nic.vfs[1]) == b_before  # destination VF unchanged


def test_destination_killed_during_the_migration(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, va, vb, uri = pair
    summary = run(a, b, va, vb, Options(uri, kill_destination_at="active",
                                        destination_pid=vb.pid))
    assert summary.status == "failed"
    n = len(ticks(va))
    wait_ticks(va, n + 2, timeout=30)
    assert a.nic.vfs[0].migration.state.name == "RUNNING"
    assert a.nic.vfs[0].bank.get("MTA") == 0xCAFE0001


def migration_status(vm: VM) -> str:
    info = qmp_command(vm.qmp_socket, "query-migrate")
    return str(info.get("status")) if isinstance(info, dict) else ""


def test_destination_gone_after_load_still_ends_its_record(pair) -> None:  # type: ignore[no-untyped-def]
    """The destination QEMU ends after Load and the config replay, before anyone's
    `cont`: B's record gets a result naming the last step, so a client waiting for it
    (`migrations` with settle) is answered at once instead of after its full wait."""
    a, b, va, vb, uri = pair
    since = max((r["seq"] for r in control_call(b.dir, {"op": "migrations"})), default=0)
    caps = {"capabilities": [{"capability": "return-path", "state": True}]}
    for vm in (va, vb):  # a plain QMP migration; B was started with -S: no `cont`
        qmp_command(vm.qmp_socket, "migrate-set-capabilities", caps)
    qmp_command(va.qmp_socket, "migrate", {"uri": uri})
    rec = control_call(b.dir, {"op": "migration-wait", "role": "destination",
                               "key": "restored_at", "since": since, "timeout": 30}, 40)
    deadline = time.monotonic() + 30
    while (status := migration_status(va)) not in ("completed", "failed", "cancelled") \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == "completed"
    assert "loaded_at" in rec and "result" not in rec, rec
    assert vb.pid is not None
    os.kill(vb.pid, signal.SIGKILL)  # the destination QEMU this test started
    records = control_call(b.dir, {"op": "migrations", "settle": 30, "since": since}, 40)
    dst = [r for r in records if r["role"] == "destination"]
    assert dst and dst[-1]["result"] == "destination-gone after restored", records
    src = control_call(a.dir, {"op": "migrations", "settle": 10}, 20)
    assert src[-1]["role"] == "source" and src[-1]["result"] == "completed", src


def test_a_vm_with_two_vfs_from_two_nics_carries_both(short_dir: Path) -> None:
    """One VM, two VFs (host A: NIC a1's vf0 and NIC a2's vf1); on B they are NIC b1's
    vf1 and NIC b2's vf0. Two helpers on the VM's one bus, each VF's state lands on
    the VF with the same device id, whatever its index."""
    nics = {n: NicServer(short_dir / n, 2, nic_id=i) for i, n in enumerate(
        ("a1", "a2", "b1", "b2"), start=1)}
    for nic in nics.values():
        attach(nic)
        nic.start()
    uri = f"tcp:127.0.0.1:{next(PORT)}"
    raw = guest_net_args(driver="python")  # the ticker uses the VFs' registers itself
    va = VM([VfioUserFunction(nics["a1"].dir / "vf0.sock", "nic0"),
             VfioUserFunction(nics["a2"].dir / "vf1.sock", "nic1")], command=TICKER,
            token="ticker", kernel_args=raw)
    vb = VM([VfioUserFunction(nics["b1"].dir / "vf1.sock", "nic0"),
             VfioUserFunction(nics["b2"].dir / "vf0.sock", "nic1")], command=TICKER,
            token="ticker", extra_args=["-S", "-incoming", uri], kernel_args=raw)
    try:
        va.start()
        wait_ticks(va, 2)
        first, second = nics["a1"].nic.vfs[0], nics["a2"].nic.vfs[1]
        first.region_write(0, 0x28, (0xF125).to_bytes(4, "little"))  # MTA, by the host
        second.region_write(0, 0x28, (0x5EC0D2).to_bytes(4, "little"))
        vb.start()
        summary = migrate(Host(str(va.qmp_socket), str(nics["a1"].dir), 0),
                          Host(str(vb.qmp_socket), str(nics["b1"].dir), 1),
                          Options(uri, quit_source=False), progress=lambda _l: None)
        assert summary.status == "completed", summary.error
        recs = control_call(nics["b2"].dir, {"op": "migrations", "settle": 10})
        assert [(r["id"], r["result"]) for r in recs] == [("vfnic.nic1", "completed")], recs
        assert nics["b1"].nic.vfs[1].bank.get("MTA") == 0xF125  # nic0's state, on B's vf1
        assert nics["b2"].nic.vfs[0].bank.get("MTA") == 0x5EC0D2  # nic1's, on B's vf0
        assert nics["b1"].nic.vfs[1].mac == first.mac
        assert nics["b2"].nic.vfs[0].mac == second.mac
        wait_ticks(vb, 0)
    finally:
        va.stop()
        vb.stop()
        for nic in nics.values():
            nic.stop()


def test_orchestrator_migrates_a_guest_without_a_vf(short_dir: Path) -> None:
    """Host(nic_dir=None): the same QMP steps for a QEMU without a vfnic VF (the
    benchmarks' virtio-net and no-NIC baselines); STOP and RESUME in the timeline."""
    uri = f"tcp:127.0.0.1:{next(PORT)}"
    clock = "i=0; while true; do echo tick $i plain; i=$((i+1)); sleep 0.2; done"
    va = VM([], command=clock, token="plain", run_dir=short_dir / "va")
    vb = VM([], command=clock, token="plain", run_dir=short_dir / "vb",
            extra_args=["-S", "-incoming", uri])
    try:
        va.start()
        deadline = time.monotonic() + 240
        while "tick 2 plain" not in (va.console_log.read_text(errors="replace")
                                     if va.console_log.exists() else ""):
            assert time.monotonic() < deadline, "the guest did not start ticking"
            time.sleep(0.2)
        vb.start()
        s = migrate(Host(str(va.qmp_socket), None), Host(str(vb.qmp_socket), None),
                    Options(uri), progress=lambda _l: None)
        assert s.status == "completed", s.error
        assert s.mode == "no VF" and s.save_ms is None and s.device_state_bytes == 0
        tl = s.timeline_ms
        assert tl["source-stopped"] <= tl["source-completed"] <= tl["destination-running"]
        assert 0 < tl["destination-resumed"] - tl["source-stopped"] < 30_000
        assert s.ram_transferred > 0 and s.vm_downtime_ms is not None
        last = 0
        deadline = time.monotonic() + 60
        while last < 5 and time.monotonic() < deadline:  # the clock goes on over there
            text = vb.console_log.read_text(errors="replace") if vb.console_log.exists() else ""
            last = len(re.findall(r"tick \d+ plain", text))
            time.sleep(0.2)
        assert last >= 5, "the destination guest did not run on"
    finally:
        va.stop()
        vb.stop()


def test_one_host_without_a_nic_folder_is_a_usage_error(short_dir: Path) -> None:
    from vfnic.errors import UsageError

    with pytest.raises(UsageError, match="both hosts"):
        migrate(Host(str(short_dir / "a.qmp"), None), Host(str(short_dir / "b.qmp"),
                                                           str(short_dir)), Options("tcp:x:1"))
