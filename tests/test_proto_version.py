"""VFIO_USER_VERSION: negotiation, capabilities, and every way to get it wrong."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest

from vfnic.vfiouser import wire
from vfnic.vfiouser.client import CLIENT_CAPS, VfioUserClient

# Shared fixtures and helpers (tests/conftest_proto.py), rewritten for assert messages.
pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    CFG_VENDOR_ID,
    CONFIG,
    VENDOR_ID,
    RawConn,
    dma_map_payload,
    dma_unmap_payload,
    irq_set_payload,
    msg,
    multi_entry,
    region_access,
    sock_path,
    u32,
    version_payload,
    wait_detached,
    write_multi_payload,
)

VERSION = wire.Command.VERSION

# What QEMU 11.1's vfio-user client offers (observed, see /work/shared/NOTES.md).
QEMU_11_1_OFFER = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}'
)


def parse_reply(payload: bytes) -> tuple[int, int, dict[str, Any]]:
    ver = wire.Version.parse(payload[:4])
    body = payload[4:]
    assert body.endswith(b"\0"), "server version data must be NUL-terminated"
    assert b"\0" not in body[:-1]
    doc = json.loads(body[:-1])
    assert isinstance(doc, dict) and isinstance(doc.get("capabilities"), dict)
    return ver.major, ver.minor, doc["capabilities"]


# -- success --------------------------------------------------------------------------


def test_version_negotiates_0_0_with_json_capabilities(raw: RawConn) -> None:
    major, minor, caps = parse_reply(msg(raw, VERSION, version_payload()))
    assert (major, minor) == (0, 0)
    assert caps["max_data_xfer_size"] == 1 << 20
    assert caps["max_msg_fds"] >= 1
    assert caps["pgsizes"] & 4096
    assert caps["max_dma_maps"] >= 1
    assert raw.read_vendor_id() == VENDOR_ID


def test_version_accepts_qemu_11_1_offer_verbatim(raw: RawConn) -> None:
    payload = wire.build(wire.Version, major=0, minor=0) + QEMU_11_1_OFFER + b"\0"
    major, minor, caps = parse_reply(msg(raw, VERSION, payload))
    # QEMU 11.1 refuses any reply other than 0.0.
    assert (major, minor) == (0, 0)
    assert caps["write_multiple"] is True
    assert caps["max_data_xfer_size"] == 1048576
    assert caps["pgsizes"] & 4096
    assert caps["migration"]["pgsize"] == 4096
    assert raw.read_vendor_id() == VENDOR_ID


def test_version_write_multiple_only_when_offered(nic_server: Any) -> None:
    offers: list[tuple[dict[str, Any], bool]] = [
        ({"max_data_xfer_size": 4096}, False),
        ({"write_multiple": False}, False),
        ({"write_multiple": 1}, False),  # not a JSON true
        ({"write_multiple": True}, True),
    ]
    for caps, expected in offers:
        conn = RawConn(sock_path(nic_server))
        try:
            _, _, reply_caps = parse_reply(msg(conn, VERSION, version_payload(caps=caps)))
        finally:
            conn.close()
        assert ("write_multiple" in reply_caps) == expected, caps
        if expected:
            assert reply_caps["write_multiple"] is True
        wait_detached(nic_server)


def test_version_migration_capability_only_when_offered(raw: RawConn) -> None:
    _, _, caps = parse_reply(msg(raw, VERSION, version_payload(caps={})))
    assert "migration" not in caps


def test_version_without_json_uses_defaults(raw: RawConn) -> None:
    major, minor, caps = parse_reply(msg(raw, VERSION, wire.build(wire.Version, major=0,
                                                                   minor=0)))
    assert (major, minor) == (0, 0)
    assert caps["max_data_xfer_size"] == 1 << 20
    assert raw.read_vendor_id() == VENDOR_ID


def test_version_without_capabilities_key_is_accepted(raw: RawConn) -> None:
    major, minor, _ = parse_reply(msg(raw, VERSION, version_payload(doc={"other": 1})))
    assert (major, minor) == (0, 0)


def test_version_ignores_unknown_capabilities(raw: RawConn) -> None:
    caps = dict(CLIENT_CAPS, some_future_cap={"x": [1, 2]})
    parse_reply(msg(raw, VERSION, version_payload(caps=caps)))
    assert raw.read_vendor_id() == VENDOR_ID


def test_version_higher_client_minor_is_answered_with_0_0(raw: RawConn) -> None:
    major, minor, _ = parse_reply(msg(raw, VERSION, version_payload(minor=7)))
    assert (major, minor) == (0, 0)


def test_version_small_client_max_data_xfer_is_accepted(raw: RawConn) -> None:
    _, _, caps = parse_reply(msg(raw, VERSION, version_payload(caps={"max_data_xfer_size": 1})))
    assert caps["max_data_xfer_size"] == 1 << 20  # the server's own limit


def test_version_through_our_client(nic_server: Any) -> None:
    with VfioUserClient(sock_path(nic_server)) as c:
        assert c.server_caps["write_multiple"] is True
        assert c.config_read(CFG_VENDOR_ID, 2) == VENDOR_ID


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("major", [1, 2, 0xFFFF])
def test_version_major_not_0_is_enotsup(raw: RawConn, major: int) -> None:
    msg(raw, VERSION, version_payload(major=major), expect=errno.ENOTSUP)
    # Not negotiated: other commands are still refused, a good VERSION still works.
    msg(raw, wire.Command.REGION_READ, region_access(CONFIG, 0, 2), expect=errno.EINVAL)
    msg(raw, VERSION, version_payload())
    assert raw.read_vendor_id() == VENDOR_ID


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_version_short_payload_is_einval(raw: RawConn, size: int) -> None:
    msg(raw, VERSION, b"\0" * size, expect=errno.EINVAL)


def test_version_json_not_nul_terminated_is_einval(raw: RawConn) -> None:
    payload = wire.build(wire.Version, major=0, minor=0) + json.dumps(
        {"capabilities": CLIENT_CAPS}
    ).encode()
    msg(raw, VERSION, payload, expect=errno.EINVAL)


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b'{"capabilities": {"max_data_xfer_size": 4096,}}',
        b"\xff\xfe\xfd",  # not UTF-8
        b'{"capabilities": {}}\0',  # a NUL inside the JSON text
        b"",  # only the NUL
    ],
    ids=["truncated", "text", "trailing-comma", "not-utf8", "embedded-nul", "empty"],
)
def test_version_invalid_json_is_einval(raw: RawConn, body: bytes) -> None:
    payload = wire.build(wire.Version, major=0, minor=0) + body + b"\0"
    msg(raw, VERSION, payload, expect=errno.EINVAL)


@pytest.mark.parametrize("doc", [[1, 2], "caps", 42, None, True])
def test_version_json_not_an_object_is_einval(raw: RawConn, doc: Any) -> None:
    payload = wire.build(wire.Version, major=0, minor=0) + json.dumps(doc).encode() + b"\0"
    msg(raw, VERSION, payload, expect=errno.EINVAL)


@pytest.mark.parametrize("caps", [[], "x", 1, None])
def test_version_capabilities_not_an_object_is_einval(raw: RawConn, caps: Any) -> None:
    msg(raw, VERSION, version_payload(doc={"capabilities": caps}), expect=errno.EINVAL)


@pytest.mark.parametrize("value", ["1048576", 1.5, 4096.0, True, False, None, [4096], {}, 0, -1])
def test_version_bad_max_data_xfer_size_is_einval(raw: RawConn, value: Any) -> None:
    msg(raw, VERSION, version_payload(caps={"max_data_xfer_size": value}), expect=errno.EINVAL)
    msg(raw, VERSION, version_payload())  # the connection is still usable


@pytest.mark.parametrize("key", ["max_msg_fds", "pgsizes", "max_dma_maps"])
@pytest.mark.parametrize("value", ["16", 1.0, True, None, [1]])
def test_version_bad_integer_capability_is_einval(raw: RawConn, key: str, value: Any) -> None:
    msg(raw, VERSION, version_payload(caps={key: value}), expect=errno.EINVAL)


def test_version_without_a_common_page_size_is_enotsup(raw: RawConn) -> None:
    msg(raw, VERSION, version_payload(caps={"pgsizes": 8192 | 65536}), expect=errno.ENOTSUP)


def test_version_deeply_nested_json_is_einval(raw: RawConn) -> None:
    # Valid JSON the parser cannot handle (recursion limit): still a bad VERSION
    # payload (EINVAL), not an internal server error (EIO).
    depth = 100_000
    body = b'{"a":' * depth + b"1" + b"}" * depth
    payload = wire.build(wire.Version, major=0, minor=0) + body + b"\0"
    msg(raw, VERSION, payload, expect=errno.EINVAL)
    msg(raw, VERSION, version_payload())


# -- commands before VERSION ----------------------------------------------------------

VALID_BEFORE_VERSION: dict[int, bytes] = {
    wire.Command.DMA_MAP: dma_map_payload(0x10000, 0x1000),
    wire.Command.DMA_UNMAP: dma_unmap_payload(0x10000, 0x1000),
    wire.Command.DEVICE_GET_INFO: wire.build(wire.DeviceInfo, argsz=16, flags=0, num_regions=0,
                                             num_irqs=0),
    wire.Command.DEVICE_GET_REGION_INFO: wire.build(wire.RegionInfo, argsz=32, flags=0, index=0,
                                                    cap_offset=0, size=0, offset=0),
    wire.Command.DEVICE_GET_REGION_IO_FDS: wire.build(wire.RegionIoFds, argsz=16, flags=0,
                                                      index=0, count=0),
    wire.Command.DEVICE_GET_IRQ_INFO: wire.build(wire.IrqInfo, argsz=16, flags=0, index=2,
                                                 count=0),
    wire.Command.DEVICE_SET_IRQS: irq_set_payload(
        2, wire.VFIO_IRQ_SET_DATA_NONE | wire.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0),
    wire.Command.REGION_READ: region_access(CONFIG, 0, 2),
    wire.Command.REGION_WRITE: region_access(CONFIG, 0x3C, 1) + b"\x05",
    wire.Command.DEVICE_RESET: b"",
    wire.Command.REGION_WRITE_MULTI: write_multi_payload([multi_entry(CONFIG, 0x3C, b"\x05")]),
    wire.Command.DEVICE_FEATURE: wire.build(wire.DeviceFeature, argsz=8,
                                            flags=wire.VFIO_DEVICE_FEATURE_PROBE | 1),
    wire.Command.MIG_DATA_READ: wire.build(wire.MigData, argsz=8 + 64, size=64),
    wire.Command.MIG_DATA_WRITE: wire.build(wire.MigData, argsz=8 + 4, size=4) + u32(0),
}


@pytest.mark.parametrize(
    "command", list(VALID_BEFORE_VERSION), ids=[wire.command_name(c) for c in VALID_BEFORE_VERSION]
)
def test_command_before_version_is_einval(nic_server: Any, raw: RawConn, command: int) -> None:
    before = nic_server.nic.vfs[0].config.read(0, 0x40)
    msg(raw, command, VALID_BEFORE_VERSION[command], expect=errno.EINVAL)
    assert nic_server.nic.vfs[0].config.read(0, 0x40) == before
    assert not nic_server.nic.vfs[0].dma.regions
    msg(raw, VERSION, version_payload())
    assert raw.read_vendor_id() == VENDOR_ID
