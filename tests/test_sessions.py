"""One owner per function socket: the first client (QEMU) owns the VF; any other
connection meanwhile is read-only (issue 10, item 1). The attacker here is a raw
client (tests/conftest_proto.RawConn): our own client would not misbehave."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfnic.device import snapshot
from vfnic.device.nic import NicServer
from vfnic.savevm import stream
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient
from vfnic.vfiouser.features import Feature, MigState, State
from vfnic.vfiouser.server import MAX_READONLY_SESSIONS

pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    CFG_VENDOR_ID,
    VENDOR_ID,
    RawConn,
    dma_map_payload,
    irq_set_payload,
    make_eventfds,
    make_memfd,
    region_access,
    sock_path,
    u32,
    wait_until,
)

C = wire.Command
GET, SET = wire.VFIO_DEVICE_FEATURE_GET, wire.VFIO_DEVICE_FEATURE_SET


def feature(flags: int, data: bytes = b"") -> bytes:
    return wire.build(wire.DeviceFeature, argsz=8 + len(data), flags=flags) + data


def set_state(state: State) -> bytes:
    return feature(SET | Feature.MIG_DEVICE_STATE, MigState.pack(state, 0))


def mig_write(data: bytes) -> bytes:
    return wire.build(wire.MigData, argsz=8 + len(data), size=len(data)) + data


def crafted_stream(server: NicServer) -> bytes:
    """A valid-looking stream whose image changes the vendor ID and which carries a
    page for the owner's guest memory (what the issue's attacker wrote)."""
    image = bytearray(snapshot.save(server.nic.vfs[0]))
    image[snapshot.HEAD_SIZE + CFG_VENDOR_ID] = 0x66
    body = bytes(image[:-4])
    image = bytearray(body + struct.pack("<I", zlib.crc32(body)))
    return (stream.full_record(bytes(image)) + stream.extents_record([(0x10000, b"\xee" * 4096)])
            + stream.end_record(bytes(image)))


@pytest.fixture
def owner(nic_server: NicServer) -> Iterator[VfioUserClient]:
    c = VfioUserClient(sock_path(nic_server))
    c.add_memory(0x10000, 0x10000)  # the owner's "guest RAM" (fd-less)
    c.config_write(0x04, 2, 0x6)  # memory + bus master
    yield c
    c.close()


def test_a_second_session_cannot_stop_reset_map_or_write_the_vf(
        nic_server: NicServer, owner: VfioUserClient) -> None:
    fn = nic_server.nic.vfs[0]
    before = snapshot.save(fn)
    intruder = RawConn(sock_path(nic_server), negotiate=True)
    memfd = make_memfd(0x10000)
    efds = make_eventfds(1)
    try:
        intruder.expect_errno(C.DEVICE_FEATURE, set_state(State.STOP), errno.EPERM)
        intruder.expect_errno(C.DEVICE_FEATURE, set_state(State.RESUMING), errno.EPERM)
        intruder.expect_errno(C.MIG_DATA_WRITE, mig_write(crafted_stream(nic_server)[:4096]),
                              errno.EPERM)
        intruder.expect_errno(C.MIG_DATA_READ, wire.build(wire.MigData, argsz=8 + 64, size=64),
                              errno.EPERM)
        intruder.expect_errno(C.DEVICE_RESET, b"", errno.EPERM)
        intruder.expect_errno(C.DMA_MAP, dma_map_payload(0x100000, 0x10000), errno.EPERM,
                              fds=[memfd])
        intruder.expect_errno(C.DMA_MAP, dma_map_payload(0x100000, 0x10000), errno.EPERM)
        intruder.expect_errno(C.DMA_UNMAP, wire.build(wire.DmaUnmap, argsz=wire.DMA_UNMAP_SIZE,
                                                      flags=0, address=0x10000, size=0x10000),
                              errno.EPERM)
        intruder.expect_errno(C.REGION_WRITE, region_access(0, 0x30, 4) + u32(0xBAD),
                              errno.EPERM)
        intruder.expect_errno(C.REGION_WRITE, region_access(wire.PciRegion.CONFIG, 4, 2)
                              + b"\0\0", errno.EPERM)
        intruder.expect_errno(C.DEVICE_SET_IRQS, irq_set_payload(2, 4 | 32, 0, 1), errno.EPERM,
                              fds=efds)
        for feat in (Feature.DMA_LOGGING_START, Feature.DMA_LOGGING_STOP):
            intruder.expect_errno(C.DEVICE_FEATURE, feature(SET | feat, bytes(16)), errno.EPERM)
        intruder.expect_errno(C.DEVICE_FEATURE, feature(GET | Feature.DMA_LOGGING_REPORT,
                                                        bytes(24)), errno.EPERM)
    finally:
        intruder.close()
        os.close(memfd)
        os.close(efds[0])
    assert fn.migration.state == State.RUNNING and fn.running
    assert snapshot.save(fn) == before
    assert owner.read32(wire.PciRegion.CONFIG, CFG_VENDOR_ID) & 0xFFFF == VENDOR_ID
    assert [(r.address, r.size) for r in fn.dma.regions] == [(0x10000, 0x10000)]
    assert owner.memory[0].data[:16] == bytes(16)  # nothing written into the owner's RAM


def test_a_second_session_reads_registers_and_migration_info(
        nic_server: NicServer, owner: VfioUserClient) -> None:
    owner.write32(0, 0x30, 0x1234)  # SCRATCH
    viewer = RawConn(sock_path(nic_server), negotiate=True)
    try:
        assert viewer.expect_ok(C.REGION_READ, region_access(0, 0x30, 4))[-4:] == u32(0x1234)
        reply = viewer.expect_ok(C.DEVICE_FEATURE,
                                 feature(GET | Feature.MIG_DEVICE_STATE, MigState.pack(0, 0)))
        assert MigState.unpack_from(reply, 8)[0] == State.RUNNING
        reply = viewer.expect_ok(C.DEVICE_FEATURE, feature(GET | Feature.MIGRATION))
        assert struct.unpack_from("<Q", reply, 8)[0] & 1  # STOP_COPY
        viewer.expect_ok(C.DEVICE_GET_INFO, wire.build(wire.DeviceInfo, argsz=16, flags=0,
                                                       num_regions=0, num_irqs=0))
    finally:
        viewer.close()


def test_the_owner_is_the_first_client_and_the_next_owner_comes_after_it(
        nic_server: NicServer) -> None:
    first = VfioUserClient(sock_path(nic_server))
    second = VfioUserClient(sock_path(nic_server))
    try:
        with pytest.raises(Exception) as err:
            second.reset()
        assert getattr(err.value, "errno", None) == errno.EPERM
        first.reset()
    finally:
        first.close()
        second.close()
    wait_until(lambda: not nic_server.servers["vf0"].attached, what="vf0 to detach")
    third = VfioUserClient(sock_path(nic_server))
    try:
        third.reset()  # owner now
    finally:
        third.close()


def test_readonly_sessions_are_bounded(nic_server: NicServer, owner: VfioUserClient) -> None:
    conns = [RawConn(sock_path(nic_server), negotiate=True) for _ in range(MAX_READONLY_SESSIONS)]
    try:
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.settimeout(5)
        extra.connect(sock_path(nic_server))
        assert extra.recv(16) == b""  # closed by the server
        extra.close()
        assert conns[0].read_vendor_id() == VENDOR_ID  # the others still serve
        assert owner.read32(wire.PciRegion.CONFIG, 0) & 0xFFFF == VENDOR_ID
    finally:
        for c in conns:
            c.close()


# -- Hypothesis: random interleavings of the owner's and an intruder's messages -----------


@pytest.fixture(scope="module")
def shared_server() -> Iterator[NicServer]:
    folder = tempfile.mkdtemp(prefix="vfs-", dir="/tmp")
    server = NicServer(folder, num_vfs=1)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def intruder_messages() -> st.SearchStrategy[tuple[int, bytes]]:
    states = st.sampled_from(list(State))
    return st.one_of(
        states.map(lambda s: (C.DEVICE_FEATURE, set_state(s))),
        st.binary(max_size=256).map(lambda b: (C.MIG_DATA_WRITE, mig_write(b))),
        st.just((C.DEVICE_RESET, b"")),
        st.tuples(st.integers(0, 0x3FFC), st.binary(min_size=1, max_size=8)).map(
            lambda t: (C.REGION_WRITE, region_access(0, t[0] & ~3, len(t[1])) + t[1])),
        st.tuples(st.integers(0, 0xFF), st.binary(min_size=1, max_size=4)).map(
            lambda t: (C.REGION_WRITE, region_access(wire.PciRegion.CONFIG, t[0], len(t[1]))
                       + t[1])),
        st.just((C.DMA_MAP, dma_map_payload(0x200000, 0x1000))),
        st.sampled_from([Feature.DMA_LOGGING_START, Feature.DMA_LOGGING_STOP]).map(
            lambda f: (C.DEVICE_FEATURE, feature(SET | f, bytes(16)))),
        st.just((C.REGION_READ, region_access(0, 0x30, 4))),
    )


def owner_actions() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.integers(0, 0xFFFFFFFF).map(lambda v: ("scratch", v)),
        st.sampled_from([State.RUNNING, State.PRE_COPY, State.STOP]).map(lambda s: ("state", s)),
        st.just(("reset", None)),
    )


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(intruder_messages().map(lambda m: ("intruder", m)),
                                owner_actions().map(lambda a: ("owner", a))), max_size=25))
def test_interleaved_sessions_never_change_the_owners_state_through_the_second(
        shared_server: NicServer, steps: list[tuple[str, Any]]) -> None:
    fn = shared_server.nic.vfs[0]
    wait_until(lambda: not shared_server.servers["vf0"].attached, what="previous owner gone")
    owner = VfioUserClient(sock_path(shared_server))
    intruder = RawConn(sock_path(shared_server), negotiate=True)
    try:
        owner.reset()
        for who, what in steps:
            if who == "owner":
                kind, arg = what
                if kind == "scratch":
                    owner.write32(0, 0x30, arg)
                elif kind == "state":
                    owner.feature(SET | Feature.MIG_DEVICE_STATE, MigState.pack(State.RUNNING, 0))
                    if arg != State.RUNNING:
                        owner.feature(SET | Feature.MIG_DEVICE_STATE, MigState.pack(arg, 0))
                else:
                    owner.reset()
                continue
            command, payload = what
            with fn.lock:
                before = (snapshot.save(fn), fn.migration.state, fn.running,
                          len(fn.dma.regions), fn.dma.dirty_log is None, bytes(fn.migration.out))
            reply = intruder.call(command, payload)
            with fn.lock:
                after = (snapshot.save(fn), fn.migration.state, fn.running,
                         len(fn.dma.regions), fn.dma.dirty_log is None, bytes(fn.migration.out))
            assert after == before, f"{wire.command_name(command)} from the second session"
            if command != C.REGION_READ:
                assert reply.is_error and reply.error == errno.EPERM
    finally:
        intruder.close()
        owner.reset()
        owner.close()


def test_a_client_reconnecting_at_once_becomes_the_owner(nic_server: NicServer) -> None:
    """A restarted QEMU connects right after the old one hung up: it owns the VF
    (the server waits for the hung-up owner's session to end), it is not read-only."""
    for _ in range(5):
        first = VfioUserClient(sock_path(nic_server))
        first.reset()
        first.close()
        again = VfioUserClient(sock_path(nic_server))  # no wait for the server to notice
        try:
            again.reset()
            again.dma_map(0x10000, 0x1000)
        finally:
            again.close()
        wait_until(lambda: not nic_server.servers["vf0"].attached, what="vf0 to detach")
