"""Typed QMP results (vfnic.host.qmp) read from a real QEMU holding a vfnic VF,
paused before its guest runs (-S)."""

from __future__ import annotations

import asyncio

import pytest
from qemu.qmp import QMPClient

from vfnic.device.nic import NicServer
from vfnic.host.qmp import (
    query_migrate,
    query_migrate_parameters,
    query_pci,
    query_status,
)
from vfnic.host.vm import VM, VfioUserFunction
from vfnic.regs.ids import VENDOR_ID, VF_DEVICE_ID

pytestmark = pytest.mark.qemu


async def queries(vm: VM) -> tuple[object, ...]:
    qmp = QMPClient("typed-test")
    await qmp.connect(str(vm.qmp_socket))
    try:
        return (await query_status(qmp), await query_migrate(qmp),
                await query_migrate_parameters(qmp), await query_pci(qmp))
    finally:
        await qmp.disconnect()


def test_typed_queries_read_a_real_qemu(nic: NicServer) -> None:
    vf = VfioUserFunction(nic.dir / "vf0.sock", "vf0")
    with VM([vf], extra_args=["-S"]) as vm:
        status, migration, params, buses = asyncio.run(queries(vm))
    assert status["status"] == "prelaunch" and status["running"] is False
    assert migration.get("status", "none") == "none"  # nothing migrated yet
    assert isinstance(params["downtime-limit"], int)
    found = [dev for bus in buses for dev in bus.get("devices", [])
             if dev.get("id", {}).get("vendor") == VENDOR_ID
             and dev.get("id", {}).get("device") == VF_DEVICE_ID]
    assert len(found) == 1 and found[0].get("qdev_id") == "vf0"

