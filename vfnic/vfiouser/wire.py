"""vfio-user wire format: every message layout, declared once with construct.

No I/O here: bytes in, objects out, and back. Section names refer to
docs/interop/vfio-user.rst ("Header", "VFIO_USER_DMA_MAP", ...).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

from construct import Bytes, Int16ul, Int32ul, Int64ul, Struct

# -- Commands ("Commands" table) ------------------------------------------------


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


def command_name(value: int) -> str:
    try:
        return "VFIO_USER_" + Command(value).name
    except ValueError:
        return f"command {value}"


# -- Header ("Header") ------------------------------------------------------------

HEADER_SIZE = 16
FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 1 << 4
FLAG_ERROR = 1 << 5

Header = Struct(
    "msg_id" / Int16ul,
    "command" / Int16ul,
    "msg_size" / Int32ul,
    "flags" / Int32ul,
    "error" / Int32ul,
).compile()

# -- Payloads ------------------------------------------------------------------------

# VFIO_USER_VERSION: major, minor, then optional NUL-terminated JSON.
Version = Struct("major" / Int16ul, "minor" / Int16ul).compile()
VERSION_SIZE = 4

# VFIO_USER_DMA_MAP
DmaMap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "offset" / Int64ul,
    "address" / Int64ul,
    "size" / Int64ul,
).compile()
DMA_MAP_SIZE = 32
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1

# VFIO_USER_DMA_UNMAP
DmaUnmap = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "address" / Int64ul,
    "size" / Int64ul,
).compile()
DMA_UNMAP_SIZE = 24

# VFIO_USER_DEVICE_GET_INFO (struct vfio_device_info subset)
DeviceInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "num_regions" / Int32ul,
    "num_irqs" / Int32ul,
).compile()
DEVICE_INFO_SIZE = 16
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

# VFIO_USER_DEVICE_GET_REGION_INFO (struct vfio_region_info)
RegionInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "cap_offset" / Int32ul,
    "size" / Int64ul,
    "offset" / Int64ul,
).compile()
REGION_INFO_SIZE = 32
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

# VFIO_USER_DEVICE_GET_REGION_IO_FDS
RegionIoFds = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
).compile()
REGION_IO_FDS_SIZE = 16

# VFIO_USER_DEVICE_GET_IRQ_INFO (struct vfio_irq_info)
IrqInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "count" / Int32ul,
).compile()
IRQ_INFO_SIZE = 16
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# VFIO_USER_DEVICE_SET_IRQS (struct vfio_irq_set), data follows.
IrqSet = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "start" / Int32ul,
    "count" / Int32ul,
).compile()
IRQ_SET_SIZE = 20
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = 0x7
VFIO_IRQ_SET_ACTION_TYPE_MASK = 0x38

# VFIO_USER_REGION_READ / VFIO_USER_REGION_WRITE, data follows.
RegionAccess = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
).compile()
REGION_ACCESS_SIZE = 16

# VFIO_USER_REGION_WRITE_MULTI: wr_cnt, then wr_cnt fixed-size writes.
WriteMultiHeader = Struct("wr_cnt" / Int64ul).compile()
WRITE_MULTI_HEADER_SIZE = 8
WriteMultiEntry = Struct(
    "offset" / Int64ul,
    "region" / Int32ul,
    "count" / Int32ul,
    "data" / Bytes(8),
).compile()
WRITE_MULTI_ENTRY_SIZE = 24
WRITE_MULTI_MAX = 200  # QEMU's VFIO_USER_MULTI_MAX (hw/vfio-user/protocol.h)

# VFIO_USER_DMA_READ / VFIO_USER_DMA_WRITE (server -> client)
DmaAccess = Struct("address" / Int64ul, "count" / Int64ul).compile()
DMA_ACCESS_SIZE = 16

# VFIO_USER_DEVICE_FEATURE (struct vfio_device_feature), data follows.
DeviceFeature = Struct("argsz" / Int32ul, "flags" / Int32ul).compile()
DEVICE_FEATURE_SIZE = 8
VFIO_DEVICE_FEATURE_MASK = 0xFFFF
VFIO_DEVICE_FEATURE_GET = 1 << 16
VFIO_DEVICE_FEATURE_SET = 1 << 17
VFIO_DEVICE_FEATURE_PROBE = 1 << 18

# VFIO_USER_MIG_DATA_READ / VFIO_USER_MIG_DATA_WRITE, data follows.
MigData = Struct("argsz" / Int32ul, "size" / Int32ul).compile()
MIG_DATA_SIZE = 8


class PciRegion(enum.IntEnum):
    """VFIO_PCI_*_REGION_INDEX."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_PCI_REGIONS = 9


class PciIrq(enum.IntEnum):
    """VFIO_PCI_*_IRQ_INDEX."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_PCI_IRQS = 5


def packer(layout: Any) -> struct.Struct:
    """A struct.Struct equivalent to a construct layout of fixed-size integer
    fields, for the hot paths (register access); derived, never declared twice."""
    src = getattr(layout, "defersubcon", layout)  # compiled layouts keep their source
    fmt = "<"
    for sub in src.subcons:
        field = sub.subcon
        if hasattr(field, "fmtstr"):
            fmt += field.fmtstr[1:]
        elif type(field).__name__ == "Bytes":
            fmt += f"{field.length}s"
        else:
            raise TypeError(f"{sub.name}: not a fixed-size field")
    packed = struct.Struct(fmt)
    assert packed.size == src.sizeof(), (fmt, src.sizeof())
    return packed


def parse(layout: Any, data: bytes, size: int, what: str) -> Any:
    """Parse a fixed-size layout at the start of *data*, or raise ProtocolError."""
    from vfnic.errors import ProtocolError

    if len(data) < size:
        raise ProtocolError(f"{what}: payload of {len(data)} bytes, need {size}")
    return layout.parse(data[:size])


def build(layout: Any, **fields: Any) -> bytes:
    return bytes(layout.build(fields))


# Fast packers for the per-message hot paths.
HEADER = packer(Header)
REGION_ACCESS = packer(RegionAccess)
