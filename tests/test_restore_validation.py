"""A migration stream is checked whole before anything is applied; read-only
config bytes and register masks hold after a restore (issue 10, item 5)."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable

import pytest

from vfnic.device import snapshot
from vfnic.device.function import CAP_MSIX, MSIX_ENTRY, MSIX_VECTORS, PciFunction
from vfnic.device.nic import Nic
from vfnic.errors import SnapshotError
from vfnic.regs.table import VF_TABLE
from vfnic.savevm import stream
from vfnic.savevm.migration import State

CONFIG = snapshot.HEAD_SIZE
REGS = CONFIG + 4096
MSIX = REGS + 4 * len(VF_TABLE)
PAGE = 4096


def reg_pos(name: str) -> int:
    return REGS + 4 * [r.name for r in VF_TABLE].index(name)


def resign(image: bytearray) -> bytes:
    body = bytes(image[:-4])
    return body + struct.pack("<I", zlib.crc32(body))


def source_image() -> bytes:
    src = Nic(1, nic_id=1).vfs[0]
    src.region_write(0, 0x30, struct.pack("<I", 0x5A5A5A5A))  # SCRATCH
    return snapshot.save(src)


def destination() -> tuple[Nic, PciFunction, int]:
    nic = Nic(1, nic_id=2)
    fn = nic.vfs[0]
    fd = os.memfd_create("vfr")
    os.ftruncate(fd, 0x4000)
    fn.dma.map(0x10000, 0x2000, 3, 0, os.dup(fd))  # writable
    fn.dma.map(0x20000, 0x1000, 1, 0x2000, os.dup(fd))  # read-only
    return nic, fn, fd


def restore(fn: PciFunction, data: bytes) -> None:
    fn.migration.set_state(State.RESUMING)
    fn.migration.write(data)
    fn.migration.set_state(State.STOP)


def state_of(fn: PciFunction, fd: int) -> tuple[bytes, bytes, int]:
    return snapshot.save(fn), os.pread(fd, 0x4000, 0), fn.link_state


Craft = Callable[[bytearray], None]


def set_byte(pos: int, value: int) -> Craft:
    def craft(image: bytearray) -> None:
        image[pos] = value
    return craft


def set_u32(pos: int, value: int) -> Craft:
    def craft(image: bytearray) -> None:
        image[pos:pos + 4] = struct.pack("<I", value)
    return craft


@pytest.mark.parametrize("what,craft", [
    ("vendor ID", set_byte(CONFIG + 0x00, 0x66)),
    ("device ID", set_byte(CONFIG + 0x03, 0x00)),
    ("capability pointer", set_byte(CONFIG + 0x34, 0x90)),
    ("MSI-X table size", set_byte(CONFIG + CAP_MSIX + 2, 0x3F)),
    ("RAH bits outside its mask", set_u32(reg_pos("RAH"), 0x7FFF0000)),
    ("RDBAL0 low bits", set_u32(reg_pos("RDBAL0"), 0x1001)),
    ("a write-only doorbell", set_u32(reg_pos("VFMBDOORBELL"), 1)),
    ("MSI-X PBA", set_byte(MSIX + MSIX_VECTORS * MSIX_ENTRY + 0x2000 - 0x40, 1)),
    ("multicast MAC", set_byte(MSIX + 0x4000, 0x01)),
    ("link state", set_byte(snapshot.HEAD_SIZE - 2, 9)),
])
def test_a_crafted_snapshot_is_refused_and_nothing_changes(what: str, craft: Craft) -> None:
    image = bytearray(source_image())
    craft(image)
    crafted = resign(image)
    nic, fn, fd = destination()
    before = state_of(fn, fd)
    data = stream.full_record(crafted) + stream.extents_record([(0x10000, b"\xaa" * PAGE)]) \
        + stream.end_record(crafted)
    with pytest.raises(SnapshotError):
        restore(fn, data)
    assert state_of(fn, fd) == before, what
    assert fn.migration.state == State.RESUMING
    os.close(fd)


@pytest.mark.parametrize("iova,why", [
    (0x80000, "outside"),  # no mapping there
    (0x11800, "bad extent"),  # crosses a page
    (0x11000 + PAGE, "outside"),  # past the end of the writable mapping
    (0x20000, "read-only"),
])
def test_pages_outside_the_destinations_mappings_are_refused_before_the_registers_change(
        iova: int, why: str) -> None:
    image = source_image()
    nic, fn, fd = destination()
    before = state_of(fn, fd)
    pages = [(0x10000, b"\xbb" * PAGE), (iova, b"\xcc" * PAGE)]  # one good, then one bad
    data = stream.full_record(image) + stream.extents_record(pages) + stream.end_record(image)
    with pytest.raises(SnapshotError, match=why):
        restore(fn, data)
    assert state_of(fn, fd) == before  # the good page was not written either
    assert fn.bank.get("SCRATCH") != 0x5A5A5A5A
    os.close(fd)


def test_a_valid_stream_still_restores_with_its_pages() -> None:
    image = source_image()
    nic, fn, fd = destination()
    data = stream.full_record(image) + stream.extents_record([(0x11000, b"\xdd" * PAGE)]) \
        + stream.end_record(image)
    restore(fn, data)
    assert fn.bank.get("SCRATCH") == 0x5A5A5A5A
    assert os.pread(fd, PAGE, 0x1000) == b"\xdd" * PAGE
    os.close(fd)
