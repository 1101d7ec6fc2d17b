"""Fixtures and helpers for the vfio-user protocol tests (tests/test_proto_*.py,
tests/test_wire_fuzz.py), in the style of libvfio-user's test/py: every test
talks to a real NicServer over its UNIX socket, either through our
VfioUserClient or through ``RawConn``, which sends arbitrary headers and
payloads and returns the reply header and payload as they came.

Test modules import the fixtures they use from here (this is not a conftest.py,
so pytest does not pick it up by itself).
"""

from __future__ import annotations

import errno
import gc
import json
import mmap
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hostdriver import stop_when_detached

from vfnic.device.function import PciFunction
from vfnic.device.nic import NicServer
from vfnic.errors import RemoteError
from vfnic.regs import ids
from vfnic.regs import table as T
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import CLIENT_CAPS, VfioUserClient
from vfnic.vfiouser.transport import Endpoint, Message

NUM_VFS = 2
REPLY_TIMEOUT = 5.0

# Offsets used across the tests
CFG_VENDOR_ID = 0x00
CFG_DEVICE_ID = 0x02
CFG_COMMAND = 0x04
CFG_MSIX_FLAGS = 0x52  # MSI-X capability at 0x50, message control word at +2
MSIX_ENABLE = 1 << 15
CFG_DEVCTL = 0x78  # PCIe capability at 0x70, Device Control at +8
DEVCTL_FLR = 1 << 15
BAR0 = wire.PciRegion.BAR0
MSIX_BAR = wire.PciRegion.BAR3
CONFIG = wire.PciRegion.CONFIG
REG_CTRL = T.CTRL.offset
REG_STATUS = T.STATUS.offset
REG_EICR = T.EICR.offset
REG_EIMS = T.EIMS.offset
REG_EICS = T.EICS.offset
REG_EITR = T.EITR(0).offset
REG_RAL = T.RAL.offset
REG_RAH = T.RAH.offset
REG_MTA = T.MTA.offset
REG_RDH0 = T.RDH(0).offset

VENDOR_ID, PF_DEVICE_ID, VF_DEVICE_ID = ids.VENDOR_ID, ids.PF_DEVICE_ID, ids.VF_DEVICE_ID


# -- payload builders ---------------------------------------------------------------


def version_payload(major: int = 0, minor: int = 0, caps: Any = None,
                    doc: Any = None) -> bytes:
    """VERSION payload: major, minor and NUL-terminated JSON ({"capabilities": caps})."""
    if doc is None:
        doc = {"capabilities": CLIENT_CAPS if caps is None else caps}
    return wire.build(wire.Version, major=major, minor=minor) + json.dumps(doc).encode() + b"\0"


def dma_map_payload(address: int, size: int, flags: int = 3, offset: int = 0,
                    argsz: int = wire.DMA_MAP_SIZE) -> bytes:
    return wire.build(wire.DmaMap, argsz=argsz, flags=flags, offset=offset, address=address,
                      size=size)


def dma_unmap_payload(address: int, size: int, flags: int = 0,
                      argsz: int = wire.DMA_UNMAP_SIZE) -> bytes:
    return wire.build(wire.DmaUnmap, argsz=argsz, flags=flags, address=address, size=size)


def region_access(region: int, offset: int, count: int) -> bytes:
    return wire.build(wire.RegionAccess, offset=offset, region=region, count=count)


def irq_set_payload(index: int, flags: int, start: int, count: int, data: bytes = b"",
                    argsz: int | None = None) -> bytes:
    size = wire.IRQ_SET_SIZE + len(data) if argsz is None else argsz
    return wire.build(wire.IrqSet, argsz=size, flags=flags, index=index, start=start,
                      count=count) + data


def multi_entry(region: int, offset: int, data: bytes, count: int | None = None) -> bytes:
    return wire.build(wire.WriteMultiEntry, offset=offset, region=region,
                      count=len(data) if count is None else count, data=data.ljust(8, b"\0"))


def write_multi_payload(entries: list[bytes], wr_cnt: int | None = None) -> bytes:
    cnt = len(entries) if wr_cnt is None else wr_cnt
    return wire.build(wire.WriteMultiHeader, wr_cnt=cnt) + b"".join(entries)


def u32(value: int) -> bytes:
    return (value & 0xFFFFFFFF).to_bytes(4, "little")


# -- raw connection -------------------------------------------------------------------


