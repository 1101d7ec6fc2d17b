"""Typed results of the QMP queries vfnic reads (qapi/migration.json, run-state.json,
pci.json in QEMU): the fields vfnic uses, each query a function that checks the
reply's shape once instead of trusting ``QMPClient.execute``'s untyped result.

Every query raises what ``QMPClient.execute`` raises (qemu.qmp's ExecuteError,
ConnectError, ...) and QmpReplyError if QEMU's answer is not the documented shape.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast

from qemu.qmp import QMPClient

from vfnic.errors import TransportError


class QmpReplyError(TransportError):
    """QEMU answered a query with something other than the documented shape."""


# MigrationStats (qapi/migration.json), the fields vfnic reads
RamStats = TypedDict("RamStats", {
    "transferred": int, "remaining": int, "total": int, "dirty-sync-count": int,
}, total=False)
# MigrationInfo: "status" is a MigrationStatus ("setup", "active", "pre-switchover",
# "device", "completed", "failed", "cancelling", "cancelled", ...)
MigrationInfo = TypedDict("MigrationInfo", {
    "status": str, "ram": RamStats, "downtime": int, "total-time": int, "setup-time": int,
    "error-desc": str,
}, total=False)
# StatusInfo (qapi/run-state.json): "status" is a RunState ("running", "paused",
# "inmigrate", "postmigrate", "prelaunch", ...)
class StatusInfo(TypedDict, total=False):
    status: str
    running: bool
# MigrationParameters, the fields vfnic reads
MigrationParameters = TypedDict("MigrationParameters",
                                {"downtime-limit": int, "max-bandwidth": int}, total=False)


class PciDeviceId(TypedDict, total=False):
    vendor: int
    device: int


class PciDeviceInfo(TypedDict, total=False):
    """PciDeviceInfo (qapi/pci.json), the fields vfnic reads."""

    bus: int
    slot: int
    function: int
    id: PciDeviceId
    qdev_id: str


class PciInfo(TypedDict, total=False):
    bus: int
    devices: list[PciDeviceInfo]


def _object(result: Any, command: str) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise QmpReplyError(f"{command}: expected a JSON object, got {type(result).__name__}")
    return result


async def query_migrate(qmp: QMPClient) -> MigrationInfo:
    info = _object(await qmp.execute("query-migrate"), "query-migrate")
    if "ram" in info:
        _object(info["ram"], "query-migrate ram")
    return cast(MigrationInfo, info)


async def query_status(qmp: QMPClient) -> StatusInfo:
    return cast(StatusInfo, _object(await qmp.execute("query-status"), "query-status"))


async def query_migrate_parameters(qmp: QMPClient) -> MigrationParameters:
    params = await qmp.execute("query-migrate-parameters")
    return cast(MigrationParameters, _object(params, "query-migrate-parameters"))


async def query_pci(qmp: QMPClient) -> list[PciInfo]:
    buses = await qmp.execute("query-pci")
    if not isinstance(buses, list):
        raise QmpReplyError(f"query-pci: expected a JSON array, got {type(buses).__name__}")
    for bus in buses:
        for dev in _object(bus, "query-pci bus").get("devices", []):
            _object(dev, "query-pci device")
    return cast(list[PciInfo], buses)
