"""`vfnic migrate`: live migration of a VM together with its vfnic VF.

QEMU moves the RAM and vCPUs (QMP `migrate` with pause-before-switchover);
vfnic moves what QEMU does not carry for a vfio-user device:

  setup       DMA dirty logging on the source VF (transparent mode), or the VF
              driver told `migrate` through the PF mailbox (cooperative mode)
  precopy     source VF in PRE_COPY: its state is read while the guest runs;
              cooperative mode suspends the VF driver before switchover
  switchover  source stopped (pre-switchover): VF to STOP_COPY, final state and
              the pages the device wrote by DMA are read; QEMU completes
  restore     destination VF: RESUMING, state written, STOP (registers restored,
              DMA'd pages written into the destination's guest memory), the PCI
              config QEMU does not migrate for vfio-user replayed into the
              destination QEMU, VF to RUNNING, `cont`; cooperative: `resume`
Any failure before the destination runs rolls back: migration cancelled, the
source VF back to RUNNING, the source VM continued, the destination VM quit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from vfnic.errors import OperatorError, VfnicError
from vfnic.host.qmp import MigrationInfo, query_migrate, query_pci, query_status
from vfnic.migrate.devicelink import DeviceLink
from vfnic.regs.ids import VENDOR_ID, VF_DEVICE_ID
from vfnic.vfiouser.features import State

PHASES = ("setup", "precopy", "switchover", "restore")


class MigrationError(OperatorError):
    """The migration failed (the source VM keeps running)."""


class MigrationCancelled(MigrationError):
    """The migration was cancelled on request."""


@dataclass
class Host:
    """One side: its QEMU's QMP socket and the vfnic NIC folder and VF number."""

    qmp: str
    nic_dir: str
    vf: int = 0
    device_id: str | None = None  # QEMU id of the vfio-user-pci device, found if None

    @property
    def vf_socket(self) -> str:
        return str(Path(self.nic_dir) / f"vf{self.vf}.sock")


@dataclass
class Options:
    uri: str  # where the destination QEMU listens, e.g. tcp:192.168.100.2:4444
    mode: str = "transparent"  # or "cooperative"
    downtime_limit_ms: int = 300
    mailbox_timeout: float = 5.0
    timeout: float = 600.0
    quit_source: bool = True
    cancel_at: str | None = None  # fault injection: cancel when this phase starts
    corrupt_stream: bool = False  # fault injection: flip a byte of the device state
    kill_destination_at: str | None = None  # fault injection: kill the destination QEMU
    destination_pid: int | None = None
    announce: bool = True  # transparent: the destination NIC announces the VF's MAC
    garp: bool = True  # cooperative: the VF driver sends a gratuitous ARP on resume


@dataclass
class Summary:
    mode: str
    status: str = "failed"
    total_ms: float = 0.0
    vm_downtime_ms: float | None = None  # QEMU's own figure
    device_state_bytes: int = 0
    precopy_bytes: int = 0
    stopcopy_bytes: int = 0
    save_ms: float = 0.0
    restore_ms: float = 0.0
    device_pages: int = 0  # pages the device wrote by DMA, carried by vfnic
    ram_transferred: int = 0
    suspend_us: int | None = None
    resume_us: int | None = None
    suspend_ms: float | None = None  # mailbox round trip incl. the driver
    resume_ms: float | None = None
    regs_equal: bool | None = None  # destination VF registers == source at switchover
    error: str | None = None
    phases_ms: dict[str, float] = field(default_factory=dict)
    timeline_ms: dict[str, float] = field(default_factory=dict)  # events since the start

    def text(self) -> str:
        lines = [f"migration {self.status} ({self.mode} mode)"]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [
            f"  total time        {self.total_ms:9.1f} ms",
            f"  VM downtime       {self.vm_downtime_ms or 0:9.1f} ms (QEMU)",
            f"  device state      {self.device_state_bytes:9d} bytes "
            f"(pre-copy {self.precopy_bytes}, stop-copy {self.stopcopy_bytes})",
            f"  save / restore    {self.save_ms:9.2f} ms / {self.restore_ms:.2f} ms",
            f"  DMA pages (device){self.device_pages:9d}",
            f"  RAM transferred   {self.ram_transferred / 2**20:9.1f} MiB",
        ]
        if self.suspend_us is not None or self.resume_us is not None:
            lines.append(f"  VF suspend/resume {self.suspend_us} us / {self.resume_us} us (driver)")
        return "\n".join(lines)


Progress = Callable[[str], None]


def _stderr_progress(line: str) -> None:
    sys.stderr.write(f"vfnic migrate: {line}\n")
    sys.stderr.flush()


