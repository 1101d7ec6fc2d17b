"""RX and TX rings of one function: descriptors in guest memory, moved by DMA.

Ring geometry and ownership follow the 82599 model (datasheet 7.1 and 7.2):
descriptors in [head, tail) belong to the device. The device validates every
ring and buffer address against the client's mappings (``DmaController``); a
bad one disables the queue and sets its QERR cause, and the server goes on.
"""

from __future__ import annotations

import collections
import struct
from typing import TYPE_CHECKING

from vfnic.errors import DmaError
from vfnic.regs import descriptors as D

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction

RX_BACKLOG = 256  # frames waiting for the serving thread (fd-less DMA only)
RX_WRITEBACK = struct.Struct("<HHBBH")  # length, csum, status, errors, vlan


class DataPath:
    """Queues of one function. All methods run under the NIC lock."""

    def __init__(self, fn: PciFunction) -> None:
        self.fn = fn
        self.backlog: collections.deque[bytes] = collections.deque()

    # -- helpers -------------------------------------------------------------------------

    def _reg(self, name: str, q: int) -> int:
        return self.fn.bank.get(f"{name}{q}")

    def _set(self, name: str, q: int, value: int) -> None:
        self.fn.bank.set(f"{name}{q}", value)

    def _count(self, stat: str, n: int = 1) -> None:
        self.fn.bank.set(stat, (self.fn.bank.get(stat) + n) & 0xFFFFFFFF)

    def _count64(self, low: str, high: str, n: int) -> None:
        value = (self.fn.bank.get(high) << 32 | self.fn.bank.get(low)) + n
        self.fn.bank.set(low, value & 0xFFFFFFFF)
        self.fn.bank.set(high, (value >> 32) & 0xFFFFFFFF)

    def ring(self, kind: str, q: int) -> tuple[int, int]:
        """(base, descriptor count) of ring ``kind`` ('R' or 'T') of queue q."""
        base = self._reg(f"{kind}DBAH", q) << 32 | self._reg(f"{kind}DBAL", q)
        return base, self._reg(f"{kind}DLEN", q) // D.DESC_SIZE

    def enabled(self, kind: str, q: int) -> bool:
        return bool(self._reg(f"{kind}XDCTL", q) & D.QCTL_ENABLE)

    def queue_error(self, kind: str, q: int, cause: int) -> None:
        """Disable the queue and report why (QERRn, EICR queue bit)."""
        self._set(f"{kind}XDCTL", q, self._reg(f"{kind}XDCTL", q) & ~D.QCTL_ENABLE)
        self.fn.bank.set_bits(f"QERR{q}", cause)
        self._count("RXERRC" if kind == "R" else "TXERRC")
        if self.fn.nic is not None:
            self.fn.nic.raise_cause(self.fn, 1 << q)

    def _check_ring(self, kind: str, q: int) -> bool:
        base, count = self.ring(kind, q)
        if count == 0 or self._reg(f"{kind}DLEN", q) % 128:
            self.queue_error(kind, q, D.QERR_RING)
            return False
        try:
            self.fn.dma.find(base, count * D.DESC_SIZE)
        except DmaError:
            self.queue_error(kind, q, D.QERR_DMA)
            return False
        return True

    # -- register hooks -------------------------------------------------------------------

    def on_ctl_write(self, kind: str, q: int) -> None:
        """RXDCTL/TXDCTL written: enabling a queue validates its ring and resets head."""
        if not self.enabled(kind, q):
            return
        if self._check_ring(kind, q):
            self._set(f"{kind}DH", q, 0)
            if kind == "T":
                self.transmit(q)

    def on_tail_write(self, kind: str, q: int) -> None:
        if not self.enabled(kind, q):
            return
        _, count = self.ring(kind, q)
        if self._reg(f"{kind}DT", q) >= count:
            self.queue_error(kind, q, D.QERR_TAIL)
            return
        if kind == "T":
            self.transmit(q)
        else:
            self.drain_backlog()

    # -- transmit -------------------------------------------------------------------------

    def transmit(self, q: int) -> int:
        """Send every descriptor in [TDH, TDT); returns the number of frames sent.
        Per batch, not per frame: TDH and the statistics are written once, and the
        queue's interrupt is raised once, only if a descriptor asked for a report
        (RS, 82599 7.2.3: a driver may ask for one every few frames)."""
        fn = self.fn
        if not fn.running or not self.enabled("T", q):
            return 0
        base, count = self.ring("T", q)
        head, tail = self._reg("TDH", q), self._reg("TDT", q)
        sent = octets = 0
        report = False
        error = 0
        frames: list[bytes] = []
        while head != tail:
            slot = base + head * D.DESC_SIZE
            try:
                addr, length, _cso, cmd, _st, _css, _vlan = D.TX_DESC.unpack(
                    fn.dma_read(slot, D.DESC_SIZE)
                )
                if not D.MIN_FRAME <= length <= D.MAX_FRAME:
                    error = D.QERR_LEN
                    break
                frames.append(fn.dma_read(addr, length))
                if cmd & D.CMD_RS:
                    fn.dma_write(slot + 12, bytes([D.STAT_DD]))
                    report = True
            except DmaError:
                error = D.QERR_DMA
                break
            head = (head + 1) % count
            sent += 1
            octets += length
        self._set("TDH", q, head)
        if sent:
            self._count("GPTC", sent)
            self._count64("GOTCL", "GOTCH", octets)
        if fn.nic is not None:
            for frame in frames:
                fn.nic.switch.forward(fn, frame)
        if error:
            self.queue_error("T", q, error)
        elif report and fn.nic is not None:
            fn.nic.raise_cause(fn, 1 << q)
        return sent

    # -- receive --------------------------------------------------------------------------

    def receive(self, frame: bytes) -> None:
        """A frame for this function (from the switch). DMA through messages may
        only be done by the thread serving the client: queue it and wake that thread."""
        fn = self.fn
        if not fn.running or fn.session is None or not self.enabled("R", 0):
            fn.count_drop()
            return
        if fn.dma.has_message_regions() and not fn.in_serving_thread():
            if len(self.backlog) >= RX_BACKLOG:
                fn.count_drop()
                return
            self.backlog.append(frame)
            fn.session.endpoint.wake()
            return
        self._deliver(frame)

    def drain_backlog(self) -> None:
        while self.backlog:
            self._deliver(self.backlog.popleft())

    def _deliver(self, frame: bytes, q: int = 0) -> bool:
        fn = self.fn
        if not fn.running or not self.enabled("R", q):
            fn.count_drop()
            return False
        base, count = self.ring("R", q)
        head, tail = self._reg("RDH", q), self._reg("RDT", q)
        if head == tail:  # no descriptor posted: the frame is missed
            fn.count_drop()
            return False
        slot = base + head * D.DESC_SIZE
        try:
            (addr,) = struct.unpack("<Q", fn.dma_read(slot, 8))
            errors = 0
            if len(frame) > D.RX_BUFFER_SIZE:
                errors = D.RXERR_LEN
                self._count("RXERRC")
            else:
                fn.dma_write(addr, frame)
            wb = RX_WRITEBACK.pack(0 if errors else len(frame), 0, D.STAT_DD | D.STAT_EOP,
                                   errors, 0)
            fn.dma_write(slot + 8, wb)
        except DmaError:
            self.queue_error("R", q, D.QERR_DMA)
            return False
        self._set("RDH", q, (head + 1) % count)
        if not errors:
            self._count("GPRC")
            self._count64("GORCL", "GORCH", len(frame))
        if fn.nic is not None:
            fn.nic.raise_cause(fn, 1 << q)
        return True
