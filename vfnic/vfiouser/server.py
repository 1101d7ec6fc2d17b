"""vfio-user server: one UNIX socket per device function, command dispatch.

Every command is validated here (sizes, argsz, indexes, flags, limits) and any
failure becomes an errno reply; the connection keeps serving. The device
behind the socket implements ``Device``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import threading
import time
from typing import Protocol

from vfnic.dma.controller import DmaController
from vfnic.errors import (
    AccessDenied,
    ConnectionClosed,
    DmaError,
    DmaTimeout,
    ProtocolError,
    RemoteError,
    VfnicError,
)
from vfnic.vfiouser import wire
from vfnic.vfiouser.features import MAX_BITMAP, Feature
from vfnic.vfiouser.transport import DEFAULT_MAX_DATA_XFER, Endpoint, Message

log = logging.getLogger(__name__)

SERVER_MAX_MSG_FDS = 16
SERVER_MAX_DMA_MAPS = 65535
SERVER_PGSIZES = 4096
# Bound on a client's answer to one DMA_READ/DMA_WRITE; past it the client is cut
# off (its connection closed). The NIC lock is not held meanwhile, so other
# functions are never stalled by it; this function's work waits at most this long.
DMA_REPLY_TIMEOUT = 2.0
MAX_READONLY_SESSIONS = 4  # concurrent non-owner sessions per function
OWNER_HANDOVER = 2.0  # seconds a new client waits for a hung-up owner's session to end
ACCEPT_BACKOFF = 0.1  # seconds to wait after EMFILE/ENFILE before accepting again


class _Released:
    """``with _Released(lock)``: the lock let go by this thread meanwhile, however deeply
    it holds it (not held: nothing to do), and taken back as deeply after. Public RLock
    calls only: release until it says this thread no longer holds it."""

    __slots__ = ("_lock", "_depth")

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._depth = 0

    def __enter__(self) -> None:
        while True:
            try:
                self._lock.release()
            except RuntimeError:  # not (or no more) held by this thread
                return
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        for _ in range(self._depth):
            self._lock.acquire()


class Device(Protocol):
    """What a vfio-user device offers to the dispatcher."""

    name: str
    lock: threading.RLock
    dma: DmaController
    serving_thread: int | None  # the owner session's thread (set by FunctionServer)

    def device_info(self) -> tuple[int, int, int]: ...  # flags, num_regions, num_irqs
    def region_info(self, index: int) -> tuple[int, int]: ...  # flags, size
    def irq_info(self, index: int) -> tuple[int, int]: ...  # flags, count
    def region_read(self, index: int, offset: int, count: int) -> bytes: ...
    def region_write(self, index: int, offset: int, data: bytes) -> None: ...
    def set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes,
                 fds: list[int]) -> None: ...
    def reset(self) -> None: ...
    def feature(self, flags: int, data: bytes, argsz: int) -> bytes: ...
    def mig_data_read(self, size: int) -> bytes: ...
    def mig_data_write(self, data: bytes) -> None: ...
    def client_attached(self, session: Session) -> None: ...
    def client_detached(self) -> None: ...
    def on_wake(self) -> None: ...
    def flush_doorbells(self) -> None: ...  # work deferred while messages were queued


class Session:
    """One client connection: negotiated limits and the command dispatcher."""

    # Commands a read-only session (any connection but the function's owner) may
    # send: it may look (registers, config space, migration info), never touch.
    READONLY_COMMANDS = frozenset({
        wire.Command.VERSION, wire.Command.DEVICE_GET_INFO,
        wire.Command.DEVICE_GET_REGION_INFO, wire.Command.DEVICE_GET_IRQ_INFO,
        wire.Command.DEVICE_GET_REGION_IO_FDS, wire.Command.REGION_READ,
        wire.Command.DEVICE_FEATURE,
    })
    # Device features a read-only session may GET or PROBE (never SET): the
    # migration capabilities and the current migration state. Not the dirty log
    # (a REPORT clears what it reports).
    READONLY_FEATURES = frozenset({Feature.MIGRATION, Feature.MIG_DEVICE_STATE})

    def __init__(self, device: Device, sock: socket.socket, primary: bool = True,
                 busy_poll: float = 0.0) -> None:
        self.device = device
        self.primary = primary
        self.endpoint = Endpoint(sock, self.dispatch, DEFAULT_MAX_DATA_XFER, SERVER_MAX_MSG_FDS,
                                 busy_poll)
        self.endpoint.on_idle = self.flush_doorbells
        self.negotiated = False
        self.client_max_data_xfer = DEFAULT_MAX_DATA_XFER
        self.cut_off = False  # the client missed a DMA reply bound: no more DMA to it
        self._refusals = 0
        self.handlers = {
            wire.Command.VERSION: self.on_version,
            wire.Command.DMA_MAP: self.on_dma_map,
            wire.Command.DMA_UNMAP: self.on_dma_unmap,
            wire.Command.DEVICE_GET_INFO: self.on_get_info,
            wire.Command.DEVICE_GET_REGION_INFO: self.on_get_region_info,
            wire.Command.DEVICE_GET_REGION_IO_FDS: self.on_get_region_io_fds,
            wire.Command.DEVICE_GET_IRQ_INFO: self.on_get_irq_info,
            wire.Command.DEVICE_SET_IRQS: self.on_set_irqs,
            wire.Command.REGION_READ: self.on_region_read,
            wire.Command.REGION_WRITE: self.on_region_write,
            wire.Command.DEVICE_RESET: self.on_reset,
            wire.Command.REGION_WRITE_MULTI: self.on_write_multi,
            wire.Command.DEVICE_FEATURE: self.on_feature,
            wire.Command.MIG_DATA_READ: self.on_mig_data_read,
            wire.Command.MIG_DATA_WRITE: self.on_mig_data_write,
        }

    # -- dispatch ----------------------------------------------------------------------

    def dispatch(self, msg: Message) -> None:
        try:
            if msg.flags & wire.FLAG_TYPE_MASK != wire.TYPE_COMMAND or msg.flags & ~0x3F:
                raise ProtocolError(f"bad message flags {msg.flags:#x}")
            handler = self.handlers.get(msg.command)  # type: ignore[call-overload]
            if handler is None:
                if msg.command in (wire.Command.DMA_READ, wire.Command.DMA_WRITE):
                    raise ProtocolError(f"{wire.command_name(msg.command)} goes server->client")
                raise ProtocolError(f"unknown command {msg.command}", errno.ENOSYS)
            if not self.negotiated and msg.command != wire.Command.VERSION:
                raise ProtocolError("VFIO_USER_VERSION must come first")
            if not self.primary:
                self._check_readonly(msg)
            if msg.fds and msg.command not in (
                wire.Command.DMA_MAP, wire.Command.DEVICE_SET_IRQS
            ):
                raise ProtocolError(f"{wire.command_name(msg.command)} takes no fds")
            if self.endpoint.idle_due and msg.command not in (
                    wire.Command.REGION_WRITE, wire.Command.REGION_WRITE_MULTI):
                self.flush_doorbells()  # what came before this message is done first
            reply = handler(msg)
            if not msg.no_reply:
                if self.endpoint.idle_due:
                    self.flush_doorbells()  # a non-posted write is done when answered
                self.endpoint.reply(msg, reply)
        except ConnectionClosed:
            raise
        except VfnicError as exc:
            msg.close_fds()
            log.debug("%s: error %s: %s", wire.command_name(msg.command), exc.errno, exc)
            if not msg.no_reply:
                self.endpoint.reply_error(msg, exc.errno)
        except Exception:  # a bug must not take the server down
            msg.close_fds()
            log.exception("%s: internal error", wire.command_name(msg.command))
            if not msg.no_reply:
                self.endpoint.reply_error(msg, errno.EIO)

    def flush_doorbells(self) -> None:
        """Do the device work that posted writes deferred (TX doorbells): the serving
        thread calls this once the messages queued behind them are handled, so a burst
        of doorbells is one transmit."""
        self.endpoint.idle_due = False
        with self.device.lock:
            self.device.flush_doorbells()

    def _check_readonly(self, msg: Message) -> None:
        """A read-only session may look, never change the device (AccessDenied)."""
        name = wire.command_name(msg.command)
        why = None
        if msg.command not in self.READONLY_COMMANDS:
            why = f"{name}: only the session owning the function may do that"
        elif msg.command == wire.Command.DEVICE_FEATURE and len(msg.payload) >= 8:
            flags = wire.DeviceFeature.parse(msg.payload[:8]).flags
            index = flags & wire.VFIO_DEVICE_FEATURE_MASK
            if flags & wire.VFIO_DEVICE_FEATURE_SET or index not in self.READONLY_FEATURES:
                why = f"{name} {index} (flags {flags:#x}): read-only session"
        if why is None:
            return
        self._refusals += 1
        # Logged once per session at warning level (a hostile client cannot flood the log).
        level = logging.WARNING if self._refusals == 1 else logging.DEBUG
        log.log(level, "%s: refused %s from a read-only session (%d so far)",
                self.device.name, why, self._refusals)
        msg.close_fds()
        raise AccessDenied(why)

    @staticmethod
    def _need(msg: Message, size: int, exact: bool = False) -> None:
        n = len(msg.payload)
        if n < size or (exact and n != size):
            raise ProtocolError(
                f"{wire.command_name(msg.command)}: payload of {n} bytes, expected {size}"
            )

    @staticmethod
    def _argsz(argsz: int, minimum: int, what: str) -> None:
        if argsz < minimum:
            raise ProtocolError(f"{what}: argsz {argsz} < {minimum}")

    # -- VFIO_USER_VERSION ---------------------------------------------------------------

    def on_version(self, msg: Message) -> bytes:
        self._need(msg, wire.VERSION_SIZE)
        ver = wire.Version.parse(msg.payload[:4])
        if ver.major != 0:
            raise ProtocolError(f"unsupported protocol major {ver.major}", errno.ENOTSUP)
        caps: dict[str, object] = {}
        extra = msg.payload[4:]
        if extra:
            if extra[-1] != 0:
                raise ProtocolError("version data is not NUL-terminated")
            try:
                doc = json.loads(extra[:-1].decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                raise ProtocolError(f"version data is not JSON: {exc}") from exc
            if not isinstance(doc, dict):
                raise ProtocolError("version data is not a JSON object")
            raw = doc.get("capabilities", {})
            if not isinstance(raw, dict):
                raise ProtocolError("capabilities is not a JSON object")
            caps = raw
        xfer = caps.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER)
        if not isinstance(xfer, int) or isinstance(xfer, bool) or xfer < 1:
            raise ProtocolError(f"bad max_data_xfer_size {xfer!r}")
        for key in ("max_msg_fds", "pgsizes", "max_dma_maps"):
            if key in caps and (not isinstance(caps[key], int) or isinstance(caps[key], bool)):
                raise ProtocolError(f"bad {key} {caps[key]!r}")
        pgsizes = caps.get("pgsizes", 4096)
        assert isinstance(pgsizes, int)
        if not pgsizes & SERVER_PGSIZES:
            raise ProtocolError(f"no common page size in pgsizes {pgsizes:#x}", errno.ENOTSUP)
        self.client_max_data_xfer = min(xfer, DEFAULT_MAX_DATA_XFER)
        ours: dict[str, object] = {
            "max_msg_fds": SERVER_MAX_MSG_FDS,
            "max_data_xfer_size": DEFAULT_MAX_DATA_XFER,
            "max_dma_maps": SERVER_MAX_DMA_MAPS,
            "pgsizes": SERVER_PGSIZES,
        }
        if isinstance(caps.get("migration"), dict):
            ours["migration"] = {"pgsize": 4096, "max_bitmap_size": MAX_BITMAP}
        if caps.get("write_multiple") is True:
            ours["write_multiple"] = True
        self.negotiated = True
        data = json.dumps({"capabilities": ours}).encode() + b"\0"
        return wire.build(wire.Version, major=0, minor=0) + data

    # -- DMA ---------------------------------------------------------------------------

    def on_dma_map(self, msg: Message) -> bytes:
        self._need(msg, wire.DMA_MAP_SIZE, exact=True)
        req = wire.DmaMap.parse(msg.payload)
        if req.argsz != wire.DMA_MAP_SIZE:
            raise ProtocolError(f"DMA_MAP argsz {req.argsz}")
        if len(msg.fds) > 1:
            raise ProtocolError("DMA_MAP with more than one fd")
        fd = msg.fds.pop() if msg.fds else None
        if fd is None and req.offset:
            raise ProtocolError("DMA_MAP offset without an fd")
        with self.device.lock:
            self.device.dma.map(req.address, req.size, req.flags, req.offset, fd)
        return b""

    def on_dma_unmap(self, msg: Message) -> bytes:
        self._need(msg, wire.DMA_UNMAP_SIZE, exact=True)
        req = wire.DmaUnmap.parse(msg.payload)
        self._argsz(req.argsz, wire.DMA_UNMAP_SIZE, "DMA_UNMAP")
        unmap_all = 1 << 1  # VFIO_DMA_UNMAP_FLAG_ALL
        with self.device.lock:
            if req.flags == unmap_all and req.address == 0 and req.size == 0:
                self.device.dma.unmap_all()
            elif req.flags:
                raise ProtocolError(f"DMA_UNMAP flags {req.flags:#x}")
            else:
                self.device.dma.unmap(req.address, req.size)
        return msg.payload

    def _dma_request(self, command: wire.Command, payload: bytes) -> bytes:
        """A server-to-client DMA message; any failure becomes a DmaError.

        The NIC lock is released while the client answers (other functions keep
        being served); a client silent for DMA_REPLY_TIMEOUT is cut off."""
        name = wire.command_name(command)
        if self.cut_off or self.endpoint.closed:
            raise DmaError(f"{name}: the client was cut off", errno.ENODEV)
        try:
            with _Released(self.device.lock):  # other functions are served meanwhile
                reply = self.endpoint.request(command, payload, timeout=DMA_REPLY_TIMEOUT)
        except TimeoutError as exc:
            self.cut_off = True
            log.warning("%s: client did not answer %s within %g s: cut off",
                        self.device.name, name, DMA_REPLY_TIMEOUT)
            try:
                self.endpoint.sock.shutdown(socket.SHUT_RDWR)  # its serving thread ends
            except OSError:
                pass
            raise DmaTimeout(f"client did not answer {name} within "
                             f"{DMA_REPLY_TIMEOUT:g} s: {exc}") from exc
        except RemoteError as exc:
            raise DmaError(f"client refused {name}: {exc}", exc.errno) from exc
        except ConnectionClosed as exc:
            self.cut_off = True
            raise DmaError(f"{name}: client gone: {exc}", errno.ENODEV) from exc
        assert reply is not None
        return reply.payload[wire.DMA_ACCESS_SIZE:]

    def dma_read(self, address: int, length: int) -> bytes:
        """Read client memory through VFIO_USER_DMA_READ messages."""
        out = bytearray()
        while len(out) < length:
            n = min(self.client_max_data_xfer, length - len(out))
            payload = wire.build(wire.DmaAccess, address=address + len(out), count=n)
            data = self._dma_request(wire.Command.DMA_READ, payload)
            if len(data) != n:
                raise DmaError(f"DMA_READ reply carried {len(data)} bytes, not {n}")
            out += data
        return bytes(out)

    def dma_write(self, address: int, data: bytes) -> None:
        """Write client memory through VFIO_USER_DMA_WRITE messages."""
        step = self.client_max_data_xfer
        for pos in range(0, len(data), step):
            chunk = data[pos : pos + step]
            payload = wire.build(wire.DmaAccess, address=address + pos, count=len(chunk))
            self._dma_request(wire.Command.DMA_WRITE, payload + chunk)

    # -- device information ------------------------------------------------------------

    def on_get_info(self, msg: Message) -> bytes:
        self._need(msg, wire.DEVICE_INFO_SIZE)
        req = wire.DeviceInfo.parse(msg.payload[: wire.DEVICE_INFO_SIZE])
        self._argsz(req.argsz, wire.DEVICE_INFO_SIZE, "DEVICE_GET_INFO")
        flags, nreg, nirq = self.device.device_info()
        return wire.build(
            wire.DeviceInfo, argsz=wire.DEVICE_INFO_SIZE, flags=flags, num_regions=nreg,
            num_irqs=nirq,
        )

    def on_get_region_info(self, msg: Message) -> bytes:
        self._need(msg, wire.REGION_INFO_SIZE)
        req = wire.RegionInfo.parse(msg.payload[: wire.REGION_INFO_SIZE])
        self._argsz(req.argsz, wire.REGION_INFO_SIZE, "DEVICE_GET_REGION_INFO")
        flags, size = self.device.region_info(req.index)
        return wire.build(
            wire.RegionInfo, argsz=wire.REGION_INFO_SIZE, flags=flags, index=req.index,
            cap_offset=0, size=size, offset=0,
        )

    def on_get_region_io_fds(self, msg: Message) -> bytes:
        self._need(msg, wire.REGION_IO_FDS_SIZE)
        req = wire.RegionIoFds.parse(msg.payload[: wire.REGION_IO_FDS_SIZE])
        self._argsz(req.argsz, wire.REGION_IO_FDS_SIZE, "DEVICE_GET_REGION_IO_FDS")
        if req.flags or req.count:
            raise ProtocolError("DEVICE_GET_REGION_IO_FDS: flags and count must be zero")
        self.device.region_info(req.index)  # validates the index
        # No sub-region offers an ioeventfd: every access goes through REGION_WRITE.
        return wire.build(
            wire.RegionIoFds, argsz=wire.REGION_IO_FDS_SIZE, flags=0, index=req.index, count=0
        )

    def on_get_irq_info(self, msg: Message) -> bytes:
        self._need(msg, wire.IRQ_INFO_SIZE)
        req = wire.IrqInfo.parse(msg.payload[: wire.IRQ_INFO_SIZE])
        self._argsz(req.argsz, wire.IRQ_INFO_SIZE, "DEVICE_GET_IRQ_INFO")
        flags, count = self.device.irq_info(req.index)
        return wire.build(
            wire.IrqInfo, argsz=wire.IRQ_INFO_SIZE, flags=flags, index=req.index, count=count
        )

    def on_set_irqs(self, msg: Message) -> bytes:
        self._need(msg, wire.IRQ_SET_SIZE)
        req = wire.IrqSet.parse(msg.payload[: wire.IRQ_SET_SIZE])
        self._argsz(req.argsz, wire.IRQ_SET_SIZE, "DEVICE_SET_IRQS")
        fds = list(msg.fds)
        msg.fds.clear()
        try:
            with self.device.lock:
                self.device.set_irqs(
                    req.index, req.flags, req.start, req.count,
                    msg.payload[wire.IRQ_SET_SIZE :], fds,
                )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return b""

    # -- region access -----------------------------------------------------------------

    def _check_count(self, count: int) -> None:
        if count == 0 or count > DEFAULT_MAX_DATA_XFER:
            raise ProtocolError(f"access of {count} bytes", errno.EINVAL)

    def on_region_read(self, msg: Message) -> bytes:
        self._need(msg, wire.REGION_ACCESS_SIZE, exact=True)
        offset, region, count = wire.REGION_ACCESS.unpack(msg.payload)
        self._check_count(count)
        with self.device.lock:
            data = self.device.region_read(region, offset, count)
        return msg.payload + data

    def on_region_write(self, msg: Message) -> bytes:
        self._need(msg, wire.REGION_ACCESS_SIZE)
        offset, region, count = wire.REGION_ACCESS.unpack_from(msg.payload)
        data = msg.payload[wire.REGION_ACCESS_SIZE :]
        self._check_count(count)
        if len(data) != count:
            raise ProtocolError(f"REGION_WRITE count {count} but {len(data)} data bytes")
        with self.device.lock:
            self.device.region_write(region, offset, data)
        return msg.payload[: wire.REGION_ACCESS_SIZE]

    def on_write_multi(self, msg: Message) -> bytes:
        self._need(msg, wire.WRITE_MULTI_HEADER_SIZE)
        cnt = wire.WriteMultiHeader.parse(msg.payload[:8]).wr_cnt
        if not 1 <= cnt <= wire.WRITE_MULTI_MAX:
            raise ProtocolError(f"REGION_WRITE_MULTI wr_cnt {cnt}")
        if len(msg.payload) != 8 + cnt * wire.WRITE_MULTI_ENTRY_SIZE:
            raise ProtocolError("REGION_WRITE_MULTI size does not match wr_cnt")
        writes = []
        for i in range(cnt):
            pos = 8 + i * wire.WRITE_MULTI_ENTRY_SIZE
            w = wire.WriteMultiEntry.parse(msg.payload[pos : pos + wire.WRITE_MULTI_ENTRY_SIZE])
            if not 1 <= w.count <= 8:
                raise ProtocolError(f"REGION_WRITE_MULTI entry {i}: count {w.count}")
            writes.append(w)
        with self.device.lock:
            for i, w in enumerate(writes):  # validate all first: a bad entry writes nothing
                _, size = self.device.region_info(w.region)
                if size == 0 or w.offset >= size or w.offset + w.count > size:
                    raise ProtocolError(f"REGION_WRITE_MULTI entry {i} outside region {w.region}")
            for w in writes:
                self.device.region_write(w.region, w.offset, bytes(w.data[: w.count]))
        return msg.payload[:8]

    def on_reset(self, msg: Message) -> bytes:
        with self.device.lock:
            self.device.reset()
        return b""

    # -- features and migration data -------------------------------------------------

    def on_feature(self, msg: Message) -> bytes:
        self._need(msg, wire.DEVICE_FEATURE_SIZE)
        req = wire.DeviceFeature.parse(msg.payload[:8])
        self._argsz(req.argsz, wire.DEVICE_FEATURE_SIZE, "DEVICE_FEATURE")
        with self.device.lock:
            data = self.device.feature(req.flags, msg.payload[8:], req.argsz)
        return wire.build(wire.DeviceFeature, argsz=8 + len(data), flags=req.flags) + data

    def on_mig_data_read(self, msg: Message) -> bytes:
        self._need(msg, wire.MIG_DATA_SIZE, exact=True)
        req = wire.MigData.parse(msg.payload)
        self._argsz(req.argsz, wire.MIG_DATA_SIZE, "MIG_DATA_READ")
        if req.size > DEFAULT_MAX_DATA_XFER or req.size > req.argsz - wire.MIG_DATA_SIZE:
            raise ProtocolError(f"MIG_DATA_READ of {req.size} bytes (argsz {req.argsz})")
        with self.device.lock:
            data = self.device.mig_data_read(req.size)
        return wire.build(wire.MigData, argsz=8 + len(data), size=len(data)) + data

    def on_mig_data_write(self, msg: Message) -> bytes:
        self._need(msg, wire.MIG_DATA_SIZE)
        req = wire.MigData.parse(msg.payload[:8])
        data = msg.payload[8:]
        if req.size != len(data) or req.argsz < 8 + req.size:
            raise ProtocolError(f"MIG_DATA_WRITE size {req.size} with {len(data)} data bytes")
        with self.device.lock:
            self.device.mig_data_write(data)
        return wire.build(wire.MigData, argsz=8, size=req.size)


def listen_unix(path: str, backlog: int, mode: int = 0o600, gid: int | None = None
                ) -> socket.socket:
    """A listening UNIX socket at ``path`` with ``mode`` (and group ``gid``) whatever
    the umask: the caller's folder is owner-only, so nobody reaches it before chmod."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def accept_retry(listener: socket.socket, stopped: threading.Event, name: str
                 ) -> socket.socket | None:
    """accept() that survives EMFILE/ENFILE and the like (waits, logs once per burst,
    retries); None once the listener is closed."""
    failures = 0
    while not stopped.is_set():
        try:
            conn, _ = listener.accept()
            if failures:
                log.warning("%s: accepting again after %d failed accepts", name, failures)
            return conn
        except (ConnectionAbortedError, InterruptedError):
            continue
        except OSError as exc:
            if stopped.is_set() or listener.fileno() < 0 or exc.errno in (
                    errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                return None
            if failures == 0:
                log.warning("%s: accept failed (%s); retrying", name, exc.strerror or exc)
            failures += 1
            time.sleep(ACCEPT_BACKOFF)  # EMFILE/ENFILE/ENOMEM/ENOBUFS: wait for fds
    return None


class FunctionServer:
    """Listens on one UNIX socket for ``device``: the first client owns the function,
    any other connection meanwhile gets a read-only session."""

    def __init__(self, device: Device, path: str, name: str, busy_poll: float = 0.0,
                 mode: int = 0o600, gid: int | None = None) -> None:
        self.device = device
        self.path = path
        self.name = name
        self.busy_poll = busy_poll  # Endpoint.busy_poll of the owner's session
        self.session: Session | None = None
        self.readonly: set[Session] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.listener = listen_unix(path, 16, mode, gid)
        self.thread = threading.Thread(target=self._accept_loop, name=f"vfu-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def attached(self) -> bool:
        return self.session is not None

    def _accept_loop(self) -> None:
        while True:
            conn = accept_retry(self.listener, self._stop, self.name)
            if conn is None:
                return
            try:
                self._take(conn)
            except Exception as exc:  # one connection failing (no fds, no thread) is not fatal
                log.warning("%s: dropped a connection: %s", self.name, exc)
                conn.close()

    def _owner_gone(self) -> bool:
        """The owner's peer hung up but its serving thread has not noticed yet."""
        session = self.session
        if session is None:
            return True
        try:
            p = select.poll()
            p.register(session.endpoint.sock, select.POLLRDHUP)
            events = p.poll(0)
        except (OSError, ValueError):
            return True
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in events)

    def _take(self, conn: socket.socket) -> None:
        # A client reconnecting right after closing (a rebooted or restarted QEMU) is
        # the next owner: wait for the old owner's session to wind down first.
        deadline = time.monotonic() + OWNER_HANDOVER
        while self.session is not None and self._owner_gone() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            owner = self.session is None
            if not owner and len(self.readonly) >= MAX_READONLY_SESSIONS:
                log.warning("%s: refused a connection: %d read-only sessions already",
                            self.name, MAX_READONLY_SESSIONS)
                conn.close()
                return
            session = Session(self.device, conn, primary=owner,
                              busy_poll=self.busy_poll if owner else 0.0)
            if owner:
                self.session = session
            else:
                self.readonly.add(session)
        target = self._serve if owner else self._serve_readonly
        try:
            if owner:
                with self.device.lock:
                    self.device.client_attached(session)
            threading.Thread(target=target, args=(session,), daemon=True,
                             name=f"vfu-{self.name}-{'conn' if owner else 'ro'}").start()
        except BaseException:
            if owner:
                with self.device.lock:
                    self.device.client_detached()
            with self._lock:
                if owner:
                    self.session = None
                self.readonly.discard(session)
            session.endpoint.close()
            raise

    def _serve_readonly(self, session: Session) -> None:
        try:
            session.endpoint.serve_forever()
        finally:
            session.endpoint.close()
            with self._lock:
                self.readonly.discard(session)

    def _serve(self, session: Session) -> None:
        self.device.serving_thread = threading.get_ident()

        def wake() -> None:
            try:
                with self.device.lock:
                    self.device.on_wake()
            except ConnectionClosed:
                raise
            except Exception:  # a device bug must not end the connection
                log.exception("%s: deferred device work failed", self.name)

        session.endpoint.on_wake = wake
        try:
            session.endpoint.serve_forever()
        finally:
            # Client went away: drop its mappings and IRQ fds, keep device state.
            with self.device.lock:
                self.device.client_detached()
            session.endpoint.close()
            with self._lock:
                self.session = None

    def stop(self) -> None:
        self._stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        if self.session is not None:
            self.session.endpoint.close()
        for ro in list(self.readonly):
            ro.endpoint.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
