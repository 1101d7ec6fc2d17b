"""The vfio migration protocol, device side (VFIO_USER_DEVICE_FEATURE).

State machine: the kernel's v2 FSM (linux/vfio.h, enum vfio_device_mig_state,
and vfio_mig_get_next_state() in drivers/vfio/vfio_main.c): the same arcs,
multi-step requests taken along the kernel's path, invalid requests refused
with EINVAL, ERROR reached only when an arc fails.

Data: VFIO_USER_MIG_DATA_READ/WRITE stream records (see ``stream``):
PRE_COPY yields a full snapshot while the device runs, STOP_COPY yields only
the bytes that changed since (or a full snapshot if no pre-copy happened).

DMA dirty logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_START/STOP/REPORT) is
parsed here and done by the DMA controller (vfnic.dma.controller).

Like libvfio-user's migration.c, the state machine owns the arcs and the data
stream and reaches the device only through a small protocol, ``Device``: save
its state, load a state, stop or start it, and the memory it wrote by DMA. The
snapshot layout is the device's own (vfnic.device.snapshot).
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import Protocol

from vfnic.dma.controller import DmaController
from vfnic.errors import NotTtyError, ProtocolError, SnapshotError, VfnicError
from vfnic.savevm import stream
from vfnic.vfiouser import wire
from vfnic.vfiouser.features import (
    MAX_BITMAP,
    MAX_LOG_RANGES,
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    Feature,
    LogControl,
    LogRange,
    LogReport,
    MigState,
    State,
)

__all__ = ["Device", "Feature", "Migration", "State", "path"]


log = logging.getLogger(__name__)

SUPPORTED = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY


class Device(Protocol):
    """What the state machine needs from a device (libvfio-user's migration
    callbacks: transition, read_data, write_data)."""

    def save_state(self) -> bytes:
        """A snapshot of everything the guest can observe."""
        ...

    def load_state(self, image: bytes, extents: list[tuple[int, bytes]]) -> None:
        """Restore ``image`` and write ``extents`` (iova, bytes) to guest memory.
        Raises SnapshotError, with the device unchanged, if ``image`` is refused."""
        ...

    def set_running(self, running: bool) -> None:
        """Start or stop the device: no DMA and no interrupts while stopped."""
        ...

    def dma_extents(self) -> list[tuple[int, bytes]]:
        """(iova, current bytes) of the guest memory the device wrote by DMA since dirty
        logging began, as extents within one page each."""
        ...


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
    """Migration state of one device: the FSM, the data stream and the device
    features (VFIO_USER_DEVICE_FEATURE) of the function that owns it."""

    def __init__(self, device: Device, dma: DmaController | None = None) -> None:
        self.device = device
        # The function's DMA controller, which does the DMA_LOGGING_* features (a device
        # without one gets an empty controller: logging on, nothing ever written).
        self.dma = dma if dma is not None else DmaController()
        self.state = S.RUNNING
        self.out = b""  # bytes still to be read by MIG_DATA_READ
        self.precopy_base: bytes | None = None  # snapshot sent during PRE_COPY
        self.incoming = bytearray()  # bytes written by MIG_DATA_WRITE in RESUMING

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
            self.dma.stop_logging()
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
            except SnapshotError as exc:
                self.incoming = bytearray()  # refused: device unchanged, still RESUMING
                log.warning("migration state refused: %s", exc)
                raise
            except VfnicError as exc:
                self.state = S.ERROR
                self.device.set_running(False)
                raise ProtocolError(f"{self.state.name} arc failed: {exc}", errno.EIO) from exc
            self.state = step

    def _arc(self, cur: State, new: State) -> None:
        dev = self.device
        if (new in RUNNING_STATES) != (cur in RUNNING_STATES):
            dev.set_running(new in RUNNING_STATES)  # stopped: no more DMA or interrupts
        if new == S.PRE_COPY and cur == S.RUNNING:
            self.precopy_base = dev.save_state()
            self.out = stream.full_record(self.precopy_base)
        elif new == S.STOP_COPY:
            final = dev.save_state()
            unread_precopy = bool(self.out) and cur == S.PRE_COPY_P2P
            if self.precopy_base is not None and not unread_precopy:
                self.out = stream.delta_record(self.precopy_base, final)
            else:
                self.out = stream.full_record(final)
            extents = dev.dma_extents()
            if extents:
                self.out += stream.extents_record(extents)
            self.out += stream.end_record(final)
        elif new == S.RESUMING:
            self.incoming = bytearray()
        elif cur == S.RESUMING and new == S.STOP:
            image, extents = stream.assemble(bytes(self.incoming))
            dev.load_state(image, extents)  # checks everything before touching the device
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
        self.device.set_running(True)

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
        if len(data) < LogControl.size:
            raise ProtocolError("DMA_LOGGING_START: short data")
        page_size, nranges, _ = LogControl.unpack_from(data)
        if nranges > MAX_LOG_RANGES or len(data) < LogControl.size + nranges * LogRange.size:
            raise ProtocolError("DMA_LOGGING_START: bad number of ranges", errno.E2BIG)
        ranges = [LogRange.unpack_from(data, LogControl.size + i * LogRange.size)
                  for i in range(nranges)]
        page_size = self.dma.start_logging(page_size, ranges)
        return LogControl.pack(page_size, nranges, 0) + data[LogControl.size:]

    def logging_report(self, data: bytes, argsz: int) -> bytes:
        if not self.dma.logging:
            raise ProtocolError("DMA logging is not started")
        if len(data) < LogReport.size:
            raise ProtocolError("DMA_LOGGING_REPORT: short data")
        iova, length, page_size = LogReport.unpack_from(data)
        size = self.dma.bitmap_size(iova, length, page_size)
        if size > MAX_BITMAP:
            log.warning("DMA_LOGGING_REPORT of a %d-byte bitmap refused", size)
            raise ProtocolError(f"DMA_LOGGING_REPORT: bitmap of {size} bytes exceeds "
                                f"the advertised max_bitmap_size {MAX_BITMAP}", errno.E2BIG)
        if argsz < 8 + LogReport.size + size:
            raise ProtocolError("DMA_LOGGING_REPORT: argsz too small for the bitmap",
                                errno.ENOSPC)
        return LogReport.pack(iova, length, page_size) + self.dma.report(iova, length,
                                                                         page_size)
