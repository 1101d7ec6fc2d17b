"""DEVICE_RESET (and the device's own resets), DEVICE_FEATURE, MIG_DATA_*, unknown
commands, and header/framing errors."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from typing import Any

import pytest

from vfnic.device import snapshot
from vfnic.device.function import PciFunction
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient

# Shared fixtures and helpers (tests/conftest_proto.py), rewritten for assert messages.
pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    BAR0,
    CFG_COMMAND,
    CFG_DEVCTL,
    CFG_MSIX_FLAGS,
    CONFIG,
    DEVCTL_FLR,
    MSIX_BAR,
    MSIX_ENABLE,
    REG_CTRL,
    REG_EIMS,
    REG_MTA,
    REG_RAH,
    REG_RAL,
    VENDOR_ID,
    RawConn,
    close_all,
    expect_errno,
    make_eventfds,
    msg,
    open_fds,
    region_access,
    sock_path,
    u32,
)

RESET = wire.Command.DEVICE_RESET
FEATURE = wire.Command.DEVICE_FEATURE
MIG_READ = wire.Command.MIG_DATA_READ
MIG_WRITE = wire.Command.MIG_DATA_WRITE
GET = wire.VFIO_DEVICE_FEATURE_GET
SET = wire.VFIO_DEVICE_FEATURE_SET
PROBE = wire.VFIO_DEVICE_FEATURE_PROBE
MAX_BODY = (1 << 20) + 4096  # largest payload the server accepts

VF0_MAC = bytes([0x02, 0x56, 0x46, 0x00, 0x00, 0x01])
RAL_RESET = int.from_bytes(VF0_MAC[:4], "little")
RAH_RESET = int.from_bytes(VF0_MAC[4:], "little") | 1 << 31
CTRL_RST = 1 << 26


def dirty_the_device(c: VfioUserClient) -> None:
    c.write32(BAR0, REG_RAL, 0x11223344)
    c.write32(BAR0, REG_RAH, 0x80005566)
    c.write32(BAR0, REG_MTA, 0xFFFF)
    c.write32(BAR0, REG_EIMS, 0x3)
    c.config_write(CFG_COMMAND, 2, 0x6)  # memory + bus master
    c.config_write(CFG_MSIX_FLAGS, 2, MSIX_ENABLE)
    c.write32(MSIX_BAR, 12, 0)  # unmask vector 0 in the MSI-X table
    assert c.read32(BAR0, REG_RAL) == 0x11223344


def assert_reset_values(c: VfioUserClient) -> None:
    assert c.read32(BAR0, REG_RAL) == RAL_RESET
    assert c.read32(BAR0, REG_RAH) == RAH_RESET
    assert c.read32(BAR0, REG_MTA) == 0
    assert c.read32(BAR0, REG_EIMS) == 0
    assert c.config_read(CFG_COMMAND, 2) == 0
    assert c.config_read(CFG_MSIX_FLAGS, 2) & MSIX_ENABLE == 0
    assert c.read32(MSIX_BAR, 12) == 1  # vector masked after reset
    assert c.config_read(0, 2) == VENDOR_ID


# -- DEVICE_RESET ---------------------------------------------------------------------


def test_device_reset_restores_permanent_mac_and_reset_values(client: VfioUserClient) -> None:
    dirty_the_device(client)
    client.reset()
    assert_reset_values(client)


def test_device_reset_reply_is_empty(conn: RawConn) -> None:
    assert msg(conn, RESET) == b""


def test_device_reset_keeps_dma_mappings_and_eventfds(client: VfioUserClient,
                                                      vf0: PciFunction) -> None:
    # QEMU maps memory and sets up an eventfd before it resets the device.
    client.dma_map(0x10000, 0x1000)
    [efd] = make_eventfds(1)
    try:
        client.set_irqs(wire.PciIrq.MSIX, wire.VFIO_IRQ_SET_DATA_EVENTFD
                        | wire.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 1, fds=[efd])
        client.reset()
        with vf0.lock:
            assert [(r.address, r.size) for r in vf0.dma.regions] == [(0x10000, 0x1000)]
            assert list(vf0.irq_fds) == [(wire.PciIrq.MSIX, 0)]
    finally:
        os.close(efd)


def test_device_reset_with_an_fd_is_einval(conn: RawConn) -> None:
    [efd] = make_eventfds(1)
    try:
        msg(conn, RESET, expect=errno.EINVAL, fds=[efd])
    finally:
        os.close(efd)


@pytest.mark.parametrize(
    "offset,size,value",
    [(CFG_DEVCTL, 2, DEVCTL_FLR), (CFG_DEVCTL + 1, 1, 0x80), (CFG_DEVCTL, 4, DEVCTL_FLR | 0x2810),
     (CFG_DEVCTL - 2, 4, DEVCTL_FLR << 16)],
    ids=["word", "byte", "dword", "dword-below"],
)
def test_pcie_flr_resets_the_function(client: VfioUserClient, offset: int, size: int,
                                      value: int) -> None:
    dirty_the_device(client)
    client.config_write(offset, size, value)
    assert_reset_values(client)
    assert client.config_read(CFG_DEVCTL, 2) & DEVCTL_FLR == 0  # reads as 0


def test_devctl_write_without_flr_does_not_reset(client: VfioUserClient) -> None:
    dirty_the_device(client)
    client.config_write(CFG_DEVCTL, 2, 0x7FFF)
    assert client.read32(BAR0, REG_RAL) == 0x11223344
    assert client.config_read(CFG_DEVCTL, 2) == 0x7FFF


def test_ctrl_rst_resets_the_function(client: VfioUserClient) -> None:
    dirty_the_device(client)
    client.write32(BAR0, REG_CTRL, CTRL_RST)
    assert client.read32(BAR0, REG_RAL) == RAL_RESET
    assert client.read32(BAR0, REG_CTRL) & CTRL_RST == 0  # self-clearing


# -- DEVICE_FEATURE ---------------------------------------------------------------------

UNKNOWN_FEATURES = [0, 3, 5, 0x100, 0xFFFF]


@pytest.mark.parametrize("feature", UNKNOWN_FEATURES)
@pytest.mark.parametrize(
    "action", [PROBE, PROBE | GET, PROBE | SET, GET, SET],
    ids=["probe", "probe-get", "probe-set", "get", "set"],
)
def test_device_feature_unknown_is_enotty(client: VfioUserClient, feature: int,
                                          action: int) -> None:
    expect_errno(errno.ENOTTY, client.feature, action | feature, b"\0" * 8)


@pytest.mark.parametrize("size", [0, 4, 7])
def test_device_feature_short_payload_is_einval(conn: RawConn, size: int) -> None:
    payload = wire.build(wire.DeviceFeature, argsz=8, flags=PROBE)[:size]
    msg(conn, FEATURE, payload, expect=errno.EINVAL)


@pytest.mark.parametrize("argsz", [0, 7])
def test_device_feature_argsz_too_small_is_einval(conn: RawConn, argsz: int) -> None:
    msg(conn, FEATURE, wire.build(wire.DeviceFeature, argsz=argsz, flags=PROBE | 1),
        expect=errno.EINVAL)


# -- MIG_DATA_READ / MIG_DATA_WRITE outside a migration -----------------------------------


def test_mig_data_read_when_not_migrating_is_einval(client: VfioUserClient) -> None:
    expect_errno(errno.EINVAL, client.mig_data_read, 64)
    expect_errno(errno.EINVAL, client.mig_data_read, 0)


def test_mig_data_write_when_not_migrating_is_einval(client: VfioUserClient,
                                                     vf0: PciFunction) -> None:
    with vf0.lock:
        image = snapshot.save(vf0)
    expect_errno(errno.EINVAL, client.mig_data_write, image)
    expect_errno(errno.EINVAL, client.mig_data_write, b"")
    assert client.config_read(0, 2) == VENDOR_ID


@pytest.mark.parametrize("size", [0, 4, 7, 9, 16])
def test_mig_data_read_wrong_payload_size_is_einval(conn: RawConn, size: int) -> None:
    payload = wire.build(wire.MigData, argsz=8 + 16, size=16).ljust(16, b"\0")[:size]
    msg(conn, MIG_READ, payload, expect=errno.EINVAL)


@pytest.mark.parametrize(
    "argsz,size", [(0, 0), (7, 0), (8, 1), (100, 200), (8 + (2 << 20), 2 << 20)],
)
def test_mig_data_read_bad_sizes_are_einval(conn: RawConn, argsz: int, size: int) -> None:
    msg(conn, MIG_READ, wire.build(wire.MigData, argsz=argsz, size=size), expect=errno.EINVAL)


@pytest.mark.parametrize(
    "argsz,size,data_len", [(8, 4, 4), (12, 4, 3), (12, 4, 5), (12, 0xFFFFFFFF, 4)],
)
def test_mig_data_write_bad_sizes_are_einval(conn: RawConn, argsz: int, size: int,
                                             data_len: int) -> None:
    payload = wire.build(wire.MigData, argsz=argsz, size=size) + b"\0" * data_len
    msg(conn, MIG_WRITE, payload, expect=errno.EINVAL)


def test_mig_data_write_short_payload_is_einval(conn: RawConn) -> None:
    msg(conn, MIG_WRITE, b"\x08\0\0\0", expect=errno.EINVAL)


# -- unknown and misdirected commands ---------------------------------------------------------


@pytest.mark.parametrize("command", [0, 14, 19, 99, 0x7FFF, 0xFFFF])
def test_unknown_command_is_enosys(conn: RawConn, command: int) -> None:
    msg(conn, command, b"\0" * 16, expect=errno.ENOSYS)
    msg(conn, command, b"", expect=errno.ENOSYS)
    assert conn.read_vendor_id() == VENDOR_ID


def test_unknown_command_with_no_reply_gets_no_reply(conn: RawConn) -> None:
    conn.send(99, b"", flags=wire.FLAG_NO_REPLY)
    assert conn.read_vendor_id() == VENDOR_ID
    conn.assert_no_reply()


@pytest.mark.parametrize("command", [wire.Command.DMA_READ, wire.Command.DMA_WRITE])
def test_server_to_client_command_sent_to_server_is_einval(conn: RawConn, command: int) -> None:
    payload = wire.build(wire.DmaAccess, address=0x1000, count=4)
    if command == wire.Command.DMA_WRITE:
        payload += b"\0" * 4
    msg(conn, command, payload, expect=errno.EINVAL)
    assert conn.read_vendor_id() == VENDOR_ID


# -- header and framing errors ------------------------------------------------------------------


@pytest.mark.parametrize("flags", [0x2, 0xF, 0x40, 0x100, 0x80000000],
                         ids=["type-2", "type-15", "bit6", "bit8", "bit31"])
def test_bad_header_flags_is_einval(conn: RawConn, vf0: PciFunction, flags: int) -> None:
    before = vf0.config.read(0, 0x40)
    reply = conn.expect_errno(wire.Command.REGION_WRITE,
                              region_access(CONFIG, 0x3C, 1) + b"\x7f", errno.EINVAL,
                              flags=flags)
    assert reply.command == wire.Command.REGION_WRITE
    assert vf0.config.read(0, 0x40) == before
    assert conn.read_vendor_id() == VENDOR_ID


def test_reply_sent_to_the_server_is_ignored(conn: RawConn, vf0: PciFunction) -> None:
    conn.send(wire.Command.REGION_WRITE, region_access(CONFIG, 0x3C, 1) + b"\x7f",
              flags=wire.TYPE_REPLY)
    assert conn.read_vendor_id() == VENDOR_ID  # the first reply we see is the read's
    assert vf0.config.read(0x3C, 1) == b"\0"
    conn.assert_no_reply()


@pytest.mark.parametrize("size", [0, 1, 8, 15])
def test_message_size_below_header_is_einval_and_server_keeps_serving(conn: RawConn,
                                                                      size: int) -> None:
    conn.send_raw(struct.pack("<HHIII", 0x4242, wire.Command.DEVICE_RESET, size, 0, 0))
    reply = conn.recv()
    assert reply.msg_id == 0x4242
    assert reply.command == wire.Command.DEVICE_RESET
    assert reply.is_error and reply.error == errno.EINVAL
    assert conn.read_vendor_id() == VENDOR_ID


def test_oversized_message_is_e2big_and_server_keeps_serving(conn: RawConn) -> None:
    body = MAX_BODY + 1
    header = struct.pack("<HHIII", 0x4343, wire.Command.REGION_WRITE, 16 + body, 0, 0)
    conn.send_raw(header + region_access(BAR0, REG_MTA, body - 16) + b"\xee" * (body - 16))
    reply = conn.recv()
    assert reply.msg_id == 0x4343
    assert reply.is_error and reply.error == errno.E2BIG
    assert conn.read_vendor_id() == VENDOR_ID
    assert conn.read32(BAR0, REG_MTA) == 0


def test_largest_message_is_accepted(conn: RawConn) -> None:
    # A payload of exactly the limit is framed normally (and refused by the
    # command for its own reasons, not E2BIG).
    payload = region_access(BAR0, 0, MAX_BODY - 16) + b"\0" * (MAX_BODY - 16)
    msg(conn, wire.Command.REGION_WRITE, payload, expect=errno.EINVAL)
    assert conn.read_vendor_id() == VENDOR_ID


def test_message_split_across_writes_is_reassembled(conn: RawConn) -> None:
    data = struct.pack("<HHIII", 0x4444, wire.Command.REGION_WRITE, 16 + 20, 0, 0)
    data += region_access(BAR0, REG_MTA, 4) + u32(0x5A5A5A5A)
    for i in range(0, len(data), 5):
        conn.send_raw(data[i : i + 5])
        time.sleep(0.002)
    reply = conn.recv()
    assert reply.msg_id == 0x4444 and not reply.is_error
    assert conn.read32(BAR0, REG_MTA) == 0x5A5A5A5A


def test_pipelined_commands_are_answered_in_order(conn: RawConn) -> None:
    ids = []
    blob = b""
    for i in range(50):
        mid = 0x5000 + i
        ids.append(mid)
        payload = region_access(BAR0, REG_MTA, 4) + u32(i)
        blob += struct.pack("<HHIII", mid, wire.Command.REGION_WRITE, 16 + len(payload), 0, 0)
        blob += payload
    conn.send_raw(blob)
    assert [conn.recv().msg_id for _ in ids] == ids
    assert conn.read32(BAR0, REG_MTA) == 49


def test_too_many_fds_is_einval_and_server_keeps_serving(conn: RawConn) -> None:
    fds = make_eventfds(17)  # the server takes at most max_msg_fds = 16
    before = open_fds()
    try:
        payload = wire.build(wire.IrqSet, argsz=20, flags=wire.VFIO_IRQ_SET_DATA_EVENTFD
                             | wire.VFIO_IRQ_SET_ACTION_TRIGGER, index=2, start=0, count=4)
        msg(conn, wire.Command.DEVICE_SET_IRQS, payload, expect=errno.EINVAL, fds=fds)
    finally:
        close_all(fds)
    assert conn.read_vendor_id() == VENDOR_ID
    assert open_fds() == before - 17


def test_second_client_may_look_but_not_touch(nic_server: Any, conn: RawConn,
                                              vf0: PciFunction) -> None:
    # While a client owns the function, another connection (the migration
    # orchestrator) gets a restricted session: reads yes, changes EPERM.
    msg(conn, wire.Command.DMA_MAP, wire.build(wire.DmaMap, argsz=32, flags=3, offset=0,
                                               address=0x10000, size=0x1000))
    second = RawConn(sock_path(nic_server, "vf0"), negotiate=True)
    try:
        assert second.read_vendor_id() == VENDOR_ID
        with vf0.lock:
            before = snapshot.save(vf0)
        touching = {
            wire.Command.REGION_WRITE: region_access(BAR0, REG_MTA, 4) + u32(1),
            wire.Command.REGION_WRITE_MULTI: wire.build(wire.WriteMultiHeader, wr_cnt=1)
            + wire.build(wire.WriteMultiEntry, offset=REG_MTA, region=BAR0, count=4,
                         data=u32(1) + bytes(4)),
            wire.Command.DEVICE_RESET: b"",
            wire.Command.DMA_MAP: wire.build(wire.DmaMap, argsz=32, flags=3, offset=0,
                                             address=0x20000, size=0x1000),
            wire.Command.DMA_UNMAP: wire.build(wire.DmaUnmap, argsz=24, flags=0,
                                               address=0x10000, size=0x1000),
            wire.Command.DEVICE_SET_IRQS: wire.build(
                wire.IrqSet, argsz=20, flags=wire.VFIO_IRQ_SET_DATA_NONE
                | wire.VFIO_IRQ_SET_ACTION_TRIGGER, index=2, start=0, count=0),
        }
        for command, payload in touching.items():
            msg(second, command, payload, expect=errno.EPERM)
        with vf0.lock:
            assert snapshot.save(vf0) == before
            assert [(r.address, r.size) for r in vf0.dma.regions] == [(0x10000, 0x1000)]
    finally:
        second.close()
    # The primary client is unaffected by the second one coming and going.
    assert conn.read_vendor_id() == VENDOR_ID
    assert nic_server.servers["vf0"].attached
    with vf0.lock:
        assert [(r.address, r.size) for r in vf0.dma.regions] == [(0x10000, 0x1000)]


def test_other_functions_serve_independently(nic_server: Any, conn: RawConn) -> None:
    results: dict[str, int] = {}

    def talk(name: str) -> None:
        c = RawConn(sock_path(nic_server, name), negotiate=True)
        try:
            results[name] = int.from_bytes(msg(c, wire.Command.REGION_READ,
                                               region_access(CONFIG, 2, 2))[16:], "little")
        finally:
            c.close()

    threads = [threading.Thread(target=talk, args=(n,)) for n in ("pf", "vf1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {"pf": 0x5FE0, "vf1": 0x5FE1}
    assert conn.read_vendor_id() == VENDOR_ID
