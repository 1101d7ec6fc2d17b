"""GuestBus without a guest: a fake sysfs tree for discovery, BAR0 and config space;
the real /proc/self/pagemap (as root) for address translation; DmaMemory.touch."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from vfnic.guestdriver import bus as B
from vfnic.guestdriver.bus import BusError, DmaMemory, GuestBus, find_functions

OTHER = ("0000:00:03.0", 0x1AF4, 0x1000)  # a virtio NIC
PF = ("0000:00:04.0", B.VENDOR_ID, B.PF_DEVICE_ID)
VF = ("0000:00:05.0", B.VENDOR_ID, B.VF_DEVICE_ID)
VF2 = ("0000:00:06.0", B.VENDOR_ID, B.VF_DEVICE_ID)


def fake_sysfs(root: Path, *functions: tuple[str, int, int]) -> Path:
    for bdf, vendor, device in functions:
        d = root / bdf
        d.mkdir(parents=True)
        (d / "vendor").write_text(f"{vendor:#06x}\n")
        (d / "device").write_text(f"{device:#06x}\n")
        (d / "config").write_bytes(struct.pack("<HH", vendor, device).ljust(256, b"\0"))
        (d / "resource0").write_bytes(bytes(0x4000))
    return root


def test_find_functions_lists_vfs_before_the_pf(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, OTHER, PF, VF2, VF)
    assert find_functions(str(root)) == [VF[0], VF2[0], PF[0]]
    assert find_functions(str(tmp_path / "none")) == []


def test_guest_bus_picks_the_first_vf(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, OTHER, PF, VF)
    bus = GuestBus(sysfs=str(root))
    try:
        assert bus.name == VF[0] and bus.is_vf
    finally:
        bus.close()


def test_guest_bus_takes_a_short_bdf(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, PF, VF)
    bus = GuestBus("00:04.0", sysfs=str(root))
    try:
        assert bus.name == PF[0] and not bus.is_vf
    finally:
        bus.close()


def test_bar0_accesses_are_32_bit_little_endian(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, VF)
    bus = GuestBus(sysfs=str(root))
    try:
        bus.write32(0x1010, 0x12345678)
        bus.write32(0x3FFC, 0xFFFFFFFF)
        with open(root / VF[0] / "resource0", "rb") as f:
            data = f.read()
        assert data[0x1010:0x1014] == bytes.fromhex("78563412")
        assert data[0x3FFC:] == b"\xff" * 4
        assert bus.read32(0x1010) == 0x12345678
        assert bus.read32(0x1014) == 0
    finally:
        bus.close()


def test_config_space_and_bus_mastering(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, VF)
    bus = GuestBus(sysfs=str(root))
    try:
        assert bus.config_read(0, 2) == B.VENDOR_ID
        assert bus.config_read(2, 2) == B.VF_DEVICE_ID
        bus.config_write(B.PCI_COMMAND, 2, 0x0400)  # INTx disable, already set
        bus.enable_bus_master()
        cmd = (root / VF[0] / "config").read_bytes()[4:6]
        assert int.from_bytes(cmd, "little") == 0x0400 | B.COMMAND_MEMORY | B.COMMAND_MASTER
    finally:
        bus.close()


def test_no_function_is_a_clear_error(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, OTHER)
    with pytest.raises(BusError, match="no vfnic function"):
        GuestBus(sysfs=str(root))
    with pytest.raises(BusError, match="0000:00:03.0: no vfnic function"):
        GuestBus("00:03.0", sysfs=str(root))


def test_a_bound_kernel_driver_is_refused(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, VF)
    (tmp_path / "drivers" / "uio_pci_generic").mkdir(parents=True)
    (root / VF[0] / "driver").symlink_to(tmp_path / "drivers" / "uio_pci_generic")
    with pytest.raises(BusError, match="uio_pci_generic is bound"):
        GuestBus(sysfs=str(root))


@pytest.mark.skipif(os.geteuid() != 0, reason="pagemap shows PFNs to root only")
def test_virt_to_phys_keeps_the_page_offset() -> None:
    mm = mmap.mmap(-1, 2 * B.PAGE_SIZE)
    try:
        mm[0] = mm[B.PAGE_SIZE] = 1
        addr = B.buffer_address(mm)
        B.mlock(addr, 2 * B.PAGE_SIZE)
        phys = B.virt_to_phys(addr + 0x123)
        assert phys % B.PAGE_SIZE == (addr + 0x123) % B.PAGE_SIZE and phys >= B.PAGE_SIZE
    finally:
        mm.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_hugepage_dma_memory_is_contiguous_and_aligned(
    tmp_path: Path, two_huge_pages: None
) -> None:
    root = fake_sysfs(tmp_path / "sys", VF)
    bus = GuestBus(sysfs=str(root))
    try:
        ring = bus.alloc_dma(2048, 128)
        bufs = bus.alloc_dma(128 * 2048, 2048)
        assert ring.phys % 128 == 0 and bufs.phys % 2048 == 0
        assert bufs.phys - ring.phys == 2048  # same huge page, packed
        bufs.view[-1] = 7
        assert B.virt_to_phys(B.buffer_address(bus._maps[0]) + 4096) == ring.phys + 4096
    finally:
        bus.close()


def test_touch_rewrites_one_byte_per_page_and_keeps_the_data() -> None:
    data = bytearray(range(256)) * 48  # 3 pages
    mem = DmaMemory(0x10000, memoryview(data))
    assert mem.touch(0, 1) == 1
    assert mem.touch(100, 4096) == 2  # 100..4195 spans two pages
    assert mem.touch(0, len(data)) == 3
    assert mem.touch(4095, 2) == 2
    assert data == bytearray(range(256)) * 48
    unaligned = DmaMemory(0x10800, memoryview(data)[:4096])  # starts mid-page
    assert unaligned.touch(0, 4096) == 2
