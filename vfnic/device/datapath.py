"""RX and TX rings of one function: descriptors in guest memory, moved by DMA.

Ring geometry and ownership follow the 82599 model (datasheet 7.1 and 7.2):
descriptors in [head, tail) belong to the device. The device validates every
ring and buffer address against the client's mappings (``DmaController``); a
bad one disables the queue and sets its QERR cause, and the server goes on.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING, NamedTuple

from vfnic.dma.controller import DmaController
from vfnic.errors import DmaError
from vfnic.regs import descriptors as D
from vfnic.regs import table as T
from vfnic.regs.bank import Reg

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction

log = logging.getLogger(__name__)

RX_BACKLOG = 256  # frames waiting for the serving thread (fd-less DMA only)
RX_DONE = D.STAT_DD | D.STAT_EOP  # a received frame's write-back status


class QueueRegs(NamedTuple):
    """One queue's ring registers (82599 8.2.3.8, 8.2.3.9), looked up once."""

    DBAL: T.Register
    DBAH: T.Register
    DLEN: T.Register
    DH: T.Register
    DT: T.Register
    XDCTL: T.Register


RING_REGS = {ring.name: tuple(QueueRegs(ring.DBAL(q), ring.DBAH(q), ring.DLEN(q), ring.DH(q),
                                        ring.DT(q), ring.XDCTL(q))
                              for q in range(T.NUM_QUEUES))
             for ring in (T.RX, T.TX)}