class Orchestrator:
    """One migration of a VM with a vfnic VF from ``src`` to ``dst``."""

    def __init__(self, src: Host, dst: Host, opts: Options,
                 progress: Progress | None = None) -> None:
        self.src, self.dst, self.opts = src, dst, opts
        self.progress = progress or _stderr_progress
        self.summary = Summary(opts.mode)
        self.qa = QMPClient("source")
        self.events = EventListener("MIGRATION")
        self.qb = QMPClient("destination")
        self.da: DeviceLink | None = None
        self.db: DeviceLink | None = None
        self.phase = "setup"
        self.suspended = False
        self.migrating_driver = False
        self.dest_running = False
        self.t0 = time.perf_counter()

    def _mark(self, event: str) -> None:
        self.summary.timeline_ms[event] = round((time.perf_counter() - self.t0) * 1000, 1)

    # -- helpers ------------------------------------------------------------------------

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.progress(f"{phase}")
        if self.opts.cancel_at == phase:
            raise MigrationCancelled(f"cancelled at {phase}")
        if self.opts.kill_destination_at == phase and self.opts.destination_pid:
            import os
            import signal

            os.kill(self.opts.destination_pid, signal.SIGKILL)

    async def _control(self, host: Host, state: str, args: list[int] | None = None
                       ) -> dict[str, Any]:
        from vfnic.device.nic import control_call

        req = {"op": "vf-state", "vf": host.vf, "state": state,
               "timeout": self.opts.mailbox_timeout, "args": args or []}
        result = await asyncio.to_thread(control_call, host.nic_dir, req,
                                         self.opts.mailbox_timeout + 5)
        return dict(result)

    async def _wait_migration(self, want: set[str], timeout: float) -> MigrationInfo:
        """Wait for QEMU's migration status to reach one of ``want``: woken at once by
        its MIGRATION events (capability "events"), polled for progress meanwhile."""
        deadline = time.monotonic() + timeout
        last = 0.0
        while True:
            info = await query_migrate(self.qa)
            status = info.get("status", "none")
            if status in want:
                return info
            if status in ("failed", "cancelled"):
                raise MigrationError(f"QEMU migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() - last > 1.0 and "ram" in info:
                ram = info["ram"]
                self.progress(f"  RAM {ram.get('transferred', 0) / 2**20:.0f} MiB sent, "
                              f"{ram.get('remaining', 0) / 2**20:.0f} MiB left, "
                              f"pass {ram.get('dirty-sync-count', 0)}")
                last = time.monotonic()
            if time.monotonic() > deadline:
                raise MigrationError(f"migration did not reach {sorted(want)} in {timeout:g} s")
            try:
                while True:  # sleep until a status event (or 100 ms for progress)
                    event: dict[str, Any] = dict(await asyncio.wait_for(self.events.get(), 0.1))
                    if event.get("data", {}).get("status") in want | {"failed", "cancelled"}:
                        break
            except TimeoutError:
                pass

    async def _find_device(self, qmp: QMPClient, host: Host) -> tuple[int, int, int]:
        """(bus, slot, function) of the VF in that QEMU (by id, else by IDs)."""
        buses = await query_pci(qmp)
        found = []
        for bus in buses:
            for dev in bus.get("devices", []):
                ident = dev.get("id", {})
                if host.device_id is not None:
                    if dev.get("qdev_id") == host.device_id:
                        found.append(dev)
                elif ident.get("vendor") == VENDOR_ID and ident.get("device") == VF_DEVICE_ID:
                    found.append(dev)
        if len(found) != 1:
            what = host.device_id or "vfnic VF"
            raise MigrationError(f"{len(found)} devices match {what} in {host.qmp}; "
                                 "name it with --device-id")
        dev = found[0]
        return int(dev["bus"]), int(dev["slot"]), int(dev["function"])

    async def _replay_config(self, config: bytes) -> None:
        """Give the destination QEMU the PCI config the guest programmed (BARs,
        command, interrupt line): vfio-user-pci has no vfio_save_config, so QEMU
        does not migrate it. Written through the legacy config ports (0xcf8/0xcfc)."""
        bus, slot, func = await self._find_device(self.qb, self.dst)

        async def write(offset: int, value: int) -> None:
            addr = 0x80000000 | bus << 16 | slot << 11 | func << 8 | offset
            await self.qb.execute("human-monitor-command",
                                  {"command-line": f"o /w 0xcf8 {addr:#x}"})
            await self.qb.execute("human-monitor-command",
                                  {"command-line": f"o /w 0xcfc {value:#x}"})

        def dword(off: int) -> int:
            return int.from_bytes(config[off : off + 4], "little")

        for off in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x3C):
            if dword(off):  # unimplemented BARs stay 0 after the destination's reset
                await write(off, dword(off))
        await write(0x04, dword(0x04) & 0xFFFF)  # command last: enables decoding

    # -- the migration --------------------------------------------------------------------

    async def run(self) -> Summary:
        """Migrate; the Summary says how it went. A migration that fails (MigrationError,
        any VfnicError or OSError on the way: QMP, the device links, the NIC servers) or is
        cancelled does not raise: it is rolled back, the source keeps running, and
        ``summary.status`` is "failed" or "cancelled" with ``summary.error``. Anything else
        (a bug) is re-raised after the rollback."""
        t0 = self.t0 = time.perf_counter()
        try:
            await self._run()
            self.summary.status = "completed"
        except BaseException as exc:
            self.summary.error = str(exc) or type(exc).__name__
            self.summary.status = "cancelled" if isinstance(exc, MigrationCancelled) else "failed"
            self.progress(f"{self.summary.status} during {self.phase}: {self.summary.error}")
            await self._rollback()
            if not isinstance(exc, (VfnicError, OSError, asyncio.CancelledError)):
                raise
        finally:
            self.summary.total_ms = (time.perf_counter() - t0) * 1000
            for link in (self.da, self.db):
                if link is not None:
                    link.close()
            for q in (self.qa, self.qb):
                with contextlib.suppress(Exception):
                    await q.disconnect()
        return self.summary

    async def _run(self) -> None:
        s, opts = self.summary, self.opts
        tp = time.perf_counter()
        self._enter("setup")
        await self.qa.connect(self.src.qmp)
        self.qa.register_listener(self.events)
        await self.qb.connect(self.dst.qmp)
        dst_status = await query_status(self.qb)
        if dst_status.get("status") != "inmigrate":
            raise MigrationError("the destination QEMU is not waiting for a migration "
                                 "(start it with -incoming)")
        self.da = DeviceLink(self.src.vf_socket)
        self.db = DeviceLink(self.dst.vf_socket)
        if self.da.state() != State.RUNNING:
            raise MigrationError(f"source VF is in state {self.da.state().name}, not RUNNING")
        await self.qa.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "events", "state": True}]})
        if opts.mode == "transparent":
            self.da.logging_start()
        else:
            await self._control(self.src, "migrate")
            self.migrating_driver = True
            # Hold off convergence until the VF driver has suspended (see precopy).
            await self.qa.execute("migrate-set-parameters", {"downtime-limit": 0})
        s.phases_ms["setup"] = (time.perf_counter() - tp) * 1000

        tp = time.perf_counter()
        self._enter("precopy")
        self.da.set_state(State.PRE_COPY)
        precopy = self.da.read_all()
        s.precopy_bytes = len(precopy)
        await self.qa.execute("migrate", {"uri": opts.uri})
        if opts.mode == "cooperative":
            if await wait_suspend_point(self.qa, self.opts.timeout):
                # Set first: a driver that acknowledges too late has still suspended,
                # and a rollback must resume it.
                self.suspended = True
                result = await self._control(self.src, "suspend")
                s.suspend_us, s.suspend_ms = result.get("driver_us"), result.get("mailbox_ms")
            else:
                self.progress("  the guest was stopped before the VF driver could suspend")
            await self.qa.execute("migrate-set-parameters",
                                  {"downtime-limit": opts.downtime_limit_ms})
        await self._wait_migration({"pre-switchover"}, opts.timeout)
        self._mark("source-stopped")
        s.phases_ms["precopy"] = (time.perf_counter() - tp) * 1000

        tp = time.perf_counter()
        self._enter("switchover")
        ts = time.perf_counter()
        self.da.set_state(State.STOP_COPY)
        final = self.da.read_all()
        s.save_ms = (time.perf_counter() - ts) * 1000
        s.stopcopy_bytes = len(final)
        s.device_state_bytes = s.precopy_bytes + s.stopcopy_bytes
        self._mark("device-saved")
        await self.qa.execute("migrate-continue", {"state": "pre-switchover"})
        # The source VF is stopped: what it shows now is its state at switchover.
        source_regs = self.da.regs()
        source_config = self.da.config()
        if opts.mode == "transparent":
            s.device_pages = _count_pages(final)
            self.da.logging_stop()
        info = await self._wait_migration({"completed"}, opts.timeout)
        self._mark("source-completed")
        s.vm_downtime_ms = info.get("downtime")
        s.ram_transferred = info.get("ram", {}).get("transferred", 0)
        await self._wait_destination_loaded()
        self._mark("destination-loaded")
        s.phases_ms["switchover"] = (time.perf_counter() - tp) * 1000

        tp = time.perf_counter()
        self._enter("restore")
        stream = precopy + final
        if opts.corrupt_stream:
            mid = len(stream) // 2
            stream = stream[:mid] + bytes([stream[mid] ^ 0xFF]) + stream[mid + 1 :]
        tr = time.perf_counter()
        self.db.set_state(State.RESUMING)
        self.db.write_all(stream)
        self.db.set_state(State.STOP)  # the stream is checked and restored here
        s.restore_ms = (time.perf_counter() - tr) * 1000
        self._mark("device-restored")
        s.regs_equal = self.db.regs() == source_regs
        await self._replay_config(source_config)
        self._mark("config-replayed")
        self.db.set_state(State.RUNNING)
        await self.qb.execute("cont")
        self._mark("destination-running")
        self.dest_running = True
        if opts.mode == "transparent" and opts.announce:
            await asyncio.to_thread(self._announce)
            self._mark("announced")
        if opts.mode == "cooperative":
            from vfnic.regs.mailbox import RESUME_NO_GARP

            result = await self._control(self.dst, "resume",
                                         [0 if opts.garp else RESUME_NO_GARP])
            s.resume_us, s.resume_ms = result.get("driver_us"), result.get("mailbox_ms")
            self._mark("driver-resumed")
        s.phases_ms["restore"] = (time.perf_counter() - tp) * 1000
        if opts.quit_source:
            with contextlib.suppress(Exception):
                await self.qa.execute("quit")

    def _announce(self) -> None:
        from vfnic.device.nic import control_call

        control_call(self.dst.nic_dir, {"op": "announce", "vf": self.dst.vf, "count": 3})

    async def _wait_destination_loaded(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = await query_status(self.qb)
            if st.get("status") in ("paused", "postmigrate", "prelaunch"):
                return
            if st.get("status") in ("running",):
                raise MigrationError("the destination started running before the VF was restored"
                                     " (start it with -S)")
            await asyncio.sleep(0.005)
        raise MigrationError("the destination did not finish loading the migration")

    async def _rollback(self) -> None:
        """Leave the guest running on the source with its VF intact."""
        if self.dest_running:
            return  # the guest already runs on the destination: nothing to undo
        with contextlib.suppress(Exception):
            info = await query_migrate(self.qa)
            if info.get("status") in ("active", "pre-switchover", "setup", "device"):
                await self.qa.execute("migrate_cancel")
                for _ in range(200):
                    info = await query_migrate(self.qa)
                    if info.get("status") not in ("active", "pre-switchover", "cancelling"):
                        break
                    await asyncio.sleep(0.05)
        if self.da is not None:
            with contextlib.suppress(Exception):
                if self.da.state() != State.RUNNING:
                    self.da.set_state(State.RUNNING)
            with contextlib.suppress(Exception):
                self.da.logging_stop()
        with contextlib.suppress(Exception):
            st = await query_status(self.qa)
            if not st.get("running"):
                await self.qa.execute("cont")
        if self.suspended:
            with contextlib.suppress(Exception):
                await self._control(self.src, "resume")
        elif self.migrating_driver:
            with contextlib.suppress(Exception):
                await self._control(self.src, "cancelmigration")
        with contextlib.suppress(Exception):
            await self.qa.execute("migrate-set-parameters",
                                  {"downtime-limit": self.opts.downtime_limit_ms})
        with contextlib.suppress(Exception):
            await self.qb.execute("quit")


async def wait_suspend_point(qmp: QMPClient, timeout: float) -> bool:
    """Wait until most of the first RAM pass is sent (1/4 of RAM left, or pass 2
    begun), the moment to suspend the VF driver. With downtime-limit 0, QEMU cannot
    switch over while pass 1 still has pages left, so the guest is still running here.
    Not later: with a 1/32 threshold about 1 migration in 40 had its SUSPEND
    acknowledged only after 5 s (the driver had suspended; the ack was late), most
    likely because once pass 1 is over QEMU, unable to converge, syncs its dirty bitmap
    pass after pass under the BQL, and the guest's MMIO crawls. False if QEMU reached
    switchover anyway (an idle guest with nothing left to send)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await query_migrate(qmp)
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise MigrationError(f"QEMU migration {status}: {info.get('error-desc', '')}")
        if status in ("pre-switchover", "device", "completed"):
            return False
        ram = info.get("ram", {})
        total = ram.get("total", 0) or 1
        if ram.get("dirty-sync-count", 0) >= 2 or ram.get("remaining", total) <= total // 4:
            return True
        await asyncio.sleep(0.01)
    raise MigrationError("RAM pre-copy did not progress")


def _count_pages(stream_bytes: bytes) -> int:
    from vfnic.savevm import stream

    try:
        recs = stream.records(stream_bytes)
    except VfnicError:
        return 0
    return sum(len(p) // (8 + stream.PAGE_SIZE) for k, p in recs if k == stream.KIND_PAGES)


def migrate(src: Host, dst: Host, opts: Options, progress: Progress | None = None) -> Summary:
    """Run one migration (Orchestrator.run, which says what it raises and what it reports)."""
    return asyncio.run(Orchestrator(src, dst, opts, progress).run())


def summary_json(summary: Summary) -> str:
    return json.dumps(asdict(summary), indent=2)
