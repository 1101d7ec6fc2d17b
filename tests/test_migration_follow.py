"""Real QEMU, two hosts, a migration driven the way libvirt drives it (QMP only:
pause-before-switchover, migrate-continue at pre-switchover, `cont` on the
destination), with nothing moving the VF's state: the NIC server follows the
source QEMU through DIR/vf0.qmp and suspends the VF driver through the mailbox,
and the driver takes the fresh VF on B over by itself, keeping its MAC."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vfnic.device.nic import control_call
from vfnic.host.vm import VM, VfioUserFunction
from vfnic.migrate.lab import GUEST_IP, Lab, Pinger, sh

URI = "tcp:192.168.77.2:4445"


def wait_status(vm: VM, want: set[str], timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = vm.qmp("query-migrate")  # type: ignore[assignment]
        if info.get("status") in want:
            return info
        assert info.get("status") not in ("failed", "cancelled"), info
        assert time.monotonic() < deadline, f"migration stuck in {info.get('status')}"
        time.sleep(0.01)


def follow_vm(lab: Lab, host: str, nic: Path, *extra: str) -> VM:
    return VM([VfioUserFunction(nic / "vf0.sock", "vf0")], netns=lab.ns(host), token="follow",
              kernel_args=[f"vfnic.ip={GUEST_IP}/24"], command="tail -F /run/vfnic-driver.log",
              extra_args=["-qmp", f"unix:{nic / 'vf0.qmp'},server=on,wait=off", *extra])


def guest_pair(lab: Lab) -> tuple[Path, Path, VM, VM]:
    """NICs on A and B, the guest booted on A and reachable, B waiting (-incoming)."""
    da = lab.start_nic("a", vfs=2, nic_id=1)
    db = lab.start_nic("b", vfs=2, nic_id=2)
    va = follow_vm(lab, "a", da)
    vb = follow_vm(lab, "b", db, "-S", "-incoming", URI)
    try:
        va.start()
        lab.wait_reachable(120, "the guest on its VF")
        vb.start()
    except BaseException:
        va.stop()
        vb.stop()
        raise
    return da, db, va, vb


def test_nic_follows_a_migration_it_does_not_drive(lab: Lab) -> None:
    da, db, va, vb = guest_pair(lab)
    try:
        pinger = Pinger(lab)
        pinger.start()
        time.sleep(1)
        va.qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "events", "state": True}]})
        va.qmp("migrate", {"uri": URI})
        wait_status(va, {"pre-switchover"})
        va.qmp("migrate-continue", {"state": "pre-switchover"})
        info = wait_status(va, {"completed"})
        deadline = time.monotonic() + 60
        while vb.qmp("query-status").get("status") == "inmigrate":  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        vb.qmp("cont")
        lab.wait_reachable(60, "the guest on B")
        time.sleep(0.5)
        pinger.stop()
        after = sh("ip", "netns", "exec", lab.ns("peer"), "ping", "-c", "10", "-i", "0.05",
                   GUEST_IP, check=False).stdout
        records = control_call(da, {"op": "migrations", "settle": 10})
        links = control_call(db, {"op": "link-show"})
        console_a = va.console_log.read_text(errors="replace")
        console_b = vb.console_log.read_text(errors="replace")
    finally:
        va.stop()
        vb.stop()
    assert "10 received" in after, after
    assert info.get("downtime") is not None
    assert len(records) == 1, records
    rec = records[0]
    assert rec["role"] == "source" and rec["result"] == "completed", rec
    assert "error" not in rec and rec["suspend_mailbox_ms"] is not None, rec
    # The guest kept its address on B: its driver asked B's PF for it (SET_MAC).
    assert "02:56:46:01:00:01" in str(links), links
    assert "DUP" not in pinger.output
    assert "ready vfnic0 driver=vfnic_vf" in console_a  # the kernel driver, by default
    assert "migrated onto a new VF" in console_b, console_b[-2000:]


def test_a_cancelled_migration_resumes_the_driver_on_the_source(lab: Lab) -> None:
    da, _db, va, vb = guest_pair(lab)
    try:
        va.qmp("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True}]})
        va.qmp("migrate", {"uri": URI})
        wait_status(va, {"pre-switchover"})  # the follower suspended the driver before
        va.qmp("migrate_cancel")
        wait_status(va, {"cancelled"}, 30)
        va.qmp("cont")
        deadline = time.monotonic() + 30
        while not (records := control_call(da, {"op": "migrations"})) or \
                "resumed" not in records[-1]:
            assert time.monotonic() < deadline, records
            time.sleep(0.05)
        after = sh("ip", "netns", "exec", lab.ns("peer"), "ping", "-c", "10", "-i", "0.05",
                   GUEST_IP, check=False).stdout
        links = control_call(da, {"op": "link-show"})
    finally:
        va.stop()
        vb.stop()
    assert records[-1]["result"] == "cancelled" and records[-1]["suspend_mailbox_ms"] is not None
    assert "10 received" in after, after  # back on A, same VF, its driver resumed
    assert "02:56:46:01:00:01" in str(links)
