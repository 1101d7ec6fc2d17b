"""DMA dirty page logging reports exactly the pages the device wrote."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from devicelink import DeviceLink
from hypothesis import given, settings
from hypothesis import strategies as st

from vfnic.device.nic import NicServer
from vfnic.errors import RemoteError
from vfnic.vfiouser.client import VfioUserClient

BASE = 0x4000_0000
SIZE = 64 * 4096


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[NicServer, VfioUserClient, DeviceLink]]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="vfdl-", dir="/tmp"))
    srv = NicServer(path / "nic", 1)
    srv.start()
    qemu = VfioUserClient(str(srv.dir / "vf0.sock"))  # plays QEMU: maps guest RAM
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, SIZE)
    qemu.dma_map(BASE, SIZE, 3, fd, 0)
    os.close(fd)
    qemu.config_write(4, 2, 0x6)  # memory space + bus master
    link = DeviceLink(qemu)  # the owner session: a second one is read-only
    yield srv, qemu, link
    link.close()
    qemu.close()
    srv.stop()


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 9000)), max_size=12),
       page_size=st.sampled_from([4096, 8192, 16384]))
def test_report_is_exactly_the_pages_written(setup, writes, page_size: int) -> None:  # type: ignore[no-untyped-def]
    srv, _qemu, link = setup
    fn = srv.nic.vfs[0]
    assert link.logging_start(4096) == 4096
    try:
        expected: set[int] = set()
        for off, length in writes:
            length = min(length, SIZE - off)
            with srv.nic.lock:
                fn.dma_write(BASE + off, b"\x5a" * length)
            first, last = (BASE + off) // page_size, (BASE + off + length - 1) // page_size
            expected.update(p * page_size for p in range(first, last + 1))
        reported = set(link.logging_report(BASE, SIZE, page_size))
        assert reported == expected
        assert link.logging_report(BASE, SIZE, page_size) == []  # a report clears
    finally:
        link.logging_stop()


def test_report_covers_only_the_requested_range(setup) -> None:  # type: ignore[no-untyped-def]
    srv, _qemu, link = setup
    fn = srv.nic.vfs[0]
    link.logging_start()
    try:
        with srv.nic.lock:
            fn.dma_write(BASE + 0x1000, b"x")
            fn.dma_write(BASE + 0x9000, b"y")
        assert link.logging_report(BASE + 0x8000, 0x4000) == [BASE + 0x9000]
        assert link.logging_report(BASE, 0x4000) == [BASE + 0x1000]
    finally:
        link.logging_stop()


def test_logging_errors(setup) -> None:  # type: ignore[no-untyped-def]
    _srv, _qemu, link = setup
    with pytest.raises(RemoteError):  # report without start
        link.logging_report(BASE, SIZE)
    with pytest.raises(RemoteError):  # stop without start
        link.logging_stop()
    link.logging_start()
    try:
        with pytest.raises(RemoteError) as err:  # start twice
            link.logging_start()
        assert err.value.errno == 16  # EBUSY
        with pytest.raises(RemoteError):  # page size not a power of two
            link.logging_report(BASE, SIZE, 3000)
    finally:
        link.logging_stop()


def test_device_dma_without_logging_is_not_recorded(setup) -> None:  # type: ignore[no-untyped-def]
    srv, _qemu, link = setup
    with srv.nic.lock:
        srv.nic.vfs[0].dma_write(BASE, b"z")
    link.logging_start()
    try:
        assert link.logging_report(BASE, SIZE) == []
    finally:
        link.logging_stop()


def test_rx_frames_dirty_their_buffers_and_descriptors(setup) -> None:  # type: ignore[no-untyped-def]
    srv, qemu, link = setup
    fn = srv.nic.vfs[0]
    ring, buf = BASE + 0x20000, BASE + 0x30000
    import struct

    desc = struct.pack("<QHHBBH", buf, 0, 0, 0, 0, 0)
    with srv.nic.lock:
        fn.dma.write(ring, desc * 8)
        fn.dma.dirty_log = None
    qemu.write32(0, 0x1000, ring & 0xFFFFFFFF)
    qemu.write32(0, 0x1004, ring >> 32)
    qemu.write32(0, 0x1008, 128)
    qemu.write32(0, 0x1014, 1 << 25)
    qemu.write32(0, 0x1010, 4)
    qemu.write32(0, 0, 1 << 6)  # link up
    link.logging_start()
    try:
        fn.datapath.receive(fn.mac + b"\x02\x00\x00\x00\x00\x01\x08\x00" + b"\x00" * 50)
        assert set(link.logging_report(BASE, SIZE)) == {ring, buf}
    finally:
        link.logging_stop()
