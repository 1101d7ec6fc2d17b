"""`vfnic migrate`: a QMP live migration that carries the VF in QEMU's own stream.

QEMU moves RAM, vCPUs and, through its dbus-vmstate object, the VF: each host's
`vfnic serve` offers the VF's org.qemu.VMState1 helper (vfnic.migrate.vmstate),
which saves it on the source and restores it on the destination, and follows the
QEMU through the VF's monitor (dirty log, the cooperative protocol, the PCI config
replay, the announce). So this is plain QMP, as `virsh migrate` does it:

  setup       both QEMUs: capabilities "return-path" (a failure on the destination
              resumes the source) and "events"; the VF's migration mode if asked
  migrate     `migrate` on the source; wait for "completed"
  restore     the destination loaded (paused, -S); its NIC reports the VF restored
              and its config back in QEMU; `cont`; the source quits
Then both NICs' records give the measurements (Save, Load, bytes, DMA pages, early
guest accesses). With return-path, any failure leaves the guest on the source with
its VF running: the source NIC puts the VF back when QEMU resumes it.

A Host without a NIC folder is a QEMU without a vfnic VF (a virtio-net or NIC-less
guest, the benchmarks' baselines): the same QMP steps, without the NICs' part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from qemu.qmp import EventListener, QMPClient

from vfnic.errors import UsageError, VfnicError
from vfnic.host.qmp import MigrationInfo, query_migrate, query_status
from vfnic.migrate import control
from vfnic.migrate.control import MigrationCancelled, MigrationError

__all__ = ["Host", "MigrationCancelled", "MigrationError", "Options", "Summary", "migrate"]
PHASES = ("setup", "migrate", "active", "restore")  # "active": a fault-injection point


@dataclass
class Host:
    """One side: its QEMU's QMP socket and the vfnic NIC folder and VF number
    (``nic_dir`` None: the QEMU has no vfnic VF)."""

    qmp: str
    nic_dir: str | None
    vf: int = 0


@dataclass
class Options:
    uri: str  # where the destination QEMU listens, e.g. tcp:192.168.100.2:4444
    mode: str | None = None  # set the source VF's mode first: transparent | cooperative
    downtime_limit_ms: int = 300
    timeout: float = 600.0
    quit_source: bool = True
    cancel_at: str | None = None  # fault injection: cancel when this phase starts
    save_fault: str | None = None  # fault injection: "corrupt" | "oversize" | "no-msix"
    kill_destination_at: str | None = None  # fault injection: kill the destination QEMU
    destination_pid: int | None = None

    def __post_init__(self) -> None:
        for name in ("cancel_at", "kill_destination_at"):
            phase = getattr(self, name)
            if phase is not None and phase not in PHASES:
                raise UsageError(f"{name} must be one of {', '.join(PHASES)}, not {phase!r}")


@dataclass
class Summary:
    mode: str = "transparent"
    status: str = "failed"
    total_ms: float = 0.0
    vm_downtime_ms: float | None = None  # QEMU's own figure
    device_state_bytes: int = 0
    save_ms: float | None = None  # the helper's Save, inside the source's pause
    load_ms: float | None = None  # the helper's Load, on the destination
    replay_ms: float | None = None  # PCI config back into the destination QEMU
    device_pages: int = 0  # guest pages the VF wrote by DMA (its extents carried)
    device_dma_bytes: int = 0  # the bytes of those extents
    ram_transferred: int = 0
    early_access: bool | None = None  # the guest ran before its VF's config was back
    suspend_us: int | None = None
    resume_us: int | None = None
    suspend_ms: float | None = None  # mailbox round trip incl. the driver
    resume_ms: float | None = None
    regs_equal: bool | None = None  # destination VF registers == source at the stop
    error: str | None = None
    source: dict[str, Any] = field(default_factory=dict)  # the NICs' records
    destination: dict[str, Any] = field(default_factory=dict)
    timeline_ms: dict[str, float] = field(default_factory=dict)  # events since the start

    def text(self) -> str:
        lines = [f"migration {self.status} ({self.mode} mode)"]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [
            f"  total time        {self.total_ms:9.1f} ms",
            f"  VM downtime       {self.vm_downtime_ms or 0:9.1f} ms (QEMU)",
            f"  device state      {self.device_state_bytes:9d} bytes in QEMU's stream",
            f"  Save / Load       {self.save_ms or 0:9.2f} ms / {self.load_ms or 0:.2f} ms",
            f"  config replay     {self.replay_ms or 0:9.1f} ms"
            f"{' (guest ran first!)' if self.early_access else ''}",
            f"  DMA pages (device){self.device_pages:9d} ({self.device_dma_bytes} bytes)",
            f"  RAM transferred   {self.ram_transferred / 2**20:9.1f} MiB",
        ]
        if self.suspend_us is not None or self.resume_us is not None:
            lines.append(f"  VF suspend/resume {self.suspend_us} us / {self.resume_us} us (driver)")
        if self.source.get("suspend_overtaken"):
            lines.append("  VF suspend overtaken: QEMU stopped the guest before its driver "
                         "acknowledged; the VF's state went as in transparent mode")
        return "\n".join(lines)


Progress = Callable[[str], None]


def _stderr_progress(line: str) -> None:
    sys.stderr.write(f"vfnic migrate: {line}\n")
    sys.stderr.flush()


async def _nic(host: Host, req: dict[str, Any], timeout: float = 30.0) -> Any:
    from vfnic.device.nic import control_call

    assert host.nic_dir is not None
    return await asyncio.to_thread(control_call, host.nic_dir, req, timeout)


def _last_seq(records: list[dict[str, Any]]) -> int:
    """The number of a NIC's newest migration record (0: none yet)."""
    return max((int(r.get("seq", 0)) for r in records), default=0)


