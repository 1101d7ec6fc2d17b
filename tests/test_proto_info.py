"""DEVICE_GET_INFO, DEVICE_GET_REGION_INFO, DEVICE_GET_REGION_IO_FDS, DEVICE_GET_IRQ_INFO."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient

# Shared fixtures and helpers (tests/conftest_proto.py), rewritten for assert messages.
pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    RawConn,
    make_eventfds,
    msg,
    open_fds,
    sock_path,
)

GET_INFO = wire.Command.DEVICE_GET_INFO
REGION_INFO = wire.Command.DEVICE_GET_REGION_INFO
IO_FDS = wire.Command.DEVICE_GET_REGION_IO_FDS
IRQ_INFO = wire.Command.DEVICE_GET_IRQ_INFO

RW = wire.VFIO_REGION_INFO_FLAG_READ | wire.VFIO_REGION_INFO_FLAG_WRITE
EXPECTED_REGIONS = {0: (RW, 0x4000), 3: (RW, 0x4000), 7: (RW, 4096)}


def info_payload(argsz: int = 16) -> bytes:
    return wire.build(wire.DeviceInfo, argsz=argsz, flags=0, num_regions=0, num_irqs=0)


def region_info_payload(index: int, argsz: int = 32) -> bytes:
    return wire.build(wire.RegionInfo, argsz=argsz, flags=0, index=index, cap_offset=0, size=0,
                      offset=0)


def io_fds_payload(index: int, argsz: int = 16, flags: int = 0, count: int = 0) -> bytes:
    return wire.build(wire.RegionIoFds, argsz=argsz, flags=flags, index=index, count=count)


def irq_info_payload(index: int, argsz: int = 16) -> bytes:
    return wire.build(wire.IrqInfo, argsz=argsz, flags=0, index=index, count=0)


# -- DEVICE_GET_INFO -------------------------------------------------------------------


def test_device_info_reports_reset_pci_9_regions_5_irqs(client: VfioUserClient) -> None:
    info = client.device_info()
    assert info.argsz == 16
    assert info.flags == wire.VFIO_DEVICE_FLAGS_RESET | wire.VFIO_DEVICE_FLAGS_PCI
    assert info.num_regions == 9
    assert info.num_irqs == 5


def test_device_info_larger_argsz_is_accepted(conn: RawConn) -> None:
    reply = wire.DeviceInfo.parse(msg(conn, GET_INFO, info_payload(argsz=64)))
    assert reply.argsz == 16 and reply.num_regions == 9


@pytest.mark.parametrize("argsz", [0, 8, 15])
def test_device_info_argsz_too_small_is_einval(conn: RawConn, argsz: int) -> None:
    msg(conn, GET_INFO, info_payload(argsz), expect=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 4, 15])
def test_device_info_short_payload_is_einval(conn: RawConn, size: int) -> None:
    msg(conn, GET_INFO, info_payload()[:size], expect=errno.EINVAL)


def test_device_info_with_an_fd_is_einval_and_closes_it(conn: RawConn) -> None:
    [fd] = make_eventfds(1)
    before = open_fds()
    msg(conn, GET_INFO, info_payload(), expect=errno.EINVAL, fds=[fd])
    os.close(fd)
    assert open_fds() == before - 1


# -- DEVICE_GET_REGION_INFO --------------------------------------------------------------


@pytest.mark.parametrize("index", range(9))
def test_region_info_for_each_index(client: VfioUserClient, index: int) -> None:
    info = client.region_info(index)
    flags, size = EXPECTED_REGIONS.get(index, (0, 0))
    assert info.index == index
    assert info.argsz == 32
    assert info.size == size
    assert info.flags & RW == flags
    assert info.cap_offset == 0  # no capabilities: nothing past the 32 bytes


def test_region_info_is_the_same_for_the_pf(pf_client: VfioUserClient) -> None:
    for index in range(9):
        info = pf_client.region_info(index)
        assert (info.flags & RW, info.size) == EXPECTED_REGIONS.get(index, (0, 0))


@pytest.mark.parametrize("index", [9, 10, 0x100, 0xFFFFFFFF])
def test_region_info_bad_index_is_einval(conn: RawConn, index: int) -> None:
    msg(conn, REGION_INFO, region_info_payload(index), expect=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 8, 16, 31])
def test_region_info_short_payload_is_einval(conn: RawConn, size: int) -> None:
    msg(conn, REGION_INFO, region_info_payload(0)[:size], expect=errno.EINVAL)


@pytest.mark.parametrize("argsz", [0, 16, 31])
def test_region_info_argsz_too_small_is_einval(conn: RawConn, argsz: int) -> None:
    msg(conn, REGION_INFO, region_info_payload(0, argsz), expect=errno.EINVAL)


def test_region_info_larger_argsz_is_accepted(conn: RawConn) -> None:
    reply = wire.RegionInfo.parse(msg(conn, REGION_INFO, region_info_payload(7, argsz=4096)))
    assert reply.size == 4096 and reply.argsz == 32


# -- DEVICE_GET_REGION_IO_FDS --------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 3, 7, 1])
def test_region_io_fds_reports_no_ioeventfds(conn: RawConn, index: int) -> None:
    reply_msg = conn.call(IO_FDS, io_fds_payload(index))
    assert not reply_msg.is_error
    assert reply_msg.fds == []
    reply = wire.RegionIoFds.parse(reply_msg.payload[:16])
    assert reply.index == index
    assert reply.count == 0
    assert reply.argsz == 16


@pytest.mark.parametrize("index", [9, 0xFFFFFFFF])
def test_region_io_fds_bad_index_is_einval(conn: RawConn, index: int) -> None:
    msg(conn, IO_FDS, io_fds_payload(index), expect=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 12, 15])
def test_region_io_fds_short_payload_is_einval(conn: RawConn, size: int) -> None:
    msg(conn, IO_FDS, io_fds_payload(0)[:size], expect=errno.EINVAL)


@pytest.mark.parametrize("argsz", [0, 15])
def test_region_io_fds_argsz_too_small_is_einval(conn: RawConn, argsz: int) -> None:
    msg(conn, IO_FDS, io_fds_payload(0, argsz=argsz), expect=errno.EINVAL)


@pytest.mark.parametrize("flags", [1, 0x80000000])
def test_region_io_fds_nonzero_flags_is_einval(conn: RawConn, flags: int) -> None:
    msg(conn, IO_FDS, io_fds_payload(0, flags=flags), expect=errno.EINVAL)


# -- DEVICE_GET_IRQ_INFO -------------------------------------------------------------------


def test_irq_info_vf_has_no_intx(client: VfioUserClient) -> None:
    info = client.irq_info(wire.PciIrq.INTX)
    assert info.index == wire.PciIrq.INTX
    assert info.count == 0


def test_irq_info_pf_has_one_intx(pf_client: VfioUserClient) -> None:
    info = pf_client.irq_info(wire.PciIrq.INTX)
    assert info.count == 1
    assert info.flags & wire.VFIO_IRQ_INFO_EVENTFD
    assert info.flags & wire.VFIO_IRQ_INFO_MASKABLE


@pytest.mark.parametrize("name", ["vf0", "vf1", "pf"])
def test_irq_info_msix_has_4_vectors(nic_server: Any, name: str) -> None:
    with VfioUserClient(sock_path(nic_server, name)) as c:
        info = c.irq_info(wire.PciIrq.MSIX)
        assert info.argsz == 16
        assert info.index == wire.PciIrq.MSIX
        assert info.count == 4
        assert info.flags & wire.VFIO_IRQ_INFO_EVENTFD
        # vectors are armed one at a time (vfio-pci's dynamic MSI-X): no NORESIZE
        assert not info.flags & wire.VFIO_IRQ_INFO_NORESIZE


@pytest.mark.parametrize("index", [wire.PciIrq.ERR, wire.PciIrq.REQ])
def test_irq_info_err_and_req_have_no_vectors(client: VfioUserClient, index: int) -> None:
    info = client.irq_info(index)
    assert info.index == index
    assert info.count == 0


def test_irq_info_msi_answers(client: VfioUserClient) -> None:
    info = client.irq_info(wire.PciIrq.MSI)
    assert info.index == wire.PciIrq.MSI
    assert info.flags & wire.VFIO_IRQ_INFO_EVENTFD


@pytest.mark.parametrize("index", [5, 6, 0xFFFFFFFF])
def test_irq_info_bad_index_is_einval(conn: RawConn, index: int) -> None:
    msg(conn, IRQ_INFO, irq_info_payload(index), expect=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 8, 15])
def test_irq_info_short_payload_is_einval(conn: RawConn, size: int) -> None:
    msg(conn, IRQ_INFO, irq_info_payload(2)[:size], expect=errno.EINVAL)


@pytest.mark.parametrize("argsz", [0, 15])
def test_irq_info_argsz_too_small_is_einval(conn: RawConn, argsz: int) -> None:
    msg(conn, IRQ_INFO, irq_info_payload(2, argsz=argsz), expect=errno.EINVAL)
