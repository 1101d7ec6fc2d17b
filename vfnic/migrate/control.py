"""The one migration control path: waiting for QEMU's migration status, and the
host's part of the 2015 cooperative protocol on the source.

Used by the NIC's VM follower (vfnic.migrate.vmstate), which runs for every
migration of a QEMU with a vfnic VF, whoever started it: `vfnic migrate`, `virsh
migrate`, the demo and the bench all reach the VF through it.

Cooperative sequence (source, per VF whose mode is cooperative):
  start     downtime-limit 0 (QEMU converges only if nothing is dirty), the
            driver told `migrate` through the PF mailbox (it starts dirtying the
            pages the VF writes)
  suspend   near the end of the first RAM pass (:func:`wait_suspend_point`, 1/32 of
            RAM left), QEMU's pass going on at its own rate while the driver, told
            `suspend`, acknowledges (it stops its queues and keeps its state);
            if QEMU switches over first (:class:`SuspendOvertaken`) the VF's state
            goes as in transparent mode
  release   once QEMU's first RAM pass is over (:func:`wait_first_pass`), downtime-limit
            back: QEMU converges, stops the vCPUs, saves the VF
  rollback  on failure: `resume` (suspended) or `cancelmigration` (not yet)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qemu.qmp import EventListener, QMPClient

from vfnic.errors import OperatorError, VfnicError
from vfnic.host.qmp import (
    MigrationInfo,
    StatusInfo,
    query_migrate,
    query_migrate_parameters,
    query_status,
)

TERMINAL = ("completed", "failed", "cancelled")

# (state, extra words) -> the mailbox acknowledgement (NicServer.migration_command)
MailboxCommand = Callable[[str, list[int]], Awaitable[dict[str, Any]]]


class MigrationError(OperatorError):
    """The migration failed (the source VM keeps running)."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled on request."""


class SuspendOvertaken(MigrationError):
    """QEMU switched over before the VF driver acknowledged SUSPEND: with downtime-limit
    0 it still does when a dirty-bitmap sync finds nothing to send. The VF's state is
    saved at the stop all the same (as in transparent mode); the SUSPEND left in the
    mailbox is overwritten by the destination's RESUME."""


def raise_if_failed(info: MigrationInfo) -> str:
    """QEMU's migration status; MigrationError if it failed or was cancelled."""
    st = str(info.get("status", "none"))
    if st in ("failed", "cancelled"):
        raise MigrationError(f"QEMU migration {st}: {info.get('error-desc', '')}".strip())
    return st


async def next_status(qmp: QMPClient, events: EventListener, wait: float) -> str:
    """The status of the next MIGRATION event, or, if none comes within ``wait``
    seconds, the one query-migrate reports."""
    try:
        event: dict[str, Any] = dict(await asyncio.wait_for(events.get(), wait))
        return str(event.get("data", {}).get("status", ""))
    except TimeoutError:
        return str((await query_migrate(qmp)).get("status", "none"))


async def wait_status(qmp: QMPClient, events: EventListener, want: set[str], timeout: float,
                      progress: Callable[[MigrationInfo], None] | None = None
                      ) -> MigrationInfo:
    """Wait until QEMU's migration status is one of ``want`` (woken by MIGRATION events,
    polled every 100 ms); MigrationError if it failed or was cancelled instead."""
    deadline = time.monotonic() + timeout
    while True:
        info = await query_migrate(qmp)
        if info.get("status", "none") in want:
            return info
        raise_if_failed(info)
        if progress is not None:
            progress(info)
        if time.monotonic() > deadline:
            raise MigrationError(f"migration did not reach {sorted(want)} in {timeout:g} s")
        with contextlib.suppress(TimeoutError):
            while True:
                event: dict[str, Any] = dict(await asyncio.wait_for(events.get(), 0.1))
                if event.get("data", {}).get("status") in want | {"failed", "cancelled"}:
                    break


