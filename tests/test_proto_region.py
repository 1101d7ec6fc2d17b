"""REGION_READ, REGION_WRITE (also posted) and REGION_WRITE_MULTI."""

from __future__ import annotations

import errno
from pathlib import Path

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
    CFG_DEVICE_ID,
    CFG_VENDOR_ID,
    CONFIG,
    MSIX_BAR,
    PF_DEVICE_ID,
    REG_EICR,
    REG_EICS,
    REG_EIMS,
    REG_EITR,
    REG_MTA,
    REG_RAH,
    REG_RAL,
    REG_RDH0,
    REG_STATUS,
    VENDOR_ID,
    VF_DEVICE_ID,
    RawConn,
    expect_errno,
    msg,
    multi_entry,
    region_access,
    u32,
    write_multi_payload,
)

READ = wire.Command.REGION_READ
WRITE = wire.Command.REGION_WRITE
MULTI = wire.Command.REGION_WRITE_MULTI
MAX_XFER = 1 << 20
ZERO_SIZE_REGIONS = [1, 2, 4, 5, 6, 8]
CFG_INTERRUPT_LINE = 0x3C


def state(fn: PciFunction) -> bytes:
    with fn.lock:
        return snapshot.save(fn)


# -- reads ------------------------------------------------------------------------------


def test_config_space_ids_of_a_vf(client: VfioUserClient) -> None:
    assert client.config_read(CFG_VENDOR_ID, 2) == VENDOR_ID
    assert client.config_read(CFG_DEVICE_ID, 2) == VF_DEVICE_ID
    assert client.config_read(CFG_VENDOR_ID, 4) == VENDOR_ID | VF_DEVICE_ID << 16


def test_config_space_ids_of_the_pf(pf_client: VfioUserClient) -> None:
    assert pf_client.config_read(CFG_DEVICE_ID, 2) == PF_DEVICE_ID


def test_region_read_reply_echoes_the_request(conn: RawConn) -> None:
    request = region_access(CONFIG, CFG_VENDOR_ID, 4)
    reply = msg(conn, READ, request)
    assert reply[:16] == request
    assert len(reply) == 16 + 4


def test_region_read_whole_regions(client: VfioUserClient) -> None:
    assert len(client.region_read(CONFIG, 0, 4096)) == 4096
    assert len(client.region_read(BAR0, 0, 0x4000)) == 0x4000
    assert len(client.region_read(MSIX_BAR, 0, 0x4000)) == 0x4000


def test_region_read_unaligned_and_odd_sizes(client: VfioUserClient) -> None:
    ral = client.read32(BAR0, REG_RAL)
    for offset in range(4):
        for count in (1, 2, 3, 5):
            data = client.region_read(BAR0, REG_RAL + offset, count)
            full = client.region_read(BAR0, REG_RAL, 16)
            assert data == full[offset : offset + count]
    assert client.region_read(BAR0, REG_RAL, 4) == u32(ral)


# -- writes and register semantics -----------------------------------------------------------


def test_bar0_rw_register_round_trip(client: VfioUserClient) -> None:
    client.write32(BAR0, REG_MTA, 0xDEADBEEF)
    assert client.read32(BAR0, REG_MTA) == 0xDEADBEEF
    client.region_write(BAR0, REG_MTA + 1, b"\x55")  # byte write merges
    assert client.read32(BAR0, REG_MTA) == 0xDEAD55EF


def test_bar0_rw_register_implemented_bits_only(client: VfioUserClient) -> None:
    client.write32(BAR0, REG_EITR, 0xFFFFFFFF)
    assert client.read32(BAR0, REG_EITR) == 0xFFF


def test_bar0_ro_register_unchanged(client: VfioUserClient) -> None:
    status = client.read32(BAR0, REG_STATUS)
    client.write32(BAR0, REG_STATUS, ~status & 0xFFFFFFFF)
    assert client.read32(BAR0, REG_STATUS) == status
    client.write32(BAR0, REG_RDH0, 0x1234)
    assert client.read32(BAR0, REG_RDH0) == 0


def test_bar0_w1c_register(client: VfioUserClient) -> None:
    client.write32(BAR0, REG_EIMS, 0)
    client.write32(BAR0, REG_EICS, 0b111)  # the device sets causes
    assert client.read32(BAR0, REG_EICR) == 0b111
    client.write32(BAR0, REG_EICR, 0)  # writing 0 changes nothing
    assert client.read32(BAR0, REG_EICR) == 0b111
    client.write32(BAR0, REG_EICR, 0b010)  # writing 1 clears that bit only
    assert client.read32(BAR0, REG_EICR) == 0b101


