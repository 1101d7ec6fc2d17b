"""The vfio migration protocol, device side (VFIO_USER_DEVICE_FEATURE).

State machine: the kernel's v2 FSM (linux/vfio.h, enum vfio_device_mig_state,
and vfio_mig_get_next_state() in drivers/vfio/vfio_main.c): the same arcs,
multi-step requests taken along the kernel's path, invalid requests refused
with EINVAL, ERROR reached only when an arc fails.

Data: VFIO_USER_MIG_DATA_READ/WRITE stream records (see ``stream``):
PRE_COPY yields a full snapshot while the device runs, STOP_COPY yields only
the bytes that changed since (or a full snapshot if no pre-copy happened).

Dirty logging: VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP/REPORT over the
pages the device wrote by DMA.
"""

from __future__ import annotations

import enum
import errno
import struct
from typing import TYPE_CHECKING

from vfnic.errors import DmaError, NotTtyError, ProtocolError, SnapshotError, VfnicError
from vfnic.savevm import snapshot, stream
from vfnic.vfiouser import wire

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction


class State(enum.IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class Feature(enum.IntEnum):
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2
SUPPORTED = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY

S = State
# vfio_from_fsm_table: NEXT[cur][new] is the next state on the way from cur to new.
NEXT: dict[State, dict[State, State]] = {
    S.STOP: {S.STOP: S.STOP, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.RUNNING_P2P,
             S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.RESUMING,
             S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.RUNNING: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.RUNNING_P2P,
                S.RESUMING: S.RUNNING_P2P, S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.PRE_COPY: {S.STOP: S.RUNNING, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
                 S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.PRE_COPY_P2P,
                 S.RESUMING: S.RUNNING, S.RUNNING_P2P: S.RUNNING, S.ERROR: S.ERROR},
    S.PRE_COPY_P2P: {S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.PRE_COPY,
                     S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP_COPY,
                     S.RESUMING: S.RUNNING_P2P, S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.STOP_COPY: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.ERROR,
                  S.PRE_COPY_P2P: S.ERROR, S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.STOP,
                  S.RUNNING_P2P: S.STOP, S.ERROR: S.ERROR},
    S.RESUMING: {S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.STOP, S.PRE_COPY_P2P: S.STOP,
                 S.STOP_COPY: S.STOP, S.RESUMING: S.RESUMING, S.RUNNING_P2P: S.STOP,
                 S.ERROR: S.ERROR},
    S.RUNNING_P2P: {S.STOP: S.STOP, S.RUNNING: S.RUNNING, S.PRE_COPY: S.RUNNING,
                    S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP, S.RESUMING: S.STOP,
                    S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR},
    S.ERROR: {s: S.ERROR for s in State},
}
# state_flags_table: the migration flags a state needs.
NEEDS = {
    S.STOP: MIGRATION_STOP_COPY, S.RUNNING: MIGRATION_STOP_COPY,
    S.PRE_COPY: MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
    S.PRE_COPY_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY,
    S.STOP_COPY: MIGRATION_STOP_COPY, S.RESUMING: MIGRATION_STOP_COPY,
    S.RUNNING_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P, S.ERROR: 0,
}
RUNNING_STATES = {S.RUNNING, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P}
SAVING_STATES = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}

MigState = struct.Struct("<II")  # struct vfio_device_feature_mig_state: device_state, data_fd
LogControl = struct.Struct("<QII")  # page_size, num_ranges, reserved
LogRange = struct.Struct("<QQ")  # iova, length
LogReport = struct.Struct("<QQQ")  # iova, length, page_size
MAX_LOG_RANGES = 1024


def path(cur: State, new: State, flags: int = SUPPORTED) -> list[State]:
    """The states a request from ``cur`` to ``new`` passes through (kernel rules);
    raises ProtocolError(EINVAL) where the kernel refuses."""
    if new not in NEEDS or NEEDS[new] & flags != NEEDS[new]:
        raise ProtocolError(f"migration state {int(new)} is not supported")
    steps: list[State] = []
    while cur != new:
        nxt = NEXT[cur][new]
        while NEEDS[nxt] & flags != NEEDS[nxt]:  # skip optional states not supported
            nxt = NEXT[nxt][new]
        if nxt == S.ERROR:
            raise ProtocolError(f"no arc from {cur.name} to {new.name}")
        steps.append(nxt)
        cur = nxt
    return steps


class Migration:
    """Migration state of one function."""

    def __init__(self, fn: PciFunction) -> None:
        self.fn = fn
        self.state = S.RUNNING
        self.out = b""  # bytes still to be read by MIG_DATA_READ
        self.precopy_base: bytes | None = None  # snapshot sent during PRE_COPY
        self.incoming = bytearray()  # bytes written by MIG_DATA_WRITE in RESUMING
        self.fail_next_arc = False  # test hook: make the next arc fail (-> ERROR)

    # -- feature dispatch -----------------------------------------------------------------

    def feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        index = flags & wire.VFIO_DEVICE_FEATURE_MASK
        get = bool(flags & wire.VFIO_DEVICE_FEATURE_GET)
        set_ = bool(flags & wire.VFIO_DEVICE_FEATURE_SET)
        probe = bool(flags & wire.VFIO_DEVICE_FEATURE_PROBE)
        if flags & ~(wire.VFIO_DEVICE_FEATURE_MASK | 0x7 << 16):
            raise ProtocolError(f"DEVICE_FEATURE flags {flags:#x}")
        if get and set_ and not probe:
            raise ProtocolError("DEVICE_FEATURE: GET and SET together")
        if not (get or set_ or probe):
            raise ProtocolError("DEVICE_FEATURE: none of GET, SET, PROBE")
        allowed = {
            Feature.MIGRATION: (True, False),
            Feature.MIG_DEVICE_STATE: (True, True),
            Feature.DMA_LOGGING_START: (False, True),
            Feature.DMA_LOGGING_STOP: (False, True),
            Feature.DMA_LOGGING_REPORT: (True, False),
        }
        if index not in allowed:
            raise NotTtyError(f"device feature {index}")
        can_get, can_set = allowed[Feature(index)]
        if (get and not can_get) or (set_ and not can_set):
            raise ProtocolError(f"feature {Feature(index).name} does not support that")
        if probe:
            return b""
        if index == Feature.MIGRATION:
            return struct.pack("<Q", SUPPORTED)
        if index == Feature.MIG_DEVICE_STATE:
            if get:
                return MigState.pack(self.state, 0)
            if len(data) < MigState.size:
                raise ProtocolError("MIG_DEVICE_STATE: short data")
            new, _fd = MigState.unpack_from(data)
            self.set_state(new)
            return MigState.pack(self.state, 0)
        if index == Feature.DMA_LOGGING_START:
            return self.logging_start(data)
        if index == Feature.DMA_LOGGING_STOP:
            self.logging_stop()
            return b""
        return self.logging_report(data, argsz)

    # -- state machine ---------------------------------------------------------------------

    def set_state(self, value: int) -> None:
        try:
            new = State(value)
        except ValueError:
            raise ProtocolError(f"unknown migration state {value}") from None
        for step in path(self.state, new):
            try:
                self._arc(self.state, step)
            except SnapshotError:
                self.incoming = bytearray()  # refused: device unchanged, still RESUMING
                raise
            except VfnicError as exc:
                self.state = S.ERROR
                self.fn.running = False
                raise ProtocolError(f"{self.state.name} arc failed: {exc}", errno.EIO) from exc
            self.state = step

    def _arc(self, cur: State, new: State) -> None:
        if self.fail_next_arc:
            self.fail_next_arc = False
            raise VfnicError("injected arc failure")
        fn = self.fn
        if new in RUNNING_STATES:
            fn.running = True
        if cur in RUNNING_STATES and new not in RUNNING_STATES:
            fn.running = False  # stop: no more DMA or interrupts
        if new == S.PRE_COPY and cur == S.RUNNING:
            self.precopy_base = snapshot.save(fn)
            self.out = stream.full_record(self.precopy_base)
        elif new == S.STOP_COPY:
            final = snapshot.save(fn)
            unread_precopy = bool(self.out) and cur == S.PRE_COPY_P2P
            if self.precopy_base is not None and not unread_precopy:
                self.out = stream.delta_record(self.precopy_base, final)
            else:
                self.out = stream.full_record(final)
            pages = self.device_pages()
            if pages:
                self.out += stream.pages_record(pages)
            self.out += stream.end_record(final)
        elif new == S.RESUMING:
            self.incoming = bytearray()
        elif cur == S.RESUMING and new == S.STOP:
            image, pages = stream.assemble(bytes(self.incoming))
            for iova, data in pages:  # every page must land, or nothing is applied
                try:
                    if not fn.dma.find(iova, len(data)).writable:
                        raise SnapshotError(f"page {iova:#x} is in a read-only DMA region")
                except DmaError as exc:
                    raise SnapshotError(f"migration stream: {exc}") from exc
            snapshot.restore(fn, image)  # checks everything before touching the device
            for iova, data in pages:  # DMA-written pages QEMU could not have seen
                fn.dma.write(iova, data)
            fn.running = False
            self.incoming = bytearray()
        if cur in SAVING_STATES and new not in SAVING_STATES:
            self.out = b""  # the data transfer session ends
            self.precopy_base = None

    def reset(self) -> None:
        """VFIO_USER_DEVICE_RESET: back to RUNNING, the only way out of ERROR."""
        self.state = S.RUNNING
        self.out = b""
        self.precopy_base = None
        self.incoming = bytearray()
        self.fn.running = True

    def device_pages(self) -> list[tuple[int, bytes]]:
        """Contents of every page the device wrote since dirty logging started."""
        dma = self.fn.dma
        if dma.dirty_log is None:
            return []
        out = []
        for page in sorted(dma.dirty_total):
            try:
                out.append((page * stream.PAGE_SIZE, dma.read(page * stream.PAGE_SIZE,
                                                              stream.PAGE_SIZE)))
            except VfnicError:
                continue  # unmapped since: nothing to carry
        return out

    # -- data --------------------------------------------------------------------------------

    def read(self, size: int) -> bytes:
        if self.state not in SAVING_STATES:
            raise ProtocolError(f"MIG_DATA_READ in state {self.state.name}")
        chunk, self.out = self.out[:size], self.out[size:]
        return chunk

    def write(self, data: bytes) -> None:
        if self.state != S.RESUMING:
            raise ProtocolError(f"MIG_DATA_WRITE in state {self.state.name}")
        if len(self.incoming) + len(data) > stream.MAX_STREAM:
            raise ProtocolError("migration stream too large", errno.EFBIG)
        self.incoming += data

    # -- DMA dirty page logging --------------------------------------------------------------

    def logging_start(self, data: bytes) -> bytes:
        if self.fn.dma.dirty_log is not None:
            raise ProtocolError("DMA logging already started", errno.EBUSY)
        if len(data) < LogControl.size:
            raise ProtocolError("DMA_LOGGING_START: short data")
        page_size, nranges, _ = LogControl.unpack_from(data)
        if page_size == 0 or page_size & (page_size - 1):
            raise ProtocolError(f"DMA logging page size {page_size} is not a power of two")
        if nranges > MAX_LOG_RANGES or len(data) < LogControl.size + nranges * LogRange.size:
            raise ProtocolError("DMA_LOGGING_START: bad number of ranges", errno.E2BIG)
        ranges = [LogRange.unpack_from(data, LogControl.size + i * LogRange.size)
                  for i in range(nranges)]
        for iova, length in ranges:
            if length == 0 or iova + length > 1 << 64:
                raise ProtocolError(f"bad DMA logging range {iova:#x}+{length:#x}")
        # We track 4 KiB pages whatever the hint; reports are built at any size.
        page_size = max(page_size, stream.PAGE_SIZE)
        self.fn.dma.dirty_log = set()
        self.fn.dma.dirty_total = set()
        return LogControl.pack(page_size, nranges, 0) + data[LogControl.size:]

    def logging_stop(self) -> None:
        if self.fn.dma.dirty_log is None:
            raise ProtocolError("DMA logging is not started")
        self.fn.dma.dirty_log = None

    def logging_report(self, data: bytes, argsz: int) -> bytes:
        log = self.fn.dma.dirty_log
        if log is None:
            raise ProtocolError("DMA logging is not started")
        if len(data) < LogReport.size:
            raise ProtocolError("DMA_LOGGING_REPORT: short data")
        iova, length, page_size = LogReport.unpack_from(data)
        if page_size == 0 or page_size & (page_size - 1) or length == 0:
            raise ProtocolError("DMA_LOGGING_REPORT: bad page size or length")
        if length % page_size or iova % page_size:
            raise ProtocolError("DMA_LOGGING_REPORT: range not aligned to the page size")
        npages = length // page_size
        words = (npages + 63) // 64
        if argsz < 8 + LogReport.size + 8 * words:
            raise ProtocolError("DMA_LOGGING_REPORT: argsz too small for the bitmap", errno.ENOSPC)
        bits = 0
        lps = stream.PAGE_SIZE
        for page in sorted(log):
            addr = page * lps
            if addr + lps <= iova or addr >= iova + length:
                continue
            first = max(addr, iova) - iova
            last = min(addr + lps, iova + length) - 1 - iova
            for i in range(first // page_size, last // page_size + 1):
                bits |= 1 << i
        # Reported pages are cleared (the kernel's semantics for REPORT).
        for page in [p for p in log if iova <= p * lps and (p + 1) * lps <= iova + length]:
            log.discard(page)
        bitmap = bits.to_bytes(8 * words, "little")
        return LogReport.pack(iova, length, page_size) + bitmap