async def wait_runstate(qmp: QMPClient, until: Callable[[StatusInfo], bool],
                        timeout: float | None, wake: EventListener | None = None,
                        poll: float = 0.005) -> StatusInfo:
    """The first query-status for which ``until`` holds, asked every ``poll`` seconds or
    as soon as an event of ``wake`` comes; TimeoutError after ``timeout`` (None: none)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = await query_status(qmp)
        if until(st):
            return st
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"QEMU still {st.get('status')} after {timeout:g} s")
        if wake is None:
            await asyncio.sleep(poll)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.get(), poll)


async def wait_end(qmp: QMPClient, events: EventListener) -> str:
    """The migration's final status, or what :func:`ended_as` says if the QEMU went
    away first (libvirt ends the source right after a migration)."""
    last = "active"
    while last not in TERMINAL:
        try:
            last = await next_status(qmp, events, 0.05)
        except Exception:
            if events.empty():
                return ended_as(events, last)
    return last


def ended_as(events: EventListener, last: str = "active") -> str:
    """The final status of a migration whose QEMU is gone: the last MIGRATION event it
    sent if that was final, else "source-gone after <last status seen>"."""
    if events.history:
        event: dict[str, Any] = dict(events.history[-1])
        last = str(event.get("data", {}).get("status", last))
    return last if last in TERMINAL else f"source-gone after {last}"


async def wait_suspend_point(qmp: QMPClient, timeout: float) -> MigrationInfo | None:
    """Wait until most of the first RAM pass is sent (1/32 of RAM left, or pass 2
    begun), the moment to suspend the VF driver; with downtime-limit 0 QEMU cannot
    switch over before, unless a sync finds nothing dirty. The pass should not end
    before the driver acknowledges: then QEMU syncs its dirty bitmap pass after pass
    and the guest's MMIO crawls. Nothing holds the pass meanwhile: QEMU's rate limit
    hardly slows zero pages, and a max-bandwidth under 10 B/s turns it off (it is
    counted per 100 ms: 1/10 rounds to 0, its "no limit"). Returns the query-migrate
    that found the point; None if QEMU reached switchover anyway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await query_migrate(qmp)
        if raise_if_failed(info) in ("pre-switchover", "device", "completed"):
            return None
        ram = info.get("ram", {})
        total = ram.get("total", 0) or 1
        left = ram.get("remaining", total)
        if ram.get("dirty-sync-count", 0) >= 2 or left <= total // 32:
            return info
        # asked back to back over the last eighth: the window is a few ms wide here
        await asyncio.sleep(0.01 if left > total // 8 else 0)
    raise MigrationError("RAM pre-copy did not progress")


async def wait_first_pass(qmp: QMPClient, timeout: float) -> int:
    """Wait until QEMU's first RAM pass is over (its second dirty-bitmap sync): with
    downtime-limit 0 it cannot switch over before, and once the limit is back the
    final pass carries only what the guest dirtied since, not the rest of pass 1.
    Returns the dirty-sync-count seen last (below 2: the migration ended first)."""
    deadline = time.monotonic() + timeout
    syncs = 0
    while time.monotonic() < deadline:
        info = await query_migrate(qmp)
        syncs = info.get("ram", {}).get("dirty-sync-count", syncs)
        if info.get("status") != "active" or syncs >= 2:
            break
        await asyncio.sleep(0.005)
    return syncs


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a background step's exception as seen (it is reported another way)."""
    if not task.cancelled():
        task.exception()


class CooperativeSource:
    """The host's side of the 2015 protocol for one VF on the source."""

    def __init__(self, qmp: QMPClient, command: MailboxCommand,
                 precopy_timeout: float = 600.0) -> None:
        self.qmp = qmp
        self.command = command
        self.precopy_timeout = precopy_timeout
        self.limit: int | None = None
        self.migrating = False
        self.suspended = False
        self.suspend_ack: dict[str, Any] = {}
        self.released_sync: int | None = None  # QEMU's dirty-sync-count at the release
        self.released_at: float | None = None  # perf_counter when the limit was sent
        self.point: dict[str, Any] = {}  # QEMU's RAM pass at the suspend point

    async def start(self) -> None:
        params = await query_migrate_parameters(self.qmp)
        self.limit = int(params.get("downtime-limit", 300))
        await self.qmp.execute("migrate-set-parameters", {"downtime-limit": 0})
        await self.command("migrate", [])
        self.migrating = True

    async def suspend(self) -> dict[str, Any]:
        point = await wait_suspend_point(self.qmp, self.precopy_timeout)
        if point is None:
            raise MigrationError("the guest stopped before its VF driver could suspend")
        ram = point.get("ram", {})  # where pass 1 was (sync 2 and up: over, window missed)
        self.point = {"syncs": ram.get("dirty-sync-count", 0),
                      "left_pct": round(100 * ram.get("remaining", 0) / (ram.get("total") or 1),
                                        2)}
        self.suspended = True  # before the ack: a late acknowledgement still suspended it
        ack = asyncio.ensure_future(self.command("suspend", []))
        ack.add_done_callback(_retrieved)  # its failure is seen even if not awaited
        if not await self._acknowledged(ack):
            raise SuspendOvertaken("QEMU stopped the guest before its VF driver "
                                   "acknowledged the suspend")
        self.suspend_ack = await ack
        return self.suspend_ack

    async def _acknowledged(self, ack: asyncio.Future[dict[str, Any]]) -> bool:
        """Wait for the acknowledgement while QEMU's migration is still in pre-copy;
        False once QEMU left it first (a stopped guest acknowledges nothing)."""
        while not ack.done():
            if raise_if_failed(await query_migrate(self.qmp)) not in ("setup", "active"):
                return ack.done()
            await asyncio.wait((ack,), timeout=0.005)
        return True

    async def release(self) -> None:
        """Undo start(): downtime-limit back, once pass 1 is over if the driver was told
        to suspend."""
        if self.limit is None:
            return
        with contextlib.suppress(Exception):
            if self.suspended:
                self.released_sync = await wait_first_pass(self.qmp, self.precopy_timeout)
            self.released_at = time.perf_counter()
            await self.qmp.execute("migrate-set-parameters", {"downtime-limit": self.limit})

    async def rollback(self) -> None:
        """The migration failed: the driver goes on where it is."""
        with contextlib.suppress(VfnicError):
            if self.suspended:
                await self.command("resume", [])
            elif self.migrating:
                await self.command("cancelmigration", [])
        self.suspended = self.migrating = False