class DataPath:
    """Queues of one function. All methods run under the NIC lock."""

    def __init__(self, fn: PciFunction) -> None:
        self.fn = fn
        self.backlog: collections.deque[bytes] = collections.deque()
        self.pending: list[bytes] = []  # received during a burst, delivered at its end
        self.tx_due: set[int] = set()  # TX queues whose doorbell waits for flush_tx

    # -- helpers -------------------------------------------------------------------------

    def _reg(self, reg: Reg) -> int:
        return self.fn.bank.get(reg)

    def _set(self, reg: Reg, value: int) -> None:
        self.fn.bank.set(reg, value)

    def _count(self, stat: T.Register, n: int = 1) -> None:
        self.fn.bank.add(stat, n)

    def _count64(self, low: T.Register, high: T.Register, n: int) -> None:
        self.fn.bank.add64(low, high, n)

    def ring(self, ring: T.Ring, q: int) -> tuple[int, int]:
        """(base, descriptor count) of ``ring`` (T.RX or T.TX) of queue q."""
        return self._ring(RING_REGS[ring.name][q])

    def _ring(self, r: QueueRegs) -> tuple[int, int]:
        get = self.fn.bank.get
        return get(r.DBAH) << 32 | get(r.DBAL), get(r.DLEN) // D.DESC_SIZE

    def enabled(self, ring: T.Ring, q: int) -> bool:
        return bool(self.fn.bank.get(RING_REGS[ring.name][q].XDCTL) & T.QCTL_ENABLE)

    def queue_error(self, ring: T.Ring, q: int, cause: int, why: object = None) -> None:
        """Disable the queue and report why (QERRn, EICR queue bit)."""
        if why is not None:  # a DMA fault: this function's queue stops, the NIC goes on
            log.warning("%s: %s queue %d disabled: %s", self.fn.name, ring.name, q, why)
        self._set(ring.XDCTL(q), self._reg(ring.XDCTL(q)) & ~T.QCTL_ENABLE)
        self.fn.bank.set_bits(T.QERR(q), cause)
        self._count(T.RXERRC if ring is T.RX else T.TXERRC)
        if self.fn.nic is not None:
            self.fn.nic.raise_cause(self.fn, T.EICR_RTXQ(q))

    def _check_ring(self, ring: T.Ring, q: int) -> bool:
        base, count = self.ring(ring, q)
        if count == 0 or self._reg(ring.DLEN(q)) % 128:
            self.queue_error(ring, q, T.QERR_RING)
            return False
        try:
            self.fn.dma.find(base, count * D.DESC_SIZE)
        except DmaError as exc:
            self.queue_error(ring, q, T.QERR_DMA, exc)
            return False
        return True

    # -- register hooks -------------------------------------------------------------------

    def on_ctl_write(self, ring: T.Ring, q: int) -> None:
        """RXDCTL/TXDCTL written: enabling a queue validates its ring and resets head."""
        if not self.enabled(ring, q):
            return
        if self._check_ring(ring, q):
            self._set(ring.DH(q), 0)
            if ring is T.TX:
                self.transmit(q)

    def on_tail_write(self, ring: T.Ring, q: int) -> None:
        if not self.enabled(ring, q):
            return
        _, count = self.ring(ring, q)
        if self._reg(ring.DT(q)) >= count:
            self.queue_error(ring, q, T.QERR_TAIL)
            return
        if ring is T.TX:
            session = self.fn.session
            if session is not None and self.fn.in_serving_thread():
                # A doorbell through the client's socket: sent once the messages queued
                # behind it are handled (flush_tx), so queued doorbells are one batch.
                self.tx_due.add(q)
                session.endpoint.idle_due = True
            else:
                self.transmit(q)
        else:
            self.drain_backlog()
            if self.fn.nic is not None:
                self.fn.nic.rx_posted.set()  # an uplink reader may wait for descriptors

    # -- transmit -------------------------------------------------------------------------

    def _read_descriptors(self, dma: DmaController, base: int, count: int, head: int,
                          n: int) -> bytes:
        """Descriptors head.. head+n-1 of a ring, in one read (two if the ring wraps)."""
        first = min(n, count - head)
        data = dma.read(base + head * D.DESC_SIZE, first * D.DESC_SIZE)
        if n > first:
            data += dma.read(base, (n - first) * D.DESC_SIZE)
        return data

    def transmit(self, q: int) -> int:
        """Send every descriptor in [TDH, TDT); returns the number of frames sent.
        Per batch, not per frame: the descriptors are read in one DMA and the
        reported ones written back in one, TDH and the statistics are written once,
        the frames are switched under one interrupt per receiving function, and the
        queue's interrupt is raised once, only if a descriptor asked for a report (RS,
        82599 7.2.3: a driver may ask for one every few frames)."""
        fn = self.fn
        bank = fn.bank
        get = bank.get
        r = RING_REGS["TX"][q]
        if not fn.running or not get(r.XDCTL) & T.QCTL_ENABLE:
            return 0
        head, tail = get(r.DH), get(r.DT)
        if head == tail:
            return 0
        base, count = self._ring(r)
        sent = octets = 0
        report = False
        error = 0
        why: object = None
        frames: list[bytes] = []
        bucket = fn.policy.bucket
        take = bucket.take if bucket.rate else None  # max_tx_rate: metered per frame
        nic = fn.nic
        # The uplink's line rate (--link-speed): its egress scheduler decides per frame.
        egress = switch = None
        if nic is not None and nic.egress.rate:
            egress, switch = nic.egress, nic.switch
        ports = switch.ports() if switch is not None else []
        start = head
        descs = b""
        rs: list[int] = []  # the sent descriptors that ask for a report (by index)
        try:
            dma = fn.check_dma()
            read = dma.read
            IC, RS = D.CMD_IC, D.CMD_RS  # noqa: N806 (the descriptor's bit names, bound once)
            with dma.batch():
                descs = self._read_descriptors(dma, base, count, head, (tail - head) % count)
                for addr, length, cso, cmd, _st, css, _vlan in D.TX_DESC.iter_unpack(descs):
                    if not D.MIN_FRAME <= length <= D.MAX_FRAME:
                        error = T.QERR_LEN
                        break
                    if egress is None and take is not None:
                        wait = take(length)
                        if wait:  # max_tx_rate: the descriptor stays the device's until then
                            self._pace(wait)
                            break
                    data = read(addr, length)
                    if cmd & IC:
                        data = D.insert_checksum(data, css, cso)
                    if egress is not None:
                        uplink = switch is None or switch.to_uplink(fn, data, ports)
                        wait = egress.take(fn, length, uplink)
                        if wait:  # not its turn on the uplink: the descriptor stays ours
                            self._pace(wait)
                            break
                    frames.append(data)
                    if cmd & RS:
                        rs.append(sent)
                    head = (head + 1) % count
                    sent += 1
                    octets += length
        except DmaError as exc:
            error, why = T.QERR_DMA, exc
        if rs:  # whatever stopped the loop: DD in the sent RS descriptors, in one write
            try:
                self._write_back(fn.dma, base, count, start, descs, rs)
                report = True
            except DmaError as exc:
                error, why = T.QERR_DMA, exc
        bank.set(r.DH, head)
        if sent:
            counters = fn.counters
            counters["tx_batches"] += 1
            counters["tx_frames"] += sent
            self._count(T.GPTC, sent)
            self._count64(T.GOTCL, T.GOTCH, octets)
        if egress is not None and fn in egress.shares and not self.tx_backlogged():
            egress.leave(fn)  # nothing more for the uplink: its share goes to the others
        if nic is None:
            return sent
        with nic.one_interrupt():
            switch = nic.switch
            ports = switch.ports()
            for frame in frames:
                switch.forward(fn, frame, ports)
            if error:
                self.queue_error(T.TX, q, error, why)
            elif report:
                nic.raise_cause(fn, T.EICR_RTXQ(q))
        return sent

    def _write_back(self, dma: DmaController, base: int, count: int, start: int,
                    descs: bytes, rs: list[int]) -> None:
        """Report the sent descriptors ``rs`` (indices from slot ``start``) done: their
        status byte becomes DD (82599 7.2.3, the legacy write-back), written with the
        descriptors between them as they were read, all still the device's until TDH
        moves past them."""
        first, last = rs[0], rs[-1]
        span = bytearray(descs[first * D.DESC_SIZE:(last + 1) * D.DESC_SIZE])
        for i in rs:
            span[(i - first) * D.DESC_SIZE + D.STATUS_OFFSET] = D.STAT_DD
        self._write_descriptors(dma, base, count, (start + first) % count, bytes(span))

    def flush_tx(self) -> None:
        """Send what deferred TX doorbells (``tx_due``) asked for."""
        due, self.tx_due = self.tx_due, set()
        for q in sorted(due):
            self.transmit(q)

    def _pace(self, wait: float) -> None:
        """Come back to the TX queues in ``wait`` seconds (one timer at a time)."""
        fn = self.fn
        if fn.tx_kick_pending:
            return
        fn.tx_kick_pending = True
        timer = threading.Timer(wait, self._kick)
        timer.daemon = True
        timer.start()

    def _kick(self) -> None:
        fn = self.fn
        with fn.lock:
            fn.tx_kick_pending = False
            session = fn.session
            if session is not None and fn.dma.has_message_regions():
                session.endpoint.wake()  # DMA messages: only the serving thread may
                return
            self.resume_tx()

    def tx_backlogged(self) -> bool:
        """Whether an enabled TX queue still holds descriptors to send."""
        return self.fn.running and any(
            self.enabled(T.TX, q) and self._reg(T.TDH(q)) != self._reg(T.TDT(q))
            for q in range(T.NUM_QUEUES))

    def resume_tx(self) -> None:
        """Transmit what paced queues still hold."""
        for q in range(T.NUM_QUEUES):
            if self.enabled(T.TX, q) and self._reg(T.TDH(q)) != self._reg(T.TDT(q)):
                self.transmit(q)

    # -- receive --------------------------------------------------------------------------

    def receive(self, frame: bytes) -> None:
        """A frame for this function (from the switch). Inside a burst
        (Nic.one_interrupt) the frame waits for the burst's end and is delivered with
        the others (``flush``). DMA through messages may only be done by the thread
        serving the client: frames whose ring or buffer needs it wait for that thread
        (``_defer``); the others are delivered by whichever thread has them."""
        fn = self.fn
        if not fn.running or fn.session is None or not self.enabled(T.RX, 0):
            fn.count_drop()
            return
        nic = fn.nic
        if nic is not None and nic.in_burst:
            if not self.pending:
                nic.burst_rx.append(fn)
            self.pending.append(frame)
            return
        self._deliver([frame])

    def flush(self) -> tuple[int, int]:
        """Deliver the frames received during a burst, as one batch: (delivered,
        missed), as ``_deliver``."""
        if not self.pending:
            return 0, 0
        frames, self.pending = self.pending, []
        return self._deliver(frames)

    def _defer(self, frames: list[bytes]) -> None:
        """Queue frames for the serving thread (DMA through messages) and wake it."""
        fn = self.fn
        room = max(RX_BACKLOG - len(self.backlog), 0)
        self.backlog.extend(frames[:room])
        fn.counters["rx_backlog"] += min(room, len(frames))
        if len(frames) > room:
            fn.count_drop(n=len(frames) - room)
        if fn.session is not None:
            fn.session.endpoint.wake()

    def _direct(self, address: int, length: int) -> bool:
        """Whether [address, address+length) is reached without DMA messages (a bad
        address counts as direct: the DMA that follows reports it)."""
        try:
            r = self.fn.dma.find(address, length)
        except DmaError:
            return True
        return r.fd is not None or r.view is not None

    def drain_backlog(self) -> None:
        if self.backlog:
            frames = list(self.backlog)
            self.backlog.clear()
            self._deliver(frames)

    def _deliver(self, frames: list[bytes], q: int = 0) -> tuple[int, int]:
        """DMA ``frames`` into the posted RX descriptors [RDH, RDT) of queue q; returns
        how many were delivered and how many missed. Per batch: the descriptors are
        read in one DMA, and after every frame's data is written, their write-backs
        (DD) in one DMA, so the driver never sees DD before the data; then RDH, the
        statistics and the queue's interrupt once. Frames beyond the posted
        descriptors are missed (MPC).
        A lone frame (a ping) pays this per-batch work: it is kept to plain lookups."""
        fn = self.fn
        bank = fn.bank
        get = bank.get
        r = RING_REGS["RX"][q]
        if not fn.running or not get(r.XDCTL) & T.QCTL_ENABLE:
            fn.count_drop(n=len(frames))
            return 0, 0
        base, count = self._ring(r)
        dma = fn.dma
        # Off the serving thread, DMA messages are out of reach: frames go to the backlog
        # from the first one that needs them (and all of them while it is not empty).
        direct_only = dma.has_message_regions() and not fn.in_serving_thread()
        if direct_only and (self.backlog or not self._direct(base, count * D.DESC_SIZE)):
            self._defer(frames)
            return 0, 0
        head = get(r.DH)
        n = min(len(frames), (get(r.DT) - head) % count)
        done = good = octets = len_errors = 0
        deferred: list[bytes] = []
        why: DmaError | None = None
        if n:
            try:
                fn.check_dma()
                with dma.batch():
                    descs = self._read_descriptors(dma, base, count, head, n)
                    wb = bytearray(descs)  # written back whole: the address is kept
                    pack_into = D.RX_DESC.pack_into
                    pcse = get(T.RXCSUM) & T.RXCSUM_PCSE
                    try:
                        for (addr, _, _, _, _, _), frame in zip(D.RX_DESC.iter_unpack(descs),
                                                                frames[:n], strict=True):
                            length = len(frame)
                            if direct_only and not self._direct(addr, length):
                                deferred = frames[done:]
                                break
                            if length > D.RX_BUFFER_SIZE:
                                len_errors += 1
                                pack_into(wb, done * D.DESC_SIZE, addr, 0, 0, RX_DONE,
                                          D.RXERR_LEN, 0)
                            else:
                                dma.write(addr, frame)
                                pack_into(wb, done * D.DESC_SIZE, addr, length,
                                          D.packet_checksum(frame) if pcse else 0, RX_DONE,
                                          0, 0)
                                good += 1
                                octets += length
                            done += 1
                    finally:  # the frames whose data is in place: their descriptors
                        try:
                            if done:
                                self._write_descriptors(dma, base, count, head,
                                                        bytes(wb[:done * D.DESC_SIZE]))
                        except DmaError:
                            done = good = octets = len_errors = 0
                            raise
            except DmaError as exc:
                why = exc
        if done:
            bank.set(r.DH, (head + done) % count)
            counters = fn.counters
            counters["rx_batches"] += 1
            counters["rx_frames"] += done
        if len_errors:
            self._count(T.RXERRC, len_errors)
        if good:
            self._count(T.GPRC, good)
            self._count64(T.GORCL, T.GORCH, octets)
        if deferred:
            self._defer(deferred)
        # the faulting frame is not a miss, nor are frames left for the serving thread
        lost = len(frames) - done - len(deferred) - (why is not None)
        if lost:
            fn.count_drop(n=lost)
            fn.counters["rx_missed"] += lost
        if why is not None:
            self.queue_error(T.RX, q, T.QERR_DMA, why)
        elif done and fn.nic is not None:
            fn.nic.raise_cause(fn, T.EICR_RTXQ(q))
        return done, lost

    def _write_descriptors(self, dma: DmaController, base: int, count: int, head: int,
                           data: bytes) -> None:
        """Write descriptors from slot head on (one write, two if the ring wraps)."""
        first = min(len(data), (count - head) * D.DESC_SIZE)
        dma.write(base + head * D.DESC_SIZE, data[:first])
        if len(data) > first:
            dma.write(base, data[first:])
