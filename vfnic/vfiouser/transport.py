"""vfio-user transport: framing, file descriptors and request/reply matching.

One ``Endpoint`` wraps a connected AF_UNIX stream socket. Both ends of the
protocol use it: the server receives commands and sends requests
(DMA_READ/DMA_WRITE), the client does the opposite. Whichever thread is
reading handles every incoming message: replies are matched to waiting
requests by message ID ("Header": IDs belong to the sender), commands go to
the ``on_command`` handler. A handler may itself send a request and wait for
its reply; commands that arrive meanwhile are deferred and handled in order
afterwards ("Command Concurrency": commands are processed in order).
"""

from __future__ import annotations

import array
import collections
import errno as _errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vfnic.errors import ConnectionClosed, ProtocolError, RemoteError
from vfnic.vfiouser import wire

DEFAULT_MAX_DATA_XFER = 1 << 20  # "max_data_xfer_size" default
DEFAULT_MAX_MSG_FDS = 16
# Largest message we accept: a full data transfer plus its fixed header, with room
# for the largest fixed payload (DMA logging report headers, IRQ bool arrays).
MSG_OVERHEAD = 4096


@dataclass(slots=True)
class Message:
    """One received message: header fields, payload and any file descriptors."""

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return (self.flags & wire.FLAG_TYPE_MASK) == wire.TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & wire.FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & wire.FLAG_ERROR)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


class FramingError(ProtocolError):
    """A header whose size field cannot be honoured; the bytes were consumed."""

    def __init__(self, message: str, errno: int, msg: Message) -> None:
        super().__init__(message, errno)
        self.msg = msg


