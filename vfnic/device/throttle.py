"""Interrupt moderation: EITRn, the minimum interval between two interrupts of
MSI-X vector n (vfnic/regs/table.py has the register's semantics).

A vector whose interval has passed is signalled at once; one signalled less than
EITRn ago waits for the interval's end on this NIC's timer thread, which then
signals it only if a cause of the vector is still pending and enabled. Causes
raised meanwhile ride on that one interrupt: that is the moderation.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction

Key = tuple["PciFunction", int]  # (function, MSI-X vector)


class Throttle:
    """When each vector last interrupted, and the interrupts waiting for their
    interval to end. ``fire(fn, vector)`` is called from the timer thread without
    any lock held: it re-checks the causes under the NIC lock."""

    def __init__(self, fire: Callable[[PciFunction, int], None]) -> None:
        self._fire = fire
        self.last: dict[Key, float] = {}
        self._deferred: set[Key] = set()
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = 0  # heap tie-break: functions do not compare
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def allow(self, fn: PciFunction, vector: int, interval_us: int, now: float) -> bool:
        """Whether vector may interrupt now (and if so it counts as its last
        interrupt); if not, its interrupt is deferred to the interval's end."""
        key = (fn, vector)
        if interval_us:
            due = self.last.get(key, 0.0) + interval_us * 1e-6
            if now < due:
                self._defer(key, due)
                return False
        self.last[key] = now
        return True

    def waiting(self, fn: PciFunction, vector: int) -> bool:
        """Whether an interrupt of ``vector`` waits for its interval's end."""
        with self._cond:
            return (fn, vector) in self._deferred

    def _defer(self, key: Key, due: float) -> None:
        with self._cond:
            if key in self._deferred:
                return  # one interrupt at the interval's end covers every cause
            self._deferred.add(key)
            self._seq += 1
            heapq.heappush(self._heap, (due, self._seq, key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vfnic-eitr",
                                                daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    def _run(self) -> None:
        """Fire deferred interrupts when due; ends when none is left."""
        while True:
            with self._cond:
                while True:
                    if not self._heap:
                        self._thread = None
                        return
                    due = self._heap[0][0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        _, _, key = heapq.heappop(self._heap)
                        self._deferred.discard(key)
                        break
                    self._cond.wait(wait)
            self._fire(*key)
