"""PCI Express configuration space: header, capabilities and write semantics.

Offsets and bit names follow the PCI Local Bus spec 3.0 (type 0 header), the PCI
Express Base spec (PCIe capability, section 7.5.3) and the SR-IOV spec 1.1
(section 3.3). Each byte carries a write mask (guest-writable bits) and a W1C
mask (bits the guest clears by writing 1).
"""

from __future__ import annotations

import struct

from vfnic.regs import table as T

CONFIG_SIZE = 4096  # PCIe extended configuration space

# MSI-X of every vfnic function: table and PBA in their own BAR
MSIX_BAR = 3
MSIX_BAR_SIZE = 0x4000
MSIX_VECTORS = T.NUM_VECTORS  # queue 0, queue 1, mailbox, link/other
MSIX_TABLE_OFFSET = 0x0000
MSIX_PBA_OFFSET = 0x2000
MSIX_ENTRY = 16

# Type 0 header offsets
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_PARITY = 1 << 6
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
STATUS_INTERRUPT = 1 << 3
STATUS_CAP_LIST = 1 << 4
STATUS_W1C = 0xF900  # parity, target/master abort, SERR, detected parity

BAR_MEM_64 = 0x4

# Capability IDs
CAP_ID_PM = 0x01
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11
EXT_CAP_ID_SRIOV = 0x0010

# SR-IOV capability layout (SR-IOV 1.1, 3.3)
SRIOV_CAP = 0x04
SRIOV_CTRL = 0x08
SRIOV_STATUS = 0x0A
SRIOV_INITIAL_VF = 0x0C
SRIOV_TOTAL_VF = 0x0E
SRIOV_NUM_VF = 0x10
SRIOV_FUNC_LINK = 0x12
SRIOV_VF_OFFSET = 0x14
SRIOV_VF_STRIDE = 0x16
SRIOV_VF_DID = 0x1A
SRIOV_SUP_PGSIZE = 0x1C
SRIOV_SYS_PGSIZE = 0x20
SRIOV_BAR = 0x24
SRIOV_VFM = 0x3C
SRIOV_SIZE = 0x40
SRIOV_CTRL_VFE = 1 << 0
SRIOV_CTRL_MSE = 1 << 3
SRIOV_CTRL_ARI = 1 << 4

# MSI-X capability layout
MSIX_FLAGS = 0x02
MSIX_TABLE = 0x04
MSIX_PBA = 0x08
MSIX_FLAGS_ENABLE = 1 << 15
MSIX_FLAGS_MASKALL = 1 << 14


class ConfigSpace:
    """4 KiB of configuration space with per-bit write semantics."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self._last_cap = 0
        self._last_ext_cap = 0

    # -- raw access (device side and save path) ------------------------------------

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def set_w1cmask(self, offset: int, size: int, mask: int) -> None:
        self.w1cmask[offset : offset + size] = mask.to_bytes(size, "little")

    # -- guest access ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            pos = offset + i
            wm, cm, old = self.wmask[pos], self.w1cmask[pos], self.data[pos]
            self.data[pos] = ((old & ~wm) | (byte & wm)) & ~(byte & cm) & 0xFF

    # -- building ---------------------------------------------------------------------

    def add_capability(self, cap_id: int, offset: int, size: int) -> int:
        """Link a standard capability at ``offset`` into the list (in order)."""
        assert 0x40 <= offset and offset + size <= 0x100
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        if self._last_cap:
            self.data[self._last_cap + 1] = offset
        else:
            self.data[CAPABILITY_LIST] = offset
            self.set(STATUS, 2, self.get(STATUS, 2) | STATUS_CAP_LIST)
        self._last_cap = offset
        return offset

    def add_ext_capability(self, cap_id: int, version: int, offset: int, size: int) -> int:
        assert offset >= 0x100 and offset + size <= CONFIG_SIZE
        self.set(offset, 4, cap_id | (version << 16))
        if self._last_ext_cap:
            header = self.get(self._last_ext_cap, 4)
            self.set(self._last_ext_cap, 4, (header & 0xFFFFF) | (offset << 20))
        self._last_ext_cap = offset
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(id, offset) of each standard capability, in list order."""
        out: list[tuple[int, int]] = []
        pos = self.data[CAPABILITY_LIST]
        while pos and len(out) < 48:
            out.append((self.data[pos], pos))
            pos = self.data[pos + 1]
        return out

    def ext_capabilities(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = 0x100
        while pos and len(out) < 128:
            header = self.get(pos, 4)
            if header == 0:
                break
            out.append((header & 0xFFFF, pos))
            pos = header >> 20
        return out


def bar_wmask(size: int, is64: bool = False) -> int:
    """Writable bits of a memory BAR of ``size`` bytes (low dword)."""
    return (~(size - 1)) & 0xFFFFFFF0


def dword(value: int) -> bytes:
    return struct.pack("<I", value & 0xFFFFFFFF)
