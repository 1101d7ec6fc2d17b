"""Follow the migrations someone else drives (libvirt's `virsh migrate`).

QEMU tells a vfio-user server nothing about a migration and carries no state for it,
so a NIC learns of one from the QEMU itself: the domain gives QEMU a second QMP
monitor, DIR/vfN.qmp next to DIR/vfN.sock (vfnic/libvirt/domain.py does), and the
NIC server follows it. QMP broadcasts MIGRATION events to every monitor, so this
works beside libvirt's own monitor without taking anything from it.

On the source the follower plays the host's part of the 2015 protocol through the
PF mailbox: `migrate` when QEMU starts sending RAM (the driver starts dirtying the
pages the VF writes), `suspend` near the end of the first RAM pass while QEMU is
held from converging (downtime-limit 0, put back right after), `resume` on the same
VF if the migration fails. A guest whose driver does not answer is not migrated
(the VF's state would be lost): the follower cancels the migration, and virsh
reports it. On the destination there is nothing to do: the suspended driver finds
a VF in reset state under it and takes it over (VfDriver.reattach).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qemu.qmp import EventListener, QMPClient, Runstate

from vfnic.errors import VfnicError
from vfnic.host.qmp import query_migrate, query_migrate_parameters, query_status
from vfnic.migrate.orchestrator import MigrationError, wait_suspend_point

if TYPE_CHECKING:
    from vfnic.device.nic import NicServer

log = logging.getLogger("vfnic.follow")

SCAN_INTERVAL = 0.2  # how often the NIC folder is looked at for new QMP sockets
POLL_INTERVAL = 0.25  # query-migrate this often when no MIGRATION event comes
MAILBOX_TIMEOUT = 5.0
PRECOPY_TIMEOUT = 600.0
TERMINAL = ("completed", "failed", "cancelled")


async def _next_status(qmp: QMPClient, events: EventListener, wait: float) -> str:
    """The migration status of the next MIGRATION event (libvirt turns the "events"
    capability on), or, if none comes within ``wait`` seconds, of query-migrate."""
    try:
        event: dict[str, Any] = dict(await asyncio.wait_for(events.get(), wait))
        return str(event.get("data", {}).get("status", ""))
    except TimeoutError:
        info = await query_migrate(qmp)
        return str(info.get("status", "none"))


class Follower:
    """One thread with an asyncio loop: a QMP connection per VF whose DIR/vfN.qmp
    exists, and the source side of each migration seen on it."""

    def __init__(self, server: NicServer) -> None:
        self.server = server
        self.history: list[dict[str, Any]] = []  # one record per migration, newest last
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake: asyncio.Event | None = None  # set from stop() to end the scan's sleep
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="vfnic-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread (closing its QMP connections) and wait for it."""
        self._stop.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(wake.set)
        if self._thread.is_alive():
            self._thread.join(SCAN_INTERVAL + 5)

    def records(self, settle: float = 0.0) -> list[dict[str, Any]]:
        """The migrations seen so far; with ``settle``, first wait up to that many
        seconds for the newest one to have its result (virsh returns as soon as the
        destination runs; the source side may still be winding down)."""
        deadline = time.monotonic() + settle
        while True:
            with self._lock:
                done = not self.history or "result" in self.history[-1]
                if done or time.monotonic() >= deadline:
                    return [dict(r) for r in self.history]
            time.sleep(0.02)

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        tasks: dict[int, asyncio.Task[None]] = {}
        while not self._stop.is_set():
            for vf in range(len(self.server.nic.vfs)):
                path = self.server.dir / f"vf{vf}.qmp"
                task = tasks.get(vf)
                if (task is None or task.done()) and path.is_socket():
                    tasks[vf] = asyncio.create_task(self._follow(vf, path))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SCAN_INTERVAL)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _follow(self, vf: int, path: Path) -> None:
        qmp = QMPClient(f"vfnic-vf{vf}")
        try:
            await asyncio.wait_for(qmp.connect(str(path)), 2.0)
        except Exception:
            await asyncio.sleep(1.0)  # a stale socket (its QEMU is gone): look again later
            return
        log.info("vf %d: following the QEMU at %s", vf, path)
        events = EventListener("MIGRATION")
        qmp.register_listener(events)
        try:
            while qmp.runstate == Runstate.RUNNING:
                if await _next_status(qmp, events, POLL_INTERVAL) not in ("setup", "active"):
                    continue
                run = await query_status(qmp)
                if run.get("status") == "inmigrate":
                    continue  # the destination: the driver takes the fresh VF over
                await self._source(vf, qmp, events)
                events.clear()  # the rest of that migration's events
        except Exception as exc:  # the QEMU went away (libvirt ends the source)
            log.debug("vf %d: stopped following %s: %s", vf, path, exc)
        finally:
            qmp.remove_listener(events)
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    # -- the source side of one migration ------------------------------------------------

    async def _command(self, vf: int, state: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.server.migration_command, vf, state,
                                       MAILBOX_TIMEOUT)

    async def _source(self, vf: int, qmp: QMPClient, events: EventListener) -> None:
        info = await query_migrate(qmp)
        if info.get("status") not in ("setup", "active"):
            return  # events of a migration that is already over
        t0 = time.perf_counter()
        record: dict[str, Any] = {"vf": vf, "role": "source", "started": time.time()}
        with self._lock:
            self.history.append(record)
        params = await query_migrate_parameters(qmp)
        limit = int(params.get("downtime-limit", 300))
        suspended = migrating = False
        try:
            await qmp.execute("migrate-set-parameters", {"downtime-limit": 0})
            await self._command(vf, "migrate")
            migrating = True
            if not await wait_suspend_point(qmp, PRECOPY_TIMEOUT):
                raise MigrationError("the guest stopped before its VF driver could suspend")
            suspended = True  # before: a late acknowledgement still means suspended
            ack = await self._command(vf, "suspend")
            record["suspend_mailbox_ms"] = ack.get("mailbox_ms")
            record["suspend_driver_us"] = ack.get("driver_us")
            record["suspended_at_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            log.info("vf %d: VF driver suspended (%s ms); the migration may complete", vf,
                     ack.get("mailbox_ms"))
        except Exception as exc:  # MailboxTimeout, MigrationError, QMP errors
            record["error"] = str(exc)
            log.warning("vf %d: %s: cancelling the migration (the VF's state would be lost)",
                        vf, exc)
            with contextlib.suppress(Exception):
                await qmp.execute("migrate_cancel")
        finally:
            with contextlib.suppress(Exception):
                await qmp.execute("migrate-set-parameters", {"downtime-limit": limit})
        result = await self._wait_end(qmp, events)
        record["result"] = result
        record["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        if result not in ("failed", "cancelled"):
            log.info("vf %d: migrated away", vf)
            return
        log.warning("vf %d: migration %s: the guest stays here", vf, result)
        with contextlib.suppress(VfnicError):
            if suspended:
                await self._command(vf, "resume")
                record["resumed"] = True
            elif migrating:
                await self._command(vf, "cancelmigration")

    async def _wait_end(self, qmp: QMPClient, events: EventListener) -> str:
        """The migration's final status, or "source-gone after <last status>" if the
        QEMU went away first (libvirt ends the source right after a migration, which is
        why its MIGRATION events are read before polling)."""
        last = "active"
        while last not in TERMINAL:
            try:
                last = await _next_status(qmp, events, 0.05)
            except Exception:
                if events.empty():  # else: read what arrived before the connection closed
                    return f"source-gone after {last}"
        return last
