"""Wire fuzzing with Hypothesis: random payloads and mutations of valid ones, for every
command number, sent with an intact frame (correct msg_size).

For each example: the server replies (unless NO_REPLY was set) to the right message
ID, never with EIO (its "internal error" answer); a command that fails leaves the
function exactly as it was (snapshot, DMA mappings, interrupt set-up); commands that
cannot change the function leave it unchanged even when they succeed; and the
connection still serves a REGION_READ of the vendor ID afterwards.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfnic.device import snapshot
from vfnic.device.function import PciFunction
from vfnic.vfiouser import wire

# Shared fixtures and helpers (tests/conftest_proto.py), rewritten for assert messages.
pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    BAR0,
    CONFIG,
    MSIX_BAR,
    REG_MTA,
    REG_RAL,
    VENDOR_ID,
    RawConn,
    close_all,
    dma_map_payload,
    dma_unmap_payload,
    irq_set_payload,
    make_eventfds,
    make_memfd,
    multi_entry,
    open_fds,
    region_access,
    sock_path,
    u32,
    version_payload,
    wait_detached,
    wait_until,
    write_multi_payload,
)

C = wire.Command
NONE_TRIGGER = wire.VFIO_IRQ_SET_DATA_NONE | wire.VFIO_IRQ_SET_ACTION_TRIGGER
EVENTFD_TRIGGER = wire.VFIO_IRQ_SET_DATA_EVENTFD | wire.VFIO_IRQ_SET_ACTION_TRIGGER
BOOL_MASK = wire.VFIO_IRQ_SET_DATA_BOOL | wire.VFIO_IRQ_SET_ACTION_MASK
BOOL_UNMASK = wire.VFIO_IRQ_SET_DATA_BOOL | wire.VFIO_IRQ_SET_ACTION_UNMASK

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Valid payloads to mutate, per command.
SEEDS: dict[int, list[bytes]] = {
    C.VERSION: [version_payload(), version_payload(caps={}),
                wire.build(wire.Version, major=0, minor=0)],
    C.DMA_MAP: [dma_map_payload(0x10000, 0x1000), dma_map_payload(1 << 32, 0x200000, flags=1)],
    C.DMA_UNMAP: [dma_unmap_payload(0x10000, 0x1000), dma_unmap_payload(0, 0, flags=2)],
    C.DEVICE_GET_INFO: [wire.build(wire.DeviceInfo, argsz=16, flags=0, num_regions=0,
                                   num_irqs=0)],
    C.DEVICE_GET_REGION_INFO: [
        wire.build(wire.RegionInfo, argsz=32, flags=0, index=i, cap_offset=0, size=0, offset=0)
        for i in (0, 7)
    ],
    C.DEVICE_GET_REGION_IO_FDS: [wire.build(wire.RegionIoFds, argsz=16, flags=0, index=0,
                                            count=0)],
    C.DEVICE_GET_IRQ_INFO: [wire.build(wire.IrqInfo, argsz=16, flags=0, index=2, count=0)],
    C.DEVICE_SET_IRQS: [
        irq_set_payload(2, NONE_TRIGGER, 0, 1),
        irq_set_payload(2, NONE_TRIGGER, 0, 0),
        irq_set_payload(2, BOOL_MASK, 0, 4, bytes([1, 0, 1, 0])),
        irq_set_payload(2, EVENTFD_TRIGGER, 1, 2),
    ],
    C.REGION_READ: [region_access(CONFIG, 0, 4), region_access(BAR0, REG_RAL, 8),
                    region_access(MSIX_BAR, 0, 16)],
    C.REGION_WRITE: [region_access(BAR0, REG_MTA, 4) + u32(0xA5A5A5A5),
                     region_access(CONFIG, 0x3C, 1) + b"\x0b",
                     region_access(MSIX_BAR, 0x10, 8) + b"\x01" * 8],
    C.DMA_READ: [wire.build(wire.DmaAccess, address=0x10000, count=4)],
    C.DMA_WRITE: [wire.build(wire.DmaAccess, address=0x10000, count=4) + b"abcd"],
    C.DEVICE_RESET: [b""],
    C.REGION_WRITE_MULTI: [write_multi_payload([
        multi_entry(BAR0, REG_RAL, u32(0x11223344)),
        multi_entry(BAR0, REG_MTA, u32(0x55667788)),
        multi_entry(CONFIG, 0x3C, b"\x07"),
    ])],
    C.DEVICE_FEATURE: [
        wire.build(wire.DeviceFeature, argsz=8, flags=wire.VFIO_DEVICE_FEATURE_PROBE
                   | wire.VFIO_DEVICE_FEATURE_GET | 1),
        wire.build(wire.DeviceFeature, argsz=16, flags=wire.VFIO_DEVICE_FEATURE_GET | 2),
    ],
    C.MIG_DATA_READ: [wire.build(wire.MigData, argsz=8 + 64, size=64)],
    C.MIG_DATA_WRITE: [wire.build(wire.MigData, argsz=12, size=4) + b"\0\1\2\3"],
}
UNKNOWN_COMMANDS = [0, 14, 19, 0x100, 0xFFFF]
FUZZ_COMMANDS = [int(c) for c in C] + UNKNOWN_COMMANDS

# Commands that may legitimately change the function's saved state when they succeed.
MAY_CHANGE_STATE = {C.REGION_WRITE, C.REGION_WRITE_MULTI, C.DEVICE_RESET, C.REGION_READ,
                    C.DEVICE_FEATURE, C.MIG_DATA_WRITE}
MAY_CHANGE_DMA = {C.DMA_MAP, C.DMA_UNMAP}
MAY_CHANGE_IRQS = {C.DEVICE_SET_IRQS}

INTERESTING_32 = [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 20, 24, 31, 32, 63, 64, 65, 0xFF, 0x100,
                  0xFFF, 0x1000, 0x3FFC, 0x4000, 0xFFFF, 0x10000, 0x100000, 0x100001,
                  0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
INTERESTING_64 = INTERESTING_32 + [1 << 32, (1 << 63), (1 << 64) - 0x1000, (1 << 64) - 1]

u32_values = st.one_of(st.sampled_from(INTERESTING_32), st.integers(0, (1 << 32) - 1))
u64_values = st.one_of(st.sampled_from(INTERESTING_64), st.integers(0, (1 << 64) - 1))

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=24)),
    st.tuples(st.just("u32"), st.integers(0, 64), u32_values),
    st.tuples(st.just("u64"), st.integers(0, 32), u64_values),
    st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.integers(0, 255)),
)


def mutate(seed: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    data = bytearray(seed)
    for op in ops:
        kind = op[0]
        if kind == "flip" and data:
            bit = op[1] % (8 * len(data))
            data[bit // 8] ^= 1 << (bit % 8)
        elif kind == "byte" and data:
            data[op[1] % len(data)] = op[2]
        elif kind == "truncate":
            del data[op[1] % (len(data) + 1):]
        elif kind == "extend":
            data += op[1]
        elif kind in ("u32", "u64"):
            width = 4 if kind == "u32" else 8
            slots = len(data) // width
            if slots:
                pos = (op[1] % slots) * width
                data[pos : pos + width] = op[2].to_bytes(width, "little")
    return bytes(data)


def payloads(command: int) -> st.SearchStrategy[bytes]:
    seeds = SEEDS.get(command, [b"", bytes(16)])
    return st.one_of(
        st.sampled_from(seeds),
        st.binary(max_size=96),
        st.builds(mutate, st.sampled_from(seeds), st.lists(mutation, min_size=1, max_size=4)),
    )


# -- checking one message ---------------------------------------------------------------


def function_state(fn: PciFunction) -> tuple[bytes, list[Any], Any]:
    with fn.lock:
        return (
            snapshot.save(fn),
            [(r.address, r.size, r.flags, r.offset) for r in fn.dma.regions],
            (sorted(fn.irq_fds), sorted(fn.irq_masked)),
        )


def send_and_check(conn: RawConn, fn: PciFunction, command: int, payload: bytes,
                   flags: int = wire.TYPE_COMMAND, fds: list[int] | None = None) -> bool | None:
    """Send one message and check the invariants; returns whether it failed
    (None when no reply was asked for)."""
    before = function_state(fn)
    mid = conn.send(command, payload, flags, fds=fds)
    failed: bool | None = None
    expect_reply = flags & wire.FLAG_TYPE_MASK != wire.TYPE_REPLY and not flags & wire.FLAG_NO_REPLY
    if expect_reply:
        reply = conn.recv()
        reply.close_fds()
        assert reply.msg_id == mid, f"reply to message {reply.msg_id}, sent {mid}"
        assert reply.command == command
        assert reply.flags & wire.FLAG_TYPE_MASK == wire.TYPE_REPLY
        failed = reply.is_error
        if failed:
            assert reply.error in errno.errorcode, f"error reply with errno {reply.error}"
            assert reply.error != errno.EIO, (
                f"{wire.command_name(command)}: internal server error (EIO) for {payload.hex()}"
            )
            assert reply.payload == b""
    # The connection still serves; commands are handled in order, so once this
    # read is answered the fuzzed message has been fully processed.
    assert conn.read_vendor_id() == VENDOR_ID
    after = function_state(fn)
    name = wire.command_name(command)

    def must_keep(may_change: set[int]) -> bool:
        # Unchanged unless the command may change it and did not fail (or posted).
        return command not in may_change or failed is True

    if must_keep(MAY_CHANGE_STATE):
        assert after[0] == before[0], f"{name} (failed={failed}) changed the function state"
    if must_keep(MAY_CHANGE_DMA):
        assert after[1] == before[1], f"{name} (failed={failed}) changed the DMA mappings"
    if must_keep(MAY_CHANGE_IRQS):
        assert after[2] == before[2], f"{name} (failed={failed}) changed the IRQ set-up"
    return failed


class Fuzzer:
    """One negotiated connection to vf0 and the function's state right after it,
    restored before every example so that each example is reproducible on its own
    (Hypothesis replays and shrinks examples in any order)."""

    def __init__(self, nic_server: Any) -> None:
        self.fn: PciFunction = nic_server.nic.vfs[0]
        self.conn = RawConn(sock_path(nic_server, "vf0"), negotiate=True)
        with self.fn.lock:
            self.image = snapshot.save(self.fn)

    def fresh(self) -> None:
        conn = self.conn
        conn.expect_ok(C.VERSION, version_payload())
        conn.expect_ok(C.DEVICE_RESET)  # also back to RUNNING if a migration state was set
        conn.call(C.DEVICE_FEATURE, wire.build(  # DMA_LOGGING_STOP, wherever it stands
            wire.DeviceFeature, argsz=8, flags=wire.VFIO_DEVICE_FEATURE_SET | 7))
        conn.expect_ok(C.DMA_UNMAP, dma_unmap_payload(0, 0, flags=2))
        for index in range(wire.NUM_PCI_IRQS):
            conn.expect_ok(C.DEVICE_SET_IRQS, irq_set_payload(index, NONE_TRIGGER, 0, 0))
        conn.expect_ok(C.DEVICE_SET_IRQS, irq_set_payload(2, BOOL_UNMASK, 0, 4, b"\1" * 4))
        conn.expect_ok(C.DEVICE_SET_IRQS, irq_set_payload(1, BOOL_UNMASK, 0, 1, b"\1"))
        with self.fn.lock:
            snapshot.restore(self.fn, self.image)
        assert function_state(self.fn) == (self.image, [], ([], []))

    def close(self) -> None:
        self.conn.close()


def with_conn(nic_server: Any, body: Callable[[Fuzzer], None]) -> None:
    fuzzer = Fuzzer(nic_server)
    try:
        body(fuzzer)
    finally:
        fuzzer.close()


# -- the fuzz tests -------------------------------------------------------------------------


@pytest.mark.parametrize("command", FUZZ_COMMANDS, ids=[wire.command_name(c).replace(
    "VFIO_USER_", "").replace(" ", "-") for c in FUZZ_COMMANDS])
def test_fuzzed_payloads_keep_the_server_consistent(nic_server: Any, command: int) -> None:
    def body(fz: Fuzzer) -> None:
        @FUZZ
        @given(payload=payloads(command), no_reply=st.integers(0, 7).map(lambda n: n == 0))
        def one(payload: bytes, no_reply: bool) -> None:
            fz.fresh()
            flags = wire.FLAG_NO_REPLY if no_reply else wire.TYPE_COMMAND
            send_and_check(fz.conn, fz.fn, command, payload, flags)

        one()

    with_conn(nic_server, body)


def test_fuzzed_header_flags_are_refused_or_ignored(nic_server: Any) -> None:
    def body(fz: Fuzzer) -> None:
        @settings(FUZZ, max_examples=200)
        @given(flags=st.one_of(st.integers(0, 0xFF), st.integers(0, (1 << 32) - 1)),
               command=st.sampled_from([C.REGION_WRITE, C.REGION_READ, C.DEVICE_RESET, 99]))
        def one(flags: int, command: int) -> None:
            fz.fresh()
            payload = SEEDS.get(command, [b""])[0]
            failed = send_and_check(fz.conn, fz.fn, command, payload, flags)
            bad = flags & wire.FLAG_TYPE_MASK != wire.TYPE_COMMAND or flags & ~0x3F
            if failed is not None and bad:
                assert failed, f"flags {flags:#x} accepted"

        one()

    with_conn(nic_server, body)


def test_fuzzed_fd_passing_never_leaks_fds(nic_server: Any) -> None:
    """DMA_MAP and SET_IRQS (the commands that take fds) and a few that do not,
    with 0..3 fds attached: every fd the server does not keep is closed, and after
    unmapping everything and disabling every interrupt it holds none."""
    fd_commands = [C.DMA_MAP, C.DEVICE_SET_IRQS, C.DMA_UNMAP, C.REGION_READ, C.DEVICE_RESET]

    def body(fz: Fuzzer) -> None:
        fz.fresh()
        baseline = open_fds()

        @settings(FUZZ, max_examples=200)
        @given(command=st.sampled_from(fd_commands), data=st.data(),
               kinds=st.lists(st.sampled_from(["memfd", "eventfd"]), max_size=3))
        def one(command: int, data: st.DataObject, kinds: list[str]) -> None:
            fz.fresh()
            payload = data.draw(payloads(command))
            fds = [make_memfd(0x10000) if k == "memfd" else make_eventfds(1)[0] for k in kinds]
            try:
                send_and_check(fz.conn, fz.fn, command, payload, fds=fds)
            finally:
                close_all(fds)
            fz.fresh()  # drops whatever the server kept: then it holds no fd of ours
            assert open_fds() == baseline, f"{wire.command_name(command)} leaked fds"

        one()

    with_conn(nic_server, body)


def test_fuzzed_message_sequences_on_one_connection(nic_server: Any) -> None:
    """Several fuzzed messages back to back, each checked, without a reset between."""
    def body(fz: Fuzzer) -> None:
        @settings(FUZZ, max_examples=100)
        @given(st.lists(st.tuples(st.sampled_from(FUZZ_COMMANDS), st.data()), min_size=2,
                        max_size=6))
        def one(steps: list[tuple[int, st.DataObject]]) -> None:
            fz.fresh()
            for command, data in steps:
                payload = data.draw(payloads(command))
                send_and_check(fz.conn, fz.fn, command, payload)

        one()

    with_conn(nic_server, body)


def test_fuzzed_raw_headers_never_desynchronise_framing(nic_server: Any) -> None:
    """Random msg_id/command/flags/error words with a correct msg_size, written as
    raw bytes together with a valid read right behind: the read is always answered."""
    def body(fz: Fuzzer) -> None:
        conn, fn = fz.conn, fz.fn

        @settings(FUZZ, max_examples=200)
        @given(msg_id=st.integers(0, 0xFFFF), command=st.integers(0, 0xFFFF),
               flags=st.sampled_from([0, wire.FLAG_NO_REPLY, wire.TYPE_REPLY, 0x20, 0x40]),
               error=st.integers(0, (1 << 32) - 1), payload=st.binary(max_size=64))
        def one(msg_id: int, command: int, flags: int, error: int, payload: bytes) -> None:
            fz.fresh()
            before = function_state(fn)[0]
            header = struct.pack("<HHIII", msg_id, command, 16 + len(payload), flags, error)
            probe = region_access(CONFIG, 0, 2)
            probe_id = (msg_id + 1) & 0xFFFF
            conn.send_raw(header + payload + struct.pack(
                "<HHIII", probe_id, C.REGION_READ, 16 + len(probe), 0, 0) + probe)
            replies = [conn.recv()]
            if replies[0].msg_id != probe_id or replies[0].command != C.REGION_READ:
                replies.append(conn.recv())
            for r in replies:
                r.close_fds()
            first, last = replies[0], replies[-1]
            assert last.msg_id == probe_id and not last.is_error
            assert last.payload[16:] == VENDOR_ID.to_bytes(2, "little")
            if len(replies) == 2:
                assert first.msg_id == msg_id and first.command == command
                if first.is_error:
                    assert first.error != errno.EIO
            if command not in MAY_CHANGE_STATE or (len(replies) == 2 and first.is_error):
                assert function_state(fn)[0] == before

        one()

    with_conn(nic_server, body)


def test_fuzzed_connection_leaves_nothing_behind(nic_server: Any) -> None:
    """Closing a connection drops every fd the server held for it."""
    before = open_fds()
    efds = make_eventfds(4)
    fd = make_memfd(0x10000)

    def body(fz: Fuzzer) -> None:
        fz.conn.expect_ok(C.DEVICE_SET_IRQS, irq_set_payload(2, EVENTFD_TRIGGER, 0, 4),
                          fds=efds)
        fz.conn.expect_ok(C.DMA_MAP, dma_map_payload(0x10000, 0x10000), fds=[fd])

    try:
        with_conn(nic_server, body)
    finally:
        close_all([*efds, fd])
    wait_detached(nic_server)
    wait_until(lambda: open_fds() == before, what="fds released")
    assert os.path.exists(sock_path(nic_server))