class Endpoint:
    """A vfio-user peer on one connected socket."""

    def __init__(
        self,
        sock: socket.socket,
        on_command: Callable[[Message], None] | None = None,
        max_data_xfer: int = DEFAULT_MAX_DATA_XFER,
        max_msg_fds: int = DEFAULT_MAX_MSG_FDS,
        busy_poll: float = 0.0,
    ) -> None:
        self.sock = sock
        self.on_command = on_command
        self.max_data_xfer = max_data_xfer
        self.max_msg_fds = max_msg_fds
        self._send_lock = threading.Lock()
        self._recv_lock = threading.RLock()
        self._cond = threading.Condition()
        self._replies: dict[int, Message] = {}
        self._waiting: set[int] = set()
        self._deferred: collections.deque[Message] = collections.deque()
        self._handling = 0  # nesting depth of on_command in the reading thread
        self._next_id = 0
        self._id_lock = threading.Lock()
        self.closed = False
        self._cmsg_space = socket.CMSG_SPACE(max_msg_fds * 4)
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.on_wake: Callable[[], None] | None = None
        # Seconds to keep polling (zero-timeout select) before sleeping in select: a
        # peer's next message then finds this thread awake, without the scheduler's
        # wakeup (~27 us across cores here). Costs a CPU while it spins; 0 = off.
        self.busy_poll = busy_poll
        self.received: collections.Counter[int] = collections.Counter()  # commands by number
        # Work a handler deferred until no message is waiting (idle_due set): on_idle,
        # in the serving thread, once the socket has nothing more to read.
        self.idle_due = False
        self.on_idle: Callable[[], None] | None = None

    # -- sending -------------------------------------------------------------------

    def new_id(self) -> int:
        with self._id_lock:
            self._next_id = (self._next_id + 1) & 0xFFFF
            return self._next_id

    def send(
        self,
        msg_id: int,
        command: int,
        payload: bytes = b"",
        flags: int = wire.TYPE_COMMAND,
        error: int = 0,
        fds: list[int] | None = None,
    ) -> None:
        data = wire.HEADER.pack(msg_id, command, wire.HEADER_SIZE + len(payload), flags, error)
        data += payload
        with self._send_lock:
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    sent = self.sock.sendmsg([data], anc)
                else:
                    sent = self.sock.send(data)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                self.closed = True
                raise ConnectionClosed(f"peer went away: {exc}") from exc

    def reply(self, req: Message, payload: bytes = b"", fds: list[int] | None = None) -> None:
        self.send(req.msg_id, req.command, payload, wire.TYPE_REPLY, 0, fds)

    def reply_error(self, req: Message, errno: int) -> None:
        self.send(req.msg_id, req.command, b"", wire.TYPE_REPLY | wire.FLAG_ERROR, errno)

    # -- receiving -----------------------------------------------------------------

    def _recv_exact(self, n: int, fds: list[int] | None) -> bytes:
        chunks = []
        remaining = n
        while remaining:
            if fds is not None:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(remaining, self._cmsg_space)
                for level, ctype, cdata in ancdata:
                    if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                        arr = array.array("i")
                        arr.frombytes(cdata[: len(cdata) - (len(cdata) % 4)])
                        fds.extend(arr)
                if msg_flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    fds.clear()
                    fds.append(-1)  # marks "too many fds"
            else:
                data = self.sock.recv(remaining)
            if not data:
                self.closed = True
                raise ConnectionClosed("peer closed the connection")
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)

    def _discard(self, n: int) -> None:
        while n:
            data = self.sock.recv(min(n, 1 << 16))
            if not data:
                self.closed = True
                raise ConnectionClosed("peer closed the connection")
            n -= len(data)

    def recv_message(self) -> Message:
        """Read one whole message. Raises FramingError for unusable sizes (already
        consumed, so the stream stays in step), ConnectionClosed at EOF."""
        fds: list[int] = []
        try:
            raw = self._recv_exact(wire.HEADER_SIZE, fds)
        except TimeoutError:  # a caller's socket timeout (tests' raw connections)
            raise
        except (OSError, ValueError) as exc:  # reset, or closed under us
            self.closed = True
            raise ConnectionClosed(f"connection lost: {exc}") from exc
        msg_id, command, msg_size, flags, error = wire.HEADER.unpack(raw)
        msg = Message(msg_id, command, flags, error, b"", fds)
        if -1 in fds:
            msg.fds = [fd for fd in fds if fd >= 0]
            msg.close_fds()
            if msg_size > wire.HEADER_SIZE:
                self._discard(msg_size - wire.HEADER_SIZE)
            raise FramingError(
                f"more than {self.max_msg_fds} file descriptors", _errno.EINVAL, msg
            )
        if msg_size < wire.HEADER_SIZE:
            msg.close_fds()
            raise FramingError(f"message size {msg_size} < header", _errno.EINVAL, msg)
        body = msg_size - wire.HEADER_SIZE
        if body > self.max_data_xfer + MSG_OVERHEAD:
            msg.close_fds()
            self._discard(body)
            raise FramingError(f"message of {msg_size} bytes is too large", _errno.E2BIG, msg)
        if body:
            # fds travel with the first byte of a message (one sendmsg per message).
            msg.payload = self._recv_exact(body, None)
        return msg

    def _dispatch_one(self) -> None:
        """Read one message and route it (reply -> waiter, command -> handler or defer)."""
        try:
            msg = self.recv_message()
        except FramingError as exc:
            if not exc.msg.is_reply and not exc.msg.no_reply:
                self.reply_error(exc.msg, exc.errno)
            return
        if msg.is_reply:
            with self._cond:
                if msg.msg_id in self._waiting:
                    self._replies[msg.msg_id] = msg
                    self._cond.notify_all()
                    return
            msg.close_fds()  # a reply nobody waits for
            return
        self.received[msg.command] += 1
        if self._handling:
            self._deferred.append(msg)
            return
        self._handle(msg)

    def _handle(self, msg: Message) -> None:
        if self.on_command is None:
            msg.close_fds()
            if not msg.no_reply:
                self.reply_error(msg, _errno.ENOTSUP)
            return
        on_command = self.on_command
        self._as_handler(lambda: on_command(msg))

    def _as_handler(self, work: Callable[[], None]) -> None:
        """Run command handling or device work: commands that arrive while it waits
        for a reply of its own are deferred, then handled in order."""
        self._handling += 1
        try:
            work()
        finally:
            self._handling -= 1
        if not self._handling:
            while self._deferred:
                self._handle(self._deferred.popleft())

    def wake(self) -> None:
        """Ask the serving thread to run ``on_wake`` (device work that needs it,
        e.g. DMA through messages, which only the reading thread may do)."""
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass

    def _spin(self, fds: list[int]) -> list[int]:
        """Zero-timeout selects for up to ``busy_poll`` seconds: the ready fds, or []."""
        deadline = time.perf_counter() + self.busy_poll
        while True:
            ready = select.select(fds, [], [], 0)[0]
            if ready or time.perf_counter() >= deadline:
                return ready

    def serve_forever(self) -> None:
        """Handle incoming messages until the peer closes the connection."""
        fds = [self.sock.fileno(), self.wake_fd]
        try:
            while True:
                try:
                    ready = self._spin(fds) if self.busy_poll else []
                    if not ready:
                        ready, _, _ = select.select(fds, [], [])
                except (ValueError, OSError):  # closed under us by stop()
                    return
                with self._recv_lock:
                    if self.wake_fd in ready:
                        try:
                            os.eventfd_read(self.wake_fd)
                        except BlockingIOError:
                            pass
                        if self.on_wake is not None:
                            self._as_handler(self.on_wake)
                            # Its DMA messages may have read what the socket held:
                            # look again rather than block in recv.
                            try:
                                if not select.select([self.sock], [], [], 0)[0]:
                                    continue
                            except (ValueError, OSError):  # closed by stop()
                                return
                    if self.sock.fileno() in ready:
                        self._dispatch_one()
                        if (self.idle_due and self.on_idle is not None
                                and not select.select([self.sock], [], [], 0)[0]):
                            self._as_handler(self.on_idle)
        except ConnectionClosed:
            pass
        finally:
            self._wake_all()

    def poll(self, timeout: float) -> bool:
        """Handle messages already waiting on the socket (client side, when idle)."""
        if not self._recv_lock.acquire(timeout=timeout):
            return False
        try:
            r, _, _ = select.select([self.sock], [], [], timeout)
            if not r:
                return False
            self._dispatch_one()
            return True
        finally:
            self._recv_lock.release()

    def _wake_all(self) -> None:
        self.closed = True
        with self._cond:
            self._cond.notify_all()

    # -- requests ------------------------------------------------------------------

    def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        timeout: float | None = 30.0,
        no_reply: bool = False,
    ) -> Message | None:
        """Send a command and return its reply (RemoteError if it is an error reply)."""
        msg_id = self.new_id()
        flags = wire.TYPE_COMMAND | (wire.FLAG_NO_REPLY if no_reply else 0)
        if no_reply:
            self.send(msg_id, command, payload, flags, 0, fds)
            return None
        with self._cond:
            self._waiting.add(msg_id)
        try:
            self.send(msg_id, command, payload, flags, 0, fds)
            reply = self._wait_reply(msg_id, timeout)
        finally:
            with self._cond:
                self._waiting.discard(msg_id)
                self._replies.pop(msg_id, None)
        if reply.is_error:
            reply.close_fds()
            raise RemoteError(wire.command_name(command), reply.error or _errno.EIO)
        return reply

    def _wait_reply(self, msg_id: int, timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                if msg_id in self._replies:
                    return self._replies.pop(msg_id)
                if self.closed:
                    raise ConnectionClosed("connection closed while waiting for a reply")
            # Read ourselves if nobody else is; else wait for the reader to hand it over.
            if self._recv_lock.acquire(blocking=False):
                try:
                    with self._cond:
                        if msg_id in self._replies:
                            continue
                    if deadline is not None and not (
                            self.busy_poll and self._spin([self.sock.fileno()])):
                        # Wait for data with poll, not socket timeouts: those flip
                        # O_NONBLOCK with two fcntl calls per request.
                        left = deadline - time.monotonic()
                        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                            raise TimeoutError(f"no reply to message {msg_id}")
                    try:
                        self._dispatch_one()
                    except ConnectionClosed:
                        self._wake_all()
                        raise
                finally:
                    self._recv_lock.release()
            else:
                with self._cond:
                    if msg_id not in self._replies and not self.closed:
                        wait = 0.05
                        if deadline is not None:
                            left = deadline - time.monotonic()
                            if left <= 0:
                                raise TimeoutError(f"no reply to message {msg_id}")
                            wait = min(left, 0.05)
                        self._cond.wait(wait)

    def close(self) -> None:
        self._wake_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        fd, self.wake_fd = self.wake_fd, -1  # close once, even from two threads
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