def test_bar0_write_to_a_hole_is_ignored(client: VfioUserClient) -> None:
    client.write32(BAR0, 0x3FF0, 0xFFFFFFFF)
    assert client.read32(BAR0, 0x3FF0) == 0


def test_config_ro_fields_unchanged(client: VfioUserClient) -> None:
    client.config_write(CFG_VENDOR_ID, 4, 0xFFFFFFFF)
    assert client.config_read(CFG_VENDOR_ID, 4) == VENDOR_ID | VF_DEVICE_ID << 16


def test_config_rw_field_round_trip(client: VfioUserClient) -> None:
    client.config_write(CFG_INTERRUPT_LINE, 1, 0xA5)
    assert client.config_read(CFG_INTERRUPT_LINE, 1) == 0xA5


def test_config_bar_sizing(client: VfioUserClient) -> None:
    client.config_write(0x10, 4, 0xFFFFFFFF)
    assert client.config_read(0x10, 4) == (~(0x4000 - 1)) & 0xFFFFFFF0


def test_config_status_w1c_bits_clear_and_do_not_set(client: VfioUserClient) -> None:
    status = client.config_read(0x06, 2)
    client.config_write(0x06, 2, 0xFFFF)
    assert client.config_read(0x06, 2) == status & ~0xF900


def test_msix_table_is_writable_and_pba_is_not(client: VfioUserClient) -> None:
    client.write32(MSIX_BAR, 0x10, 0xFEE00000)
    assert client.read32(MSIX_BAR, 0x10) == 0xFEE00000
    client.write32(MSIX_BAR, 0x2000, 0xFFFFFFFF)
    assert client.read32(MSIX_BAR, 0x2000) == 0


def test_region_write_reply_echoes_the_request_header(conn: RawConn) -> None:
    header = region_access(BAR0, REG_MTA, 4)
    assert msg(conn, WRITE, header + u32(7)) == header


# -- bounds and sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "region,offset,count",
    [(BAR0, 0x4000, 4), (BAR0, 0x3FFE, 4), (BAR0, 0x3FFF, 2), (BAR0, 0, 0x4001),
     (CONFIG, 0x1000, 1), (CONFIG, 0xFFC, 8), (MSIX_BAR, 0x4000, 4),
     (BAR0, (1 << 64) - 4, 8), (BAR0, (1 << 64) - 1, 1)],
)
def test_region_access_out_of_bounds_is_einval(conn: RawConn, vf0: PciFunction, region: int,
                                               offset: int, count: int) -> None:
    before = state(vf0)
    msg(conn, READ, region_access(region, offset, count), expect=errno.EINVAL)
    msg(conn, WRITE, region_access(region, offset, count) + b"\xff" * count,
        expect=errno.EINVAL)
    assert state(vf0) == before


@pytest.mark.parametrize("region", [BAR0, CONFIG])
def test_region_access_zero_count_is_einval(conn: RawConn, region: int) -> None:
    msg(conn, READ, region_access(region, 0, 0), expect=errno.EINVAL)
    msg(conn, WRITE, region_access(region, 0, 0), expect=errno.EINVAL)


def test_region_read_count_above_max_data_xfer_is_einval(conn: RawConn) -> None:
    msg(conn, READ, region_access(BAR0, 0, MAX_XFER + 1), expect=errno.EINVAL)
    msg(conn, READ, region_access(BAR0, 0, 0xFFFFFFFF), expect=errno.EINVAL)


def test_region_write_count_above_max_data_xfer_is_einval(conn: RawConn) -> None:
    msg(conn, WRITE, region_access(BAR0, 0, MAX_XFER + 1) + b"\0" * (MAX_XFER + 1),
        expect=errno.EINVAL)
    assert conn.read_vendor_id() == VENDOR_ID


@pytest.mark.parametrize("data_len", [0, 3, 5, 8])
def test_region_write_count_not_matching_data_is_einval(conn: RawConn, vf0: PciFunction,
                                                        data_len: int) -> None:
    before = state(vf0)
    msg(conn, WRITE, region_access(BAR0, REG_MTA, 4) + b"\xaa" * data_len, expect=errno.EINVAL)
    assert state(vf0) == before


@pytest.mark.parametrize("region", ZERO_SIZE_REGIONS + [9, 0xFFFFFFFF])
def test_region_access_to_absent_region_is_einval(conn: RawConn, region: int) -> None:
    msg(conn, READ, region_access(region, 0, 4), expect=errno.EINVAL)
    msg(conn, WRITE, region_access(region, 0, 4) + u32(0), expect=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 20])