def _event_time(event: dict[str, Any]) -> float:
    """A QMP event's timestamp (QEMU's clock, seconds since the epoch)."""
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


class Orchestrator:
    def __init__(self, src: Host, dst: Host, opts: Options,
                 progress: Progress | None = None) -> None:
        self.src, self.dst, self.opts = src, dst, opts
        self.progress = progress or _stderr_progress
        self.summary = Summary(opts.mode or "transparent")
        self.qa = QMPClient("source")
        self.qb = QMPClient("destination")
        self.events = EventListener("MIGRATION")
        self.stops = EventListener("STOP")
        self.resumes = EventListener("RESUME")
        if (src.nic_dir is None) != (dst.nic_dir is None):
            raise UsageError("give both hosts a NIC folder, or neither (a guest without VF)")
        self.vf = src.nic_dir is not None
        self.phase = "setup"
        self.t0 = time.perf_counter()
        self.t0_wall = time.time()
        self.seen_src = 0  # NIC records that existed before this migration
        self.seen_dst = 0
        self.last_progress = 0.0  # perf_counter() of the last RAM progress line

    def _mark(self, event: str) -> None:
        self.summary.timeline_ms[event] = round((time.perf_counter() - self.t0) * 1000, 1)

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.progress(phase)
        if self.opts.cancel_at == phase:
            raise MigrationCancelled(f"cancelled at {phase}")
        if self.opts.kill_destination_at == phase and self.opts.destination_pid:
            os.kill(self.opts.destination_pid, signal.SIGKILL)

    async def run(self) -> Summary:
        self.t0, self.t0_wall = time.perf_counter(), time.time()
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
            self.summary.total_ms = (time.perf_counter() - self.t0) * 1000
            with contextlib.suppress(Exception):
                await self._collect()
            for q in (self.qa, self.qb):
                with contextlib.suppress(Exception):
                    await q.disconnect()
        return self.summary

    async def _run(self) -> None:
        s, opts = self.summary, self.opts
        self._enter("setup")
        await self.qa.connect(self.src.qmp)
        self.qa.register_listener(self.events)
        self.qa.register_listener(self.stops)
        await self.qb.connect(self.dst.qmp)
        self.qb.register_listener(self.resumes)
        st = await query_status(self.qb)
        if st.get("status") != "inmigrate":
            raise MigrationError("the destination QEMU is not waiting for a migration "
                                 "(start it with -S -incoming URI)")
        if self.vf:
            if opts.mode is not None:
                await _nic(self.src, {"op": "vf-migration", "vf": self.src.vf,
                                      "mode": opts.mode})
            links = await _nic(self.src, {"op": "link-show"})
            s.mode = links["vfs"][self.src.vf]["migration_mode"]
            if opts.save_fault:
                await _nic(self.src, {"op": "vmstate-fault", "vf": self.src.vf,
                                      "fault": opts.save_fault})
            self.seen_src = _last_seq(await _nic(self.src, {"op": "migrations"}))
            self.seen_dst = _last_seq(await _nic(self.dst, {"op": "migrations"}))
        else:
            s.mode = "no VF"
        caps = {"capabilities": [{"capability": "return-path", "state": True},
                                 {"capability": "events", "state": True}]}
        await self.qa.execute("migrate-set-capabilities", caps)
        await self.qb.execute("migrate-set-capabilities", caps)
        await self.qa.execute("migrate-set-parameters",
                              {"downtime-limit": opts.downtime_limit_ms})

        self._enter("migrate")
        await self.qa.execute("migrate", {"uri": opts.uri})
        self._mark("migrate")
        if "active" in (opts.cancel_at, opts.kill_destination_at):
            await control.wait_status(self.qa, self.events, {"active"}, opts.timeout)
            self._enter("active")  # a fault while RAM is being sent: before any Save
        info = await control.wait_status(self.qa, self.events, {"completed"}, opts.timeout,
                                         self._ram_progress)
        self._mark("source-completed")
        if not self.stops.empty():  # the vCPUs' stop, by QEMU's own clock
            stopped = _event_time(dict(await self.stops.get()))
            s.timeline_ms["source-stopped"] = round((stopped - self.t0_wall) * 1000, 1)
        s.vm_downtime_ms = info.get("downtime")
        s.ram_transferred = info.get("ram", {}).get("transferred", 0)

        self._enter("restore")
        if self.vf:
            rec = await self._destination_record("restored_at", 30.0)
            if "error" in rec:
                raise MigrationError(f"destination: {rec['error']}")
            self._mark("vf-restored")
        if not self.resumes.empty():  # it ran before anything was restored
            raise MigrationError("the destination runs already (start it with -S)")
        # With return-path the source completes once the destination has loaded; a
        # `cont` still in its incoming state would start it at the end (autostart).
        await self.qb.execute("cont")
        self._mark("destination-running")
        if self.vf:
            await self._destination_record("result", 15.0)
            self._mark("vf-resumed")
        with contextlib.suppress(TimeoutError):  # the vCPUs' start, by QEMU's own clock
            resumed = _event_time(dict(await asyncio.wait_for(self.resumes.get(), 1.0)))
            s.timeline_ms["destination-resumed"] = round((resumed - self.t0_wall) * 1000, 1)
        if opts.quit_source:
            with contextlib.suppress(Exception):
                await self.qa.execute("quit")

    def _ram_progress(self, info: MigrationInfo) -> None:
        ram = info.get("ram")
        now = time.perf_counter()
        if ram and now - self.last_progress > 1.0:
            self.last_progress = now
            self.progress(f"  RAM {ram.get('transferred', 0) / 2**20:.0f} MiB sent, "
                          f"{ram.get('remaining', 0) / 2**20:.0f} MiB left, "
                          f"pass {ram.get('dirty-sync-count', 0)}")

    async def _destination_record(self, key: str, timeout: float) -> dict[str, Any]:
        """The destination NIC's record of this migration once it has ``key`` (the NIC
        answers as soon as it has: no polling in the guest's pause)."""
        req = {"op": "migration-wait", "role": "destination", "key": key,
               "since": self.seen_dst, "timeout": timeout}
        try:
            return dict(await _nic(self.dst, req, timeout + 5))
        except UsageError as exc:  # the NIC's answer: nothing came in time
            raise MigrationError(f"the destination NIC did not report the VF {key} "
                                 "(is its QEMU started with the dbus-vmstate object?)") from exc

    async def _collect(self) -> None:
        """The NICs' records of this migration into the summary."""
        s = self.summary
        if not self.vf:
            return
        src = [r for r in await _nic(self.src, {"op": "migrations", "settle": 5,
                                                "since": self.seen_src})
               if r.get("role") == "source"]
        dst = [r for r in await _nic(self.dst, {"op": "migrations", "since": self.seen_dst})
               if r.get("role") == "destination"]
        if src and dst and "regs" in src[-1] and "regs" in dst[-1]:
            # Recorded by each NIC as the stream left them: at the stop, and restored.
            s.regs_equal = src[-1]["regs"] == dst[-1]["regs"]
        if src:
            s.source = src[-1]
            s.save_ms = s.source.get("save_ms")
            s.device_state_bytes = s.source.get("bytes", 0)
            s.device_pages = s.source.get("pages", 0)
            s.device_dma_bytes = s.source.get("dma_bytes", 0)
            s.suspend_us = s.source.get("suspend_driver_us")
            s.suspend_ms = s.source.get("suspend_mailbox_ms")
            # Cooperative: the driver's suspend and QEMU let converge, by the source NIC's
            # clock (its record's times count from its start)
            for key, event in (("suspended_at_ms", "vf-suspended"),
                               ("released_at_ms", "qemu-released")):
                if s.source.get(key) is not None and "started" in s.source:
                    at = s.source["started"] + s.source[key] / 1000
                    s.timeline_ms[event] = round((at - self.t0_wall) * 1000, 1)
        if dst:
            s.destination = dst[-1]
            s.load_ms = s.destination.get("load_ms")
            s.replay_ms = s.destination.get("replay_ms")
            s.early_access = s.destination.get("early_access")
            s.resume_us = s.destination.get("resume_driver_us")
            s.resume_ms = s.destination.get("resume_mailbox_ms")

    async def _rollback(self) -> None:
        """Leave the guest running on the source (QEMU resumes it itself with
        return-path; a migration cancelled here is cancelled first)."""
        with contextlib.suppress(Exception):
            info = await query_migrate(self.qa)
            if info.get("status") in ("active", "setup", "device", "pre-switchover"):
                await self.qa.execute("migrate_cancel")
            st = await control.wait_runstate(
                self.qa, lambda st: bool(st.get("running")) or st.get("status") == "postmigrate",
                30, poll=0.05)
            if not st.get("running"):  # postmigrate, no return-path: resume it ourselves
                await self.qa.execute("cont")
        with contextlib.suppress(Exception):
            await self.qb.execute("quit")


def migrate(src: Host, dst: Host, opts: Options, progress: Progress | None = None) -> Summary:
    """One live migration. Raises UsageError if one host has a NIC folder and the other
    not; a migration that fails or is cancelled is reported in the Summary (status,
    error), the guest left running on the source."""
    return asyncio.run(Orchestrator(src, dst, opts, progress).run())


def summary_json(summary: Summary) -> str:
    return json.dumps(asdict(summary), indent=2)
