"""The host's settings for one VF, as `ip link set PF vf N ...` gives them on real
SR-IOV NICs (iproute2's VF grammar): an administrative MAC, spoof checking,
trust, a port VLAN with priority, TX rate limits. They are the PF's state: kept
across VF resets, guest reboots and client reconnections, never carried by a
migration stream (the destination host's own settings apply).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# VF link state set by the host (`ip link set PF vf N state auto|enable|disable`)
LINK_AUTO, LINK_ENABLE, LINK_DISABLE = 0, 1, 2
LINK_STATE_NAMES = {LINK_AUTO: "auto", LINK_ENABLE: "enable", LINK_DISABLE: "disable"}

# How the VF's state is migrated (`vfnic link set DIR vf N migration ...`): the guest
# is told nothing (transparent) or the 2015 mailbox protocol runs (cooperative).
MIGRATION_TRANSPARENT, MIGRATION_COOPERATIVE = "transparent", "cooperative"
MIGRATION_MODES = (MIGRATION_TRANSPARENT, MIGRATION_COOPERATIVE)

MAX_VLAN = 4094
MAX_QOS = 7
MAX_RATE = 100_000  # Mbit/s
FULL_FRAME = 1518.0  # bytes: a bucket always holds at least two
# Credit a rate bucket may hold: 20 ms of its rate. Paced queues come back on a timer;
# a timer late by less than this loses the queue nothing (with 2 ms, a 13 Mbit/s
# max_tx_rate gave 5.4 Mbit/s when timers were 3.7 ms late: tests/test_egress.py).
BURST_S = 0.020


@dataclass
class TokenBucket:
    """TX pacing for max_tx_rate: bytes may leave at ``rate`` bytes/s with ``burst``
    bytes of credit."""

    rate: float = 0.0  # bytes/s, 0 = unlimited
    burst: float = 0.0
    tokens: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def configure(self, mbit: int, burst_s: float = BURST_S, now: float | None = None) -> None:
        self.rate = mbit * 1_000_000 / 8
        self.burst = max(self.rate * burst_s, 2 * FULL_FRAME)
        self.tokens = self.burst
        self.stamp = time.monotonic() if now is None else now

    def set_rate(self, rate: float, burst_s: float, now: float) -> None:
        """Change the rate (bytes/s) from ``now`` on; the credit earned so far is kept."""
        self.refill(now)
        self.rate = rate
        self.burst = max(rate * burst_s, 2 * FULL_FRAME)
        self.tokens = min(self.tokens, self.burst)

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def until(self, nbytes: int) -> float:
        """Seconds until ``nbytes`` of credit (after ``refill``); 0 if there is."""
        if self.tokens >= nbytes:
            return 0.0
        return (nbytes - self.tokens) / self.rate if self.rate else float("inf")

    def take(self, nbytes: int) -> float:
        """0 if ``nbytes`` may be sent now (and take them), else seconds to wait."""
        if not self.rate:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= nbytes:
            self.tokens -= nbytes
            return 0.0
        return (nbytes - self.tokens) / self.rate


@dataclass
class VfPolicy:
    mac: bytes | None = None  # set by the host: the VF may not change it unless trusted
    spoofchk: bool = True  # drop frames whose source MAC is not the VF's
    trust: bool = False  # may change its MAC, send and receive tagged frames
    vlan: int = 0  # port VLAN (0: none): tagged on the wire, untagged in the VF
    qos: int = 0  # 802.1p priority in the port VLAN's tag
    max_tx_rate: int = 0  # Mbit/s, 0 = unlimited (the VF's TX is paced)
    min_tx_rate: int = 0  # Mbit/s: guaranteed share of the uplink (vfnic.device.egress)
    # counters (host side, shown by `vfnic link show --json`)
    spoof_dropped: int = 0
    vlan_dropped: int = 0
    mac_refused: int = 0
    bucket: TokenBucket = field(default_factory=TokenBucket)  # max_tx_rate

    def tci(self) -> int:
        return self.qos << 13 | self.vlan