def test_region_read_wrong_payload_size_is_einval(conn: RawConn, size: int) -> None:
    payload = region_access(CONFIG, 0, 4).ljust(20, b"\0")[:size]
    msg(conn, READ, payload, expect=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 8, 15])
def test_region_write_short_payload_is_einval(conn: RawConn, size: int) -> None:
    msg(conn, WRITE, region_access(BAR0, REG_MTA, 0)[:size], expect=errno.EINVAL)


# -- posted writes ------------------------------------------------------------------------------


def test_posted_write_takes_effect(client: VfioUserClient) -> None:
    client.write32(BAR0, REG_MTA, 0x01020304, posted=True)
    assert client.read32(BAR0, REG_MTA) == 0x01020304


def test_posted_write_gets_no_reply(conn: RawConn) -> None:
    conn.send(WRITE, region_access(BAR0, REG_MTA, 4) + u32(0xCAFE), flags=wire.FLAG_NO_REPLY)
    mid = conn.send(READ, region_access(BAR0, REG_MTA, 4))
    reply = conn.recv()
    assert reply.msg_id == mid  # the first reply answers the read
    assert reply.payload[16:] == u32(0xCAFE)
    conn.assert_no_reply()


def test_bad_posted_write_gets_no_error_reply(conn: RawConn, vf0: PciFunction) -> None:
    before = state(vf0)
    conn.send(WRITE, region_access(BAR0, 0x4000, 4) + u32(1), flags=wire.FLAG_NO_REPLY)
    conn.send(WRITE, region_access(BAR0, REG_MTA, 4) + b"\1", flags=wire.FLAG_NO_REPLY)
    assert conn.read_vendor_id() == VENDOR_ID
    conn.assert_no_reply()
    assert state(vf0) == before


def test_many_posted_writes_apply_in_order(client: VfioUserClient) -> None:
    for i in range(200):
        client.write32(BAR0, REG_MTA, i, posted=True)
    assert client.read32(BAR0, REG_MTA) == 199


# -- REGION_WRITE_MULTI -----------------------------------------------------------------------


def test_write_multi_applies_all_and_returns_wr_cnt(client: VfioUserClient) -> None:
    n = client.write_multi([
        (BAR0, REG_RAL, u32(0x44332211)),
        (BAR0, REG_RAH, u32(0x80006655)),
        (BAR0, REG_MTA, b"\x01\x02"),
        (CONFIG, CFG_INTERRUPT_LINE, b"\x0b"),
        (MSIX_BAR, 0x10, (0xFEE00000 | 0x1000 << 32).to_bytes(8, "little")),
    ])
    assert n == 5
    assert client.read32(BAR0, REG_RAL) == 0x44332211
    assert client.read32(BAR0, REG_RAH) == 0x80006655
    assert client.read32(BAR0, REG_MTA) & 0xFFFF == 0x0201
    assert client.config_read(CFG_INTERRUPT_LINE, 1) == 0x0B
    assert client.region_read(MSIX_BAR, 0x10, 8) == (0xFEE00000 | 0x1000 << 32).to_bytes(8,
                                                                                          "little")


def test_write_multi_applies_in_order(client: VfioUserClient) -> None:
    assert client.write_multi([(BAR0, REG_MTA, u32(i)) for i in range(10)]) == 10
    assert client.read32(BAR0, REG_MTA) == 9


def test_write_multi_at_the_limit(client: VfioUserClient) -> None:
    n = wire.WRITE_MULTI_MAX
    assert client.write_multi([(BAR0, REG_MTA, u32(i)) for i in range(n)]) == n
    assert client.read32(BAR0, REG_MTA) == n - 1


def test_write_multi_accepts_qemu_batch_of_200(client: VfioUserClient) -> None:
    # QEMU's vfio-user client coalesces up to VFIO_USER_MULTI_MAX = 200 writes
    # (hw/vfio-user/protocol.h) into one message.
    assert client.write_multi([(BAR0, REG_MTA, u32(i)) for i in range(200)]) == 200
    assert client.read32(BAR0, REG_MTA) == 199


def test_write_multi_posted(conn: RawConn) -> None:
    payload = write_multi_payload([multi_entry(BAR0, REG_MTA, u32(0x77))])
    conn.send(MULTI, payload, flags=wire.FLAG_NO_REPLY)
    assert conn.read32(BAR0, REG_MTA) == 0x77
    conn.assert_no_reply()


