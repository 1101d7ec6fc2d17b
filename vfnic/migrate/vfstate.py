"""A VF's state as one blob for QEMU's own migration stream (the dbus-vmstate object).

QEMU calls a helper's Save after the source's vCPUs stopped and after its last RAM
pass, and Load on the destination before the migration completes. These functions
are what those calls do to the device, through the one vfio v2 state machine
(``migration.Migration``) and the one MIG_DATA stream format (``stream``):

  save       RUNNING -> STOP_COPY, the whole stream read out: the snapshot, the
             guest memory the VF wrote by DMA since dirty logging started (its bytes,
             read now), END
  load       RESUMING, the stream written, STOP: checked whole (CRCs, version,
             register layout, kind) before anything is applied, extents written
             into the destination's guest RAM
  run        back to RUNNING (the destination once restored; the source when QEMU
             resumes it after a failed or cancelled migration)

QEMU carries at most 1 MiB per helper (backends/dbus-vmstate.c): a larger state
is refused here, with the VF back to RUNNING, rather than lost by QEMU.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from vfnic.errors import SnapshotError, VfnicError
from vfnic.migrate.control import MigrationError
from vfnic.savevm import stream
from vfnic.savevm.migration import State

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction

LIMIT = 1 << 20  # DBUS_VMSTATE_SIZE_LIMIT: bytes QEMU carries per Id
PAGE_RECORD = stream.Extent.size + stream.PAGE_SIZE  # a whole DMA-written page, at most


class StateTooLarge(MigrationError):
    """The VF's state does not fit QEMU's per-helper limit."""

    errno = errno.EFBIG


def start_dirty_log(fn: PciFunction) -> None:
    """Record every page the VF writes by DMA from now on (the migration started)."""
    with fn.lock:
        if fn.dma.logging:  # a log left from an earlier migration: start afresh
            fn.dma.stop_logging()
        fn.dma.start_logging(stream.PAGE_SIZE, [])


def stop_dirty_log(fn: PciFunction) -> None:
    with fn.lock:
        if fn.dma.logging:
            fn.dma.stop_logging()


def _needs_messages(fn: PciFunction) -> bool:
    """Whether some dirty page can only be reached by DMA_READ/WRITE messages, which the
    client cannot answer while QEMU's main loop is blocked in Save or Load."""
    dma = fn.dma
    for page in dma.spans:
        try:
            if dma.find(page * stream.PAGE_SIZE, stream.PAGE_SIZE).fd is None:
                return True
        except VfnicError:
            continue
    return False


def save(fn: PciFunction, limit: int = LIMIT) -> bytes:
    """Stop the VF (STOP_COPY) and return its whole MIG_DATA stream. On any error the
    VF is back in RUNNING and the error is raised (QEMU then fails the migration and,
    with the return-path capability, resumes the source)."""
    with fn.lock:
        mig = fn.migration
        if mig.state not in (State.RUNNING, State.PRE_COPY):
            raise VfnicError(f"{fn.name} is in migration state {mig.state.name}, not RUNNING")
        if _needs_messages(fn):
            raise VfnicError(f"{fn.name}: guest RAM is not shared with vfnic (no fd in "
                             "DMA_MAP): start QEMU with a share=on memory backend")
        try:
            mig.set_state(State.STOP_COPY)
            data = mig.read(len(mig.out))
            if len(data) > limit:
                pages = len(fn.dma.spans)
                raise StateTooLarge(
                    f"{fn.name}: device state of {len(data)} bytes ({pages} DMA-written "
                    f"pages) exceeds QEMU's dbus-vmstate limit of {limit} bytes")
        except BaseException:
            run(fn)
            raise
        return data


def load(fn: PciFunction, data: bytes) -> None:
    """Restore a stream made by :func:`save` (its DMA extents written into guest RAM). A
    stream that is not complete and intact, or not of a function like ``fn``, is
    refused (SnapshotError) with the VF unchanged."""
    if len(data) > LIMIT:
        raise SnapshotError(f"device state of {len(data)} bytes exceeds {LIMIT}")
    with fn.lock:
        mig = fn.migration
        if mig.state not in (State.RUNNING, State.STOP):
            raise VfnicError(f"{fn.name} is in migration state {mig.state.name}")
        try:
            # Pages are written through vfnic's own mapping of guest RAM: QEMU cannot
            # answer a DMA_WRITE message while Load blocks its main loop.
            if any(r.writable and r.fd is None for r in fn.dma.regions):
                raise VfnicError(f"{fn.name}: guest RAM is not shared with vfnic (DMA_MAP "
                                 "without fd): start QEMU with a share=on memory backend")
            mig.set_state(State.RESUMING)
            mig.write(data)
            # The whole stream is checked (records, CRCs, END, snapshot) before the
            # snapshot is restored and the extents are written.
            mig.set_state(State.STOP)
        except BaseException:
            if mig.state != State.RUNNING:
                mig.reset()  # nothing was applied: the VF as it was, running
            raise


def run(fn: PciFunction) -> None:
    """Bring the VF to RUNNING from wherever a migration left it."""
    with fn.lock:
        mig = fn.migration
        if mig.state == State.RUNNING:
            return
        try:
            mig.set_state(State.RUNNING)
        except VfnicError:
            mig.reset()


def extents_in(data: bytes) -> list[tuple[int, bytes]]:
    """The DMA-written extents a stream carries (none if it is not a whole stream)."""
    try:
        return stream.assemble(data)[1]
    except VfnicError:
        return []


def pages_of(extents: list[tuple[int, bytes]]) -> int:
    """How many guest pages DMA-written extents touch (each lies within one page)."""
    return len({iova // stream.PAGE_SIZE for iova, _ in extents})


def pages_in(data: bytes) -> int:
    """How many guest pages the DMA-written extents of a stream touch."""
    return pages_of(extents_in(data))


def max_pages(snapshot_bytes: int, limit: int = LIMIT) -> int:
    """The most DMA-written pages a state can carry next to a snapshot of that size,
    were every byte of them written by the device (the worst case)."""
    overhead = 3 * (stream.Header.size + 4) + 4
    return max(0, (limit - snapshot_bytes - overhead) // PAGE_RECORD)