class RawConn:
    """A vfio-user connection without the client's checks: send any header and
    payload, read the reply as it came. Requests the server sends to us
    (DMA_READ/DMA_WRITE) are refused with ENOTSUP so they never block a test."""

    def __init__(self, path: str, negotiate: bool = False,
                 timeout: float = REPLY_TIMEOUT) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.settimeout(timeout)
        self.sock = sock
        self.ep = Endpoint(sock)
        self._next = 0x1000
        if negotiate:
            self.expect_ok(wire.Command.VERSION, version_payload())

    def close(self) -> None:
        self.ep.close()

    def next_id(self) -> int:
        self._next = (self._next + 1) & 0xFFFF
        return self._next

    def send(self, command: int, payload: bytes = b"", flags: int = wire.TYPE_COMMAND,
             msg_id: int | None = None, fds: list[int] | None = None) -> int:
        """Send one well-framed message; returns its message ID."""
        mid = self.next_id() if msg_id is None else msg_id
        self.ep.send(mid, command, payload, flags, 0, fds)
        return mid

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float | None = None) -> Message:
        """The next reply from the server (server-initiated requests are refused)."""
        old = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while True:
                msg = self.ep.recv_message()
                if msg.is_reply:
                    return msg
                msg.close_fds()
                if not msg.no_reply:
                    self.ep.reply_error(msg, errno.ENOTSUP)
        finally:
            self.sock.settimeout(old)

    def call(self, command: int, payload: bytes = b"", flags: int = wire.TYPE_COMMAND,
             fds: list[int] | None = None) -> Message:
        """Send and return the reply, checking it answers this message."""
        mid = self.send(command, payload, flags, fds=fds)
        reply = self.recv()
        reply.close_fds()
        assert reply.msg_id == mid, f"reply to {reply.msg_id}, expected {mid}"
        assert reply.command == command, f"reply for command {reply.command}, sent {command}"
        assert reply.flags & wire.FLAG_TYPE_MASK == wire.TYPE_REPLY
        return reply

    def expect_ok(self, command: int, payload: bytes = b"",
                  fds: list[int] | None = None) -> bytes:
        reply = self.call(command, payload, fds=fds)
        assert not reply.is_error, (
            f"{wire.command_name(command)} failed: {errno.errorcode.get(reply.error)}"
        )
        return reply.payload

    def expect_errno(self, command: int, payload: bytes, err: int,
                     fds: list[int] | None = None, flags: int = wire.TYPE_COMMAND) -> Message:
        reply = self.call(command, payload, flags, fds=fds)
        assert reply.is_error, f"{wire.command_name(command)} succeeded, expected {err}"
        assert reply.error == err, (
            f"{wire.command_name(command)}: errno {errno.errorcode.get(reply.error)}"
            f" ({reply.error}), expected {errno.errorcode.get(err)}"
        )
        assert reply.payload == b""
        return reply

    def assert_no_reply(self, timeout: float = 0.2) -> None:
        try:
            msg = self.recv(timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected reply {msg}")

    def read_vendor_id(self) -> int:
        """REGION_READ of the vendor ID: proves the connection still serves."""
        data = self.expect_ok(wire.Command.REGION_READ, region_access(CONFIG, CFG_VENDOR_ID, 2))
        return int.from_bytes(data[16:18], "little")

    def read32(self, region: int, offset: int) -> int:
        data = self.expect_ok(wire.Command.REGION_READ, region_access(region, offset, 4))
        return int.from_bytes(data[16:20], "little")

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.expect_ok(wire.Command.REGION_WRITE, region_access(region, offset, len(data)) + data)


def msg(conn: RawConn, command: int, payload: bytes = b"", expect: int = 0,
        fds: list[int] | None = None) -> bytes:
    """libvfio-user style: send ``command``; ``expect`` is the errno of the reply (0: ok)."""
    if expect:
        conn.expect_errno(command, payload, expect, fds)
        return b""
    return conn.expect_ok(command, payload, fds)


def expect_errno(err: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call a VfioUserClient method and check it fails with ``err``."""
    with pytest.raises(RemoteError) as info:
        fn(*args, **kwargs)
    got = info.value.errno
    assert got == err, f"errno {errno.errorcode.get(got)} ({got}), expected {errno.errorcode[err]}"


# -- process-level helpers ---------------------------------------------------------------


def open_fds() -> int:
    """How many file descriptors this process holds (the server runs in-process);
    objects of earlier tests awaiting the cycle collector are collected first (their
    finalizers would close fds in the middle of a count)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def make_memfd(size: int, name: str = "vfnic-test") -> int:
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    return fd


def memfd_view(fd: int, size: int) -> mmap.mmap:
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def make_eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]


def eventfd_count(fd: int) -> int:
    """Read (and reset) an eventfd counter; 0 when it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def wait_detached(server: NicServer, name: str = "vf0") -> None:
    """The server noticed the client went away (it accepts one client at a time)."""
    wait_until(lambda: not server.servers[name].attached, what=f"{name} to detach")


def sock_path(server: NicServer, name: str = "vf0") -> str:
    return str(server.dir / f"{name}.sock")


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def nic_server(tmp_path: Any) -> Iterator[NicServer]:
    """A NicServer with 2 VFs serving in a fresh folder (tmp_path, or a shorter
    one when a socket path there would not fit in sun_path's 108 bytes)."""
    folder = str(tmp_path)
    short = None
    if len(os.path.join(folder, "control.sock")) > 100:
        short = folder = tempfile.mkdtemp(prefix="vfp-", dir="/tmp")
    server = NicServer(folder, num_vfs=NUM_VFS)
    server.start()
    yield server
    stop_when_detached(server)
    if short is not None:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def vf0(nic_server: NicServer) -> PciFunction:
    return nic_server.nic.vfs[0]


@pytest.fixture
def pf(nic_server: NicServer) -> PciFunction:
    return nic_server.nic.pf


@pytest.fixture
def client(nic_server: NicServer) -> Iterator[VfioUserClient]:
    """Our client, connected to vf0 and negotiated."""
    c = VfioUserClient(sock_path(nic_server, "vf0"), timeout=REPLY_TIMEOUT)
    yield c
    c.close()


@pytest.fixture
def pf_client(nic_server: NicServer) -> Iterator[VfioUserClient]:
    c = VfioUserClient(sock_path(nic_server, "pf"), timeout=REPLY_TIMEOUT)
    yield c
    c.close()


@pytest.fixture
def raw(nic_server: NicServer) -> Iterator[RawConn]:
    """A raw connection to vf0, not negotiated."""
    conn = RawConn(sock_path(nic_server, "vf0"))
    yield conn
    conn.close()


@pytest.fixture
def conn(nic_server: NicServer) -> Iterator[RawConn]:
    """A raw connection to vf0 after a successful VERSION."""
    c = RawConn(sock_path(nic_server, "vf0"), negotiate=True)
    yield c
    c.close()
