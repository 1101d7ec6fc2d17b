"""Function state snapshot: every byte the guest or the save path can observe.

The device's own layout: the migration state machine (vfnic.savevm.migration)
carries it as opaque bytes through PciFunction.save_state/load_state.

Layout (little endian), declared once with construct:
  magic "VFNS", format version, kind (PF/VF), VF index, hash of the register
  table layout, then config space, the register values in table order, the MSI-X
  BAR, the permanent MAC and the host-side VF link state and migration mode; a CRC32 of everything
  before it closes the record. A restore checks all of it before touching the
  device, so a refused snapshot changes nothing.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import TYPE_CHECKING

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

from vfnic.device.pci import CONFIG_SIZE, MSIX_BAR_SIZE, MSIX_ENTRY, MSIX_VECTORS
from vfnic.device.policy import LINK_STATE_NAMES, MIGRATION_COOPERATIVE, MIGRATION_TRANSPARENT
from vfnic.errors import SnapshotError
from vfnic.regs.table import Access, Register

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction

MAGIC = b"VFNS"
VERSION = 1
KIND_PF, KIND_VF = 0, 1

Head = Struct(
    "magic" / Const(MAGIC),
    "version" / Int16ul,
    "kind" / Int8ul,
    "index" / Int8ul,
    "layout" / Bytes(8),
    "nregs" / Int16ul,
    "link_state" / Int8ul,
    "flags" / Int8ul,  # FLAG_COOPERATIVE: the VF's host-side migration mode
)
FLAG_COOPERATIVE = 1 << 0
HEAD_SIZE = Head.sizeof()


def layout_hash(table: tuple[Register, ...]) -> bytes:
    text = ";".join(f"{r.name}@{r.offset:x}/{r.width}" for r in table)
    return hashlib.sha256(text.encode()).digest()[:8]


def body_size(nregs: int, msix_size: int) -> int:
    return CONFIG_SIZE + 4 * nregs + msix_size + 6


def save(fn: PciFunction) -> bytes:
    table = fn.bank.table
    head = Head.build(
        {
            "version": VERSION,
            "kind": KIND_PF if fn.is_pf else KIND_VF,
            "index": fn.index,
            "layout": layout_hash(table),
            "nregs": len(table),
            "link_state": fn.link_state,
            "flags": FLAG_COOPERATIVE if fn.migration_mode == MIGRATION_COOPERATIVE else 0,
        }
    )
    body = bytes(fn.config.data) + fn.bank.save() + bytes(fn.msix) + fn.perm_mac
    record = head + body
    return record + Int32ul.build(zlib.crc32(record))


def check(fn: PciFunction, data: bytes) -> None:
    """Raise SnapshotError unless ``data`` is a valid snapshot of a function like ``fn``."""
    if len(data) < HEAD_SIZE + 4:
        raise SnapshotError(f"snapshot truncated: {len(data)} bytes")
    if data[:4] != MAGIC:
        raise SnapshotError("not a vfnic snapshot (bad magic)")
    head = Head.parse(data[:HEAD_SIZE])
    if head.version != VERSION:
        raise SnapshotError(f"snapshot format version {head.version}, expected {VERSION}")
    expected = HEAD_SIZE + body_size(head.nregs, len(fn.msix)) + 4
    if len(data) != expected:
        raise SnapshotError(f"snapshot of {len(data)} bytes, expected {expected}")
    crc = Int32ul.parse(data[-4:])
    if crc != zlib.crc32(data[:-4]):
        raise SnapshotError("snapshot checksum mismatch")
    if head.kind != (KIND_PF if fn.is_pf else KIND_VF):
        raise SnapshotError("snapshot of a PF cannot restore a VF (or the reverse)")
    if head.layout != layout_hash(fn.bank.table) or head.nregs != len(fn.bank.table):
        raise SnapshotError("snapshot register layout differs from this device's")
    check_fields(fn, data)


def check_fields(fn: PciFunction, data: bytes) -> None:
    """Every field in range, as a guest could have left it: config bytes the guest
    cannot write equal the device's own, register values inside their masks, the
    MSI-X PBA and write-only registers zero, a
    unicast MAC and a known link state (SnapshotError naming the first bad field)."""
    head = Head.parse(data[:HEAD_SIZE])
    if head.flags & ~FLAG_COOPERATIVE:
        raise SnapshotError(f"snapshot flags {head.flags:#x} are unknown")
    if head.link_state not in LINK_STATE_NAMES:
        raise SnapshotError(f"snapshot link state {head.link_state} is out of range")
    pos = HEAD_SIZE
    cfg = data[pos : pos + CONFIG_SIZE]
    cur, wm, cm = fn.config.data, fn.config.wmask, fn.config.w1cmask

    def big(b: bytes | bytearray) -> int:
        return int.from_bytes(b[:CONFIG_SIZE], "little")

    # All bytes at once: which bits differ where the guest may not write.
    ro_diff = (big(cfg) ^ big(cur)) & ~(big(wm) | big(cm))
    if ro_diff:
        i = ((ro_diff & -ro_diff).bit_length() - 1) // 8  # the first such byte
        raise SnapshotError(f"snapshot changes read-only config byte {i:#x} "
                            f"({cur[i]:#04x} -> {cfg[i]:#04x})")
    pos += CONFIG_SIZE
    for i, reg in enumerate(fn.bank.table):
        (value,) = struct.unpack_from("<I", data, pos + 4 * i)
        if value & ~reg.mask or (reg.access is Access.WO and value != reg.reset):
            raise SnapshotError(f"snapshot register {reg.name} = {value:#x} is outside its "
                                f"mask {reg.mask:#x}")
    pos += 4 * head.nregs
    msix = data[pos : pos + MSIX_BAR_SIZE]
    if any(msix[MSIX_VECTORS * MSIX_ENTRY :]):
        raise SnapshotError("snapshot has read-only MSI-X bytes (PBA) set")
    pos += MSIX_BAR_SIZE
    mac = data[pos : pos + 6]
    if mac[0] & 1:
        raise SnapshotError(f"snapshot MAC {mac.hex(':')} is not unicast")


def stored_mac(data: bytes) -> bytes:
    """The permanent MAC a (checked) snapshot carries: the 6 bytes before its CRC."""
    return bytes(data[-10:-4])


def restore(fn: PciFunction, data: bytes) -> None:
    """Check ``data`` whole (SnapshotError, ``fn`` unchanged), then apply it."""
    check(fn, data)
    apply(fn, data)


def apply(fn: PciFunction, data: bytes) -> None:
    """Write a snapshot that check() accepted into ``fn``."""
    head = Head.parse(data[:HEAD_SIZE])
    pos = HEAD_SIZE
    fn.config.data[:] = data[pos : pos + CONFIG_SIZE]
    pos += CONFIG_SIZE
    n = 4 * head.nregs
    fn.bank.restore(data[pos : pos + n])
    pos += n
    fn.msix[:] = data[pos : pos + len(fn.msix)]
    pos += len(fn.msix)
    fn.perm_mac = bytes(data[pos : pos + 6])
    fn.link_state = head.link_state
    coop = head.flags & FLAG_COOPERATIVE
    fn.migration_mode = MIGRATION_COOPERATIVE if coop else MIGRATION_TRANSPARENT
