"""VFIO_USER_DMA_MAP / VFIO_USER_DMA_UNMAP: mapping client memory, and the errors."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from vfnic.device.function import PciFunction
from vfnic.errors import DmaError
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient

# Shared fixtures and helpers (tests/conftest_proto.py), rewritten for assert messages.
pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    VENDOR_ID,
    RawConn,
    close_all,
    dma_map_payload,
    dma_unmap_payload,
    expect_errno,
    make_memfd,
    memfd_view,
    msg,
    open_fds,
    sock_path,
    wait_detached,
    wait_until,
)

MAP = wire.Command.DMA_MAP
UNMAP = wire.Command.DMA_UNMAP
PAGE = 4096
UNMAP_ALL = 1 << 1  # VFIO_DMA_UNMAP_FLAG_ALL
UNMAP_GET_DIRTY_BITMAP = 1 << 0


def regions(fn: PciFunction) -> list[tuple[int, int, int, bool]]:
    with fn.lock:
        return [(r.address, r.size, r.flags, r.fd is not None) for r in fn.dma.regions]


# -- mapping with an fd ---------------------------------------------------------------


def test_dma_map_with_memfd_is_mmapped_and_shared(client: VfioUserClient,
                                                  vf0: PciFunction) -> None:
    fd = make_memfd(4 * PAGE)
    view = memfd_view(fd, 4 * PAGE)
    try:
        client.dma_map(0x100000, 4 * PAGE, fd=fd)
        assert regions(vf0) == [(0x100000, 4 * PAGE, 3, True)]
        # The server's mapping and ours are the same memory, both ways.
        view[PAGE + 8 : PAGE + 12] = b"ABCD"
        with vf0.lock:
            assert vf0.dma.read(0x100000 + PAGE + 8, 4) == b"ABCD"
            vf0.dma.write(0x100000 + 3 * PAGE, b"from device")
        assert view[3 * PAGE : 3 * PAGE + 11] == b"from device"
    finally:
        view.close()
        os.close(fd)


def test_dma_map_fd_offset_not_page_aligned(client: VfioUserClient, vf0: PciFunction) -> None:
    fd = make_memfd(4 * PAGE)
    view = memfd_view(fd, 4 * PAGE)
    try:
        view[PAGE + 0x10 : PAGE + 0x14] = b"WXYZ"
        client.dma_map(0x200000, PAGE, fd=fd, offset=PAGE + 0x10)
        with vf0.lock:
            assert vf0.dma.read(0x200000, 4) == b"WXYZ"
    finally:
        view.close()
        os.close(fd)


def test_dma_map_read_only_region_refuses_device_writes(client: VfioUserClient,
                                                        vf0: PciFunction) -> None:
    fd = make_memfd(PAGE)
    try:
        client.dma_map(0x300000, PAGE, flags=wire.DMA_MAP_FLAG_READ, fd=fd)
    finally:
        os.close(fd)
    with vf0.lock, pytest.raises(DmaError):
        vf0.dma.write(0x300000, b"x")


def test_dma_map_closes_its_fd_copy_on_unmap(client: VfioUserClient, vf0: PciFunction) -> None:
    before = open_fds()
    fd = make_memfd(PAGE)
    client.dma_map(0x100000, PAGE, fd=fd)
    os.close(fd)
    client.dma_unmap(0x100000, PAGE)
    assert open_fds() == before


# -- mapping without an fd ------------------------------------------------------------


def test_dma_map_without_fd_is_recorded_for_message_access(client: VfioUserClient,
                                                           vf0: PciFunction) -> None:
    mem = client.add_memory(0x400000, 4 * PAGE)
    assert mem.address == 0x400000
    assert regions(vf0) == [(0x400000, 4 * PAGE, 3, False)]
    client.dma_unmap(0x400000, 4 * PAGE)
    assert regions(vf0) == []


def test_dma_map_many_regions_are_kept_sorted(client: VfioUserClient, vf0: PciFunction) -> None:
    for addr in (0x50000, 0x10000, 0x30000, 0x20000):
        client.dma_map(addr, PAGE)
    assert [r[0] for r in regions(vf0)] == [0x10000, 0x20000, 0x30000, 0x50000]
    # Adjacent (touching) regions do not overlap.
    client.dma_map(0x11000, PAGE)
    client.dma_map(0xF000, PAGE)


# -- DMA_MAP errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address,size",
    [(0x10000, PAGE), (0x10000, 2 * PAGE), (0xF000, 2 * PAGE), (0x10800, 0x100),
     (0x8000, 0x10000)],
    ids=["same", "longer", "straddles-start", "inside", "covers"],
)
def test_dma_map_overlap_is_eexist(client: VfioUserClient, vf0: PciFunction, address: int,
                                   size: int) -> None:
    client.dma_map(0x10000, PAGE)
    expect_errno(errno.EEXIST, client.dma_map, address, size)
    assert regions(vf0) == [(0x10000, PAGE, 3, False)]


def test_dma_map_overlap_with_fd_is_eexist_and_closes_fd(client: VfioUserClient,
                                                         vf0: PciFunction) -> None:
    client.dma_map(0x10000, PAGE)
    before = open_fds()
    fd = make_memfd(PAGE)
    expect_errno(errno.EEXIST, client.dma_map, 0x10000, PAGE, fd=fd)
    os.close(fd)
    assert open_fds() == before
    assert len(regions(vf0)) == 1


def test_dma_map_zero_size_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, 0), expect=errno.EINVAL)
    assert regions(vf0) == []


def test_dma_map_past_end_of_address_space_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    msg(conn, MAP, dma_map_payload((1 << 64) - PAGE, 2 * PAGE), expect=errno.EINVAL)
    msg(conn, MAP, dma_map_payload((1 << 64) - PAGE, PAGE))  # exactly to the end is fine
    assert regions(vf0) == [((1 << 64) - PAGE, PAGE, 3, False)]


@pytest.mark.parametrize("size", [0, 8, 24, 31, 33, 40, 64])
def test_dma_map_wrong_payload_size_is_einval(conn: RawConn, vf0: PciFunction,
                                              size: int) -> None:
    payload = dma_map_payload(0x10000, PAGE).ljust(64, b"\0")[:size]
    msg(conn, MAP, payload, expect=errno.EINVAL)
    assert regions(vf0) == []


@pytest.mark.parametrize("argsz", [0, 24, 31, 33, 0xFFFFFFFF])
def test_dma_map_wrong_argsz_is_einval(conn: RawConn, vf0: PciFunction, argsz: int) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE, argsz=argsz), expect=errno.EINVAL)
    assert regions(vf0) == []


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF])
def test_dma_map_unknown_flags_is_einval(conn: RawConn, vf0: PciFunction, flags: int) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE, flags=flags), expect=errno.EINVAL)
    assert regions(vf0) == []


def test_dma_map_two_fds_is_einval_and_closes_both(conn: RawConn, vf0: PciFunction) -> None:
    fds = [make_memfd(PAGE), make_memfd(PAGE)]
    before = open_fds()
    try:
        msg(conn, MAP, dma_map_payload(0x10000, PAGE), expect=errno.EINVAL, fds=fds)
    finally:
        close_all(fds)
    assert open_fds() == before - 2
    assert regions(vf0) == []


def test_dma_map_offset_without_fd_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE, offset=PAGE), expect=errno.EINVAL)
    assert regions(vf0) == []


def test_dma_map_unmappable_fd_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    r, w = os.pipe()
    try:
        msg(conn, MAP, dma_map_payload(0x10000, PAGE), expect=errno.EINVAL, fds=[r])
    finally:
        close_all([r, w])
    assert regions(vf0) == []
    assert conn.read_vendor_id() == VENDOR_ID


def test_dma_map_huge_size_with_fd_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    fd = make_memfd(PAGE)
    try:
        msg(conn, MAP, dma_map_payload(0x10000, 1 << 62), expect=errno.EINVAL, fds=[fd])
    finally:
        os.close(fd)
    assert regions(vf0) == []


def test_dma_map_larger_than_the_fd_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    # Mapping past the end of the file would fault (SIGBUS) on the first device access.
    fd = make_memfd(PAGE)
    try:
        msg(conn, MAP, dma_map_payload(0x10000, 2 * PAGE), expect=errno.EINVAL, fds=[fd])
        msg(conn, MAP, dma_map_payload(0x10000, PAGE, offset=PAGE), expect=errno.EINVAL,
            fds=[fd])
    finally:
        os.close(fd)
    assert regions(vf0) == []


# -- DMA_UNMAP -----------------------------------------------------------------------


def test_dma_unmap_exact_match_echoes_the_entry(conn: RawConn, vf0: PciFunction) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, 2 * PAGE))
    payload = dma_unmap_payload(0x10000, 2 * PAGE)
    assert msg(conn, UNMAP, payload) == payload
    assert regions(vf0) == []


@pytest.mark.parametrize(
    "address,size",
    [(0x10000, PAGE), (0x10000, 4 * PAGE), (0x11000, PAGE), (0x0F000, 3 * PAGE),
     (0x90000, PAGE)],
    ids=["shorter", "longer", "inside", "covers", "elsewhere"],
)
def test_dma_unmap_mismatch_is_enoent(conn: RawConn, vf0: PciFunction, address: int,
                                      size: int) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, 2 * PAGE))
    msg(conn, UNMAP, dma_unmap_payload(address, size), expect=errno.ENOENT)
    assert regions(vf0) == [(0x10000, 2 * PAGE, 3, False)]


def test_dma_unmap_twice_is_enoent(conn: RawConn) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE))
    msg(conn, UNMAP, dma_unmap_payload(0x10000, PAGE))
    msg(conn, UNMAP, dma_unmap_payload(0x10000, PAGE), expect=errno.ENOENT)


def test_dma_unmap_all(conn: RawConn, vf0: PciFunction) -> None:
    fd = make_memfd(PAGE)
    try:
        msg(conn, MAP, dma_map_payload(0x10000, PAGE), fds=[fd])
    finally:
        os.close(fd)
    msg(conn, MAP, dma_map_payload(0x20000, PAGE))
    msg(conn, UNMAP, dma_unmap_payload(0, 0, flags=UNMAP_ALL))
    assert regions(vf0) == []


def test_dma_unmap_all_with_an_address_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE))
    msg(conn, UNMAP, dma_unmap_payload(0x10000, PAGE, flags=UNMAP_ALL), expect=errno.EINVAL)
    assert len(regions(vf0)) == 1


@pytest.mark.parametrize("flags", [UNMAP_GET_DIRTY_BITMAP, 1 << 2, 0xFFFFFFFF])
def test_dma_unmap_unknown_flags_is_einval(conn: RawConn, vf0: PciFunction,
                                           flags: int) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE))
    msg(conn, UNMAP, dma_unmap_payload(0x10000, PAGE, flags=flags), expect=errno.EINVAL)
    assert len(regions(vf0)) == 1


@pytest.mark.parametrize("size", [0, 16, 23, 25, 32])
def test_dma_unmap_wrong_payload_size_is_einval(conn: RawConn, vf0: PciFunction,
                                                size: int) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE))
    payload = dma_unmap_payload(0x10000, PAGE).ljust(32, b"\0")[:size]
    msg(conn, UNMAP, payload, expect=errno.EINVAL)
    assert len(regions(vf0)) == 1


@pytest.mark.parametrize("argsz", [0, 16, 23])
def test_dma_unmap_argsz_too_small_is_einval(conn: RawConn, vf0: PciFunction,
                                             argsz: int) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE))
    msg(conn, UNMAP, dma_unmap_payload(0x10000, PAGE, argsz=argsz), expect=errno.EINVAL)
    assert len(regions(vf0)) == 1


def test_dma_unmap_with_an_fd_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    msg(conn, MAP, dma_map_payload(0x10000, PAGE))
    fd = make_memfd(PAGE)
    try:
        msg(conn, UNMAP, dma_unmap_payload(0x10000, PAGE), expect=errno.EINVAL, fds=[fd])
    finally:
        os.close(fd)
    assert len(regions(vf0)) == 1


# -- client lifetime -------------------------------------------------------------------


def test_dma_mappings_are_dropped_when_the_client_disconnects(nic_server: Any,
                                                              vf0: PciFunction) -> None:
    before = open_fds()
    fd = make_memfd(PAGE)
    c = VfioUserClient(sock_path(nic_server))
    c.dma_map(0x10000, PAGE, fd=fd)
    c.dma_map(0x20000, PAGE)
    os.close(fd)
    assert len(regions(vf0)) == 2
    c.close()
    wait_detached(nic_server)
    assert regions(vf0) == []
    # the server's copy of the memfd is gone too (its threads finish closing)
    wait_until(lambda: open_fds() == before, what="fds released")
    with VfioUserClient(sock_path(nic_server)) as again:
        again.dma_map(0x10000, PAGE)
        again.dma_map(0x20000, PAGE)
        assert len(regions(vf0)) == 2
