"""The uplink port's egress scheduler: min_tx_rate and max_tx_rate as SR-IOV NICs
give them (ice's VF bandwidth, mlx5's vport QoS) once the port has a line rate
(`vfnic serve --link-speed MBPS`).

When the functions' offered load to the uplink exceeds the line rate, each
backlogged function gets at least its min_tx_rate, the rest of the line is
shared fairly (max-min: every backlogged function gets the same rate unless its
floor is higher or its max_tx_rate lower), and a share a function leaves unused
goes to whoever has frames waiting (work-conserving). A frame that must wait
stays on its TX ring (the descriptor remains the device's, 82599 7.2.1.2), so
the scheduler drops nothing. Frames one function sends to another are switched
inside the NIC and are not scheduled (only max_tx_rate paces them).

How: the port is a token bucket at the line rate. Each backlogged function has a
share bucket refilled at its allocated rate (water-filling over the backlogged
set, redone when a function starts or stops having frames for the uplink). A
frame leaves if the function's share bucket holds it (the port bucket is charged
too and may go into debt: the floors sum to at most the line rate), or else if
the port bucket has credit left (what others did not use); and in both cases
only if the function's max_tx_rate bucket holds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vfnic.device.policy import BURST_S, MAX_RATE, TokenBucket
from vfnic.errors import PolicyError, UsageError

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction

PRUNE_S = 0.1  # how often members that stopped having frames are looked for


def mbit(rate: int) -> float:
    """Mbit/s -> bytes/s."""
    return rate * 1_000_000 / 8


def allocate(capacity: float, flows: list[tuple[float, float]]) -> list[float]:
    """Max-min fair shares of ``capacity`` with floors and caps: ``flows`` is
    (floor, cap) per flow, floor <= cap, sum of floors <= capacity. Each flow gets
    clamp(level, floor, cap) for the level that uses the whole capacity (every
    flow its cap if the caps sum to less)."""
    if sum(c for _, c in flows) <= capacity:
        return [c for _, c in flows]

    def used(level: float) -> float:
        return sum(min(max(level, f), c) for f, c in flows)

    # used() is piecewise linear and nondecreasing, with its bends at floors and caps
    prev, at_prev = 0.0, used(0.0)
    level = 0.0
    if at_prev < capacity:
        for point in sorted({x for fc in flows for x in fc}):
            at = used(point)
            if at >= capacity:
                level = prev + (capacity - at_prev) / (at - at_prev) * (point - prev)
                break
            prev, at_prev = point, at
    return [min(max(level, f), c) for f, c in flows]


class EgressScheduler:
    """One per NIC; every method runs under the NIC lock."""

    def __init__(self, link_speed: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.link_speed = 0  # Mbit/s; 0: no line rate, nothing is scheduled
        self.rate = 0.0  # bytes/s
        self.port = TokenBucket()
        self.shares: dict[PciFunction, TokenBucket] = {}  # the backlogged functions
        # Every function's share bucket, kept when it leaves the backlogged set (it
        # goes on earning at its last rate, up to its burst): leaving and coming back
        # gives no fresh credit.
        self._buckets: dict[PciFunction, TokenBucket] = {}
        self.allocated: dict[PciFunction, float] = {}  # their rates, bytes/s
        self.borrowed = 0  # frames sent on credit other functions left unused
        self._pruned = 0.0
        self.configure(link_speed)

    def configure(self, link_speed: int) -> None:
        """Set the port's line rate (Mbit/s, 0: unlimited)."""
        if isinstance(link_speed, bool) or not 0 <= link_speed <= MAX_RATE:
            raise UsageError(f"link speed must be between 0 (unlimited) and {MAX_RATE} "
                             "Mbit/s")
        self.link_speed = link_speed
        self.rate = mbit(link_speed)
        self.port.configure(link_speed, BURST_S, self.clock())
        self.shares.clear()
        self.allocated.clear()
        self._buckets.clear()

    def check_min_rates(self, total: int) -> None:
        """Refuse min rates (Mbit/s, summed over the VFs) the line cannot give."""
        if self.link_speed and total > self.link_speed:
            raise PolicyError(f"min_tx_rate: the VFs' minimum rates would sum to {total} "
                              f"Mbit/s, more than the link speed ({self.link_speed} Mbit/s)")

    # -- the backlogged set ---------------------------------------------------------

    def reallocate(self) -> None:
        """Share the line among the backlogged functions (after a join or leave, or
        a change of their rates)."""
        now = self.clock()
        members = list(self.shares)
        flows = []
        for fn in members:
            pol = fn.policy
            cap = min(mbit(pol.max_tx_rate), self.rate) if pol.max_tx_rate else self.rate
            flows.append((min(mbit(pol.min_tx_rate), cap), cap))
        for fn, rate in zip(members, allocate(self.rate, flows), strict=True):
            self.shares[fn].set_rate(rate, BURST_S, now)
            self.allocated[fn] = rate

    def join(self, fn: PciFunction) -> TokenBucket:
        bucket = self._buckets.get(fn)
        if bucket is None:  # full credit at first: a function's first frames go at once
            bucket = self._buckets[fn] = TokenBucket()
            bucket.configure(0, BURST_S, self.clock())
        self.shares[fn] = bucket
        self.reallocate()
        return bucket

    def leave(self, fn: PciFunction) -> None:
        """``fn`` has no frames waiting for the uplink any more."""
        if self.shares.pop(fn, None) is not None:
            self.allocated.pop(fn, None)
            self.reallocate()

    def _prune(self, now: float) -> None:
        """Forget members whose frames went away without a transmit noticing (a
        reset, a disabled queue, a client gone): their share goes back to the others."""
        self._pruned = now
        gone = [fn for fn in self.shares if not fn.datapath.tx_backlogged()]
        for fn in gone:
            del self.shares[fn]
            self.allocated.pop(fn, None)
        if gone:
            self.reallocate()

    # -- the decision, per frame ----------------------------------------------------

    def take(self, fn: PciFunction, nbytes: int, uplink: bool) -> float:
        """0 if ``fn`` may send a frame of ``nbytes`` now (its credit is charged),
        else the seconds to wait before asking again. ``uplink``: the switch sends
        the frame out of the port; frames switched inside the NIC see only the
        function's max_tx_rate."""
        cap = fn.policy.bucket
        if not uplink:
            return cap.take(nbytes)
        now = self.clock()
        if now - self._pruned > PRUNE_S:
            self._prune(now)
        if cap.rate:
            cap.refill(now)
            wait = cap.until(nbytes)
            if wait:
                return wait
        share = self.shares.get(fn)
        if share is None:
            share = self.join(fn)
        port = self.port
        port.refill(now)
        share.refill(now)
        if share.tokens >= nbytes:  # within its allocation
            share.tokens -= nbytes
        elif port.tokens >= nbytes:  # the line has credit others left unused
            self.borrowed += 1
        else:
            return min(share.until(nbytes), port.until(nbytes))
        port.tokens -= nbytes
        if cap.rate:
            cap.tokens -= nbytes
        return 0.0