GOOD = multi_entry(BAR0, REG_RAL, u32(0x0BADF00D))


@pytest.mark.parametrize(
    "payload",
    [
        write_multi_payload([GOOD], wr_cnt=0),
        write_multi_payload([GOOD] * (wire.WRITE_MULTI_MAX + 1)),
        write_multi_payload([GOOD], wr_cnt=1 << 63),
        write_multi_payload([GOOD], wr_cnt=2),
        write_multi_payload([GOOD, GOOD], wr_cnt=1),
        write_multi_payload([GOOD]) + b"\0",
        write_multi_payload([GOOD])[:-1],
        write_multi_payload([]),
        b"\1\0\0\0",
        b"",
    ],
    ids=["wr_cnt-0", "wr_cnt-over-max", "wr_cnt-huge", "fewer-entries", "more-entries",
         "extra-byte", "missing-byte", "no-entries", "short-header", "empty"],
)
def test_write_multi_bad_wr_cnt_or_size_is_einval_and_writes_nothing(
        conn: RawConn, vf0: PciFunction, payload: bytes) -> None:
    before = state(vf0)
    msg(conn, MULTI, payload, expect=errno.EINVAL)
    assert state(vf0) == before


@pytest.mark.parametrize(
    "bad",
    [
        multi_entry(BAR0, REG_MTA, u32(1), count=0),
        multi_entry(BAR0, REG_MTA, u32(1), count=9),
        multi_entry(BAR0, REG_MTA, u32(1), count=0xFFFFFFFF),
        multi_entry(9, 0, u32(1)),
        multi_entry(0xFFFFFFFF, 0, u32(1)),
        multi_entry(BAR0, 0x4000, u32(1)),
        multi_entry(BAR0, 0x3FFE, u32(1)),
        multi_entry(CONFIG, 0x1000, b"\1"),
        multi_entry(1, 0, u32(1)),
    ],
    ids=["count-0", "count-9", "count-huge", "region-9", "region-huge", "bar0-past-end",
         "bar0-straddles-end", "config-past-end", "zero-size-region"],
)
def test_write_multi_bad_entry_is_einval_and_writes_nothing(conn: RawConn, vf0: PciFunction,
                                                            bad: bytes) -> None:
    before = state(vf0)
    # A good write first: it must not be applied either.
    msg(conn, MULTI, write_multi_payload([GOOD, bad]), expect=errno.EINVAL)
    assert state(vf0) == before
    msg(conn, MULTI, write_multi_payload([bad, GOOD]), expect=errno.EINVAL)
    assert state(vf0) == before


def test_write_multi_errors_leave_the_connection_serving(client: VfioUserClient) -> None:
    expect_errno(errno.EINVAL, client.write_multi, [(9, 0, u32(1))])
    assert client.config_read(CFG_VENDOR_ID, 2) == VENDOR_ID
    assert client.write_multi([(BAR0, REG_MTA, u32(3))]) == 1


def test_write_multi_reply_is_only_wr_cnt(conn: RawConn) -> None:
    reply = msg(conn, MULTI, write_multi_payload([GOOD, GOOD, GOOD]))
    assert reply == (3).to_bytes(8, "little")


def test_busy_polling_client_and_server_still_answer_every_request(short_dir: Path) -> None:
    """--busy-poll changes how each side waits, never what it answers: reads, non-posted
    and posted writes in order, errors still errno replies."""
    from vfnic.device.nic import NicServer

    server = NicServer(short_dir / "nic", num_vfs=1, busy_poll_us=300)
    server.start()
    try:
        assert server.servers["vf0"].busy_poll == pytest.approx(300e-6)
        with VfioUserClient(str(server.dir / "vf0.sock"), busy_poll=300e-6) as c:
            for i in range(200):
                c.write32(BAR0, REG_MTA, i, posted=i % 2 == 0)
                assert c.read32(BAR0, REG_MTA) == i
            expect_errno(errno.EINVAL, c.region_read, BAR0, 0x10_0000, 4)
            assert c.read32(BAR0, REG_STATUS) == server.nic.vfs[0].bank.get("STATUS")
    finally:
        server.stop()


def test_serve_rejects_a_bad_busy_poll(short_dir: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vfnic.cli", "serve", "--dir",
                          str(short_dir / "n"), "--busy-poll", "-5"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert out.stderr.strip() == \
        "vfnic: error: --busy-poll must be between 0 and 1000000 microseconds"
