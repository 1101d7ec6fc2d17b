"""The VF's state in QEMU's own migration stream: an org.qemu.VMState1 helper per VF.

QEMU's ``dbus-vmstate`` object (backends/dbus-vmstate.c) calls every helper queued
for the name org.qemu.VMState1 on the VM's D-Bus bus: ``Save() -> ay`` on the
source after the vCPUs stopped and the last RAM pass, ``Load(ay)`` on the
destination before the migration completes. So a plain QMP ``migrate`` or ``virsh
migrate --live`` carries the VF, with nothing vfnic-specific between the hosts.

For every VF a QEMU has attached, this finds that QEMU (the peer of the vfio-user
socket) and reads its command line:
  -object dbus-vmstate,...,addr=unix:path=BUS   the VM's bus: the helper joins it,
                                                with Id ``vfnic.<device id>``
  -device {"driver": "vfio-user-pci", "id": ID, "socket": ...this VF's socket...}
  -qmp unix:DIR/<ID>.qmp                        a monitor of its own, followed
Paths are resolved in that QEMU's mount namespace (/proc/PID/root), so a QEMU that
libvirt runs in another root works too.

Through the monitor: the device dirty log starts when the source starts migrating;
a cooperative VF's driver is told (vfnic.migrate.control); when the migration fails
the source VF goes back to RUNNING. On the destination, once Load has returned (never
from inside it: QEMU's main loop is blocked there), the PCI config QEMU does not
migrate for vfio-user (BARs, command register, MSI-X Message Control) is written back
into the destination QEMU, then the MSI-X table (read from the source QEMU when the
migration started, carried in the state), the VF set RUNNING, and when the guest runs
the VF's MAC is announced (transparent) or the driver told `resume` (cooperative). A
guest that ran before the config was back is counted (``early_access``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbus_fast import BusType, NameFlag
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method
from qemu.qmp import EventListener, QMPClient, Runstate

from vfnic.device import pci
from vfnic.device.function import CAP_MSIX, PciFunction
from vfnic.device.policy import MIGRATION_COOPERATIVE
from vfnic.errors import VfnicError
from vfnic.host.qmp import query_migrate, query_pci, query_status
from vfnic.migrate import control, vfstate

if TYPE_CHECKING:
    from vfnic.device.nic import NicServer

log = logging.getLogger("vfnic.vmstate")

INTERFACE = "org.qemu.VMState1"
OBJECT_PATH = "/org/qemu/VMState1"
SCAN_INTERVAL = 0.1
MAILBOX_TIMEOUT = 5.0
MAX_WAIT = 60.0  # s, the longest a migration-wait request holds its connection
# Config words QEMU keeps for a vfio-user device and does not migrate: BAR0-5,
# interrupt line/pin (PCI 3.0 section 6.1); COMMAND last, since it turns decoding on.
REPLAYED_CONFIG = (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x3C)


def helper_id(device_id: str) -> str:
    """The VMState1 Id of a VF: its QEMU device id, the same on both hosts."""
    return f"vfnic.{device_id}"


# -- finding the QEMU behind a vfio-user socket -------------------------------------------


@dataclass
class Attachment:
    """What a VF's QEMU says about it on its command line."""

    pid: int
    device_id: str
    bus: str | None  # the dbus-vmstate bus, as a path usable from here
    monitor: str | None  # the VF's own QMP monitor, as a path usable from here


def peer_pid(sock: socket.socket) -> int:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", data)[0])


def _options(text: str) -> dict[str, str]:
    """QEMU's key=value,... option syntax (a doubled comma is a comma)."""
    out: dict[str, str] = {}
    for part in re.split(r"(?<!,),(?!,)", text):
        key, sep, value = part.partition("=")
        out[key] = value.replace(",,", ",") if sep else ""
    return out


def _object_or_device(arg: str) -> dict[str, Any]:
    if arg.lstrip().startswith("{"):
        try:
            value = json.loads(arg)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    opts: dict[str, Any] = _options(arg)
    first = arg.split(",", 1)[0]
    if "=" not in first:
        opts["driver"] = opts["qom-type"] = first
    if "socket.path" in opts:
        opts["socket"] = {"type": "unix", "path": opts["socket.path"]}
    return opts


def _resolve(pid: int, path: str) -> str:
    """``path`` as QEMU ``pid`` sees it, reachable from this process (a unix socket
    path must stay under 108 bytes, so the plain path when it is the same file)."""
    theirs = f"/proc/{pid}/root{path}"
    try:
        same_root = os.stat(f"/proc/{pid}/root") == os.stat("/")
        same_ns = os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    except OSError:
        return path
    return path if same_root and same_ns else theirs


def find_attachment(pid: int, vf_socket: str) -> Attachment | None:
    """The VF's device id, bus and monitor from QEMU ``pid``'s command line, or None
    when that process did not attach ``vf_socket`` as a vfio-user-pci device."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        mine = os.stat(vf_socket)
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv]
    device_id = bus = None
    monitors: list[str] = []
    for opt, value in zip(args, args[1:], strict=False):
        if opt == "-object":
            obj = _object_or_device(value)
            if obj.get("qom-type") == "dbus-vmstate":
                addr = str(obj.get("addr", ""))
                if addr.startswith("unix:path="):
                    bus = addr[len("unix:path="):].split(",", 1)[0]
        elif opt == "-device":
            dev = _object_or_device(value)
            sock = dev.get("socket")
            if dev.get("driver") != "vfio-user-pci" or not isinstance(sock, dict):
                continue
            try:
                st = os.stat(_resolve(pid, str(sock.get("path", ""))))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino) and dev.get("id"):
                device_id = str(dev["id"])
        elif opt == "-qmp" and value.startswith("unix:"):
            monitors.append(value[len("unix:"):].split(",", 1)[0])
    if device_id is None:
        return None
    monitor = next((m for m in monitors if Path(m).name == f"{device_id}.qmp"), None)
    return Attachment(pid, device_id, _resolve(pid, bus) if bus else None,
                      _resolve(pid, monitor) if monitor else None)


async def _quietly(aw: Any) -> None:
    with contextlib.suppress(Exception):
        await aw


# -- the D-Bus helper ------------------------------------------------------------------------


class VMState1(ServiceInterface):
    """org.qemu.VMState1 for one VF (docs/interop/dbus-vmstate.rst)."""

    def __init__(self, link: VfLink) -> None:
        super().__init__(INTERFACE)
        self.link = link

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":  # type: ignore[name-defined]  # noqa: F821, UP037 (D-Bus signature)
        return self.link.id

    @method()
    def Save(self) -> "ay":  # type: ignore[name-defined]  # noqa: F821, UP037
        try:
            return self.link.save()
        except VfnicError as exc:
            log.error("%s: Save refused: %s", self.link.id, exc)
            raise DBusError("org.qemu.VMState1.Error.Save", str(exc)) from exc

    @method()
    def Load(self, data: "ay"):  # type: ignore[name-defined,no-untyped-def]  # noqa: F821, UP037
        try:
            self.link.load(bytes(data))
        except VfnicError as exc:
            log.error("%s: Load refused: %s", self.link.id, exc)
            raise DBusError("org.qemu.VMState1.Error.Load", str(exc)) from exc


# -- one VF attached by one QEMU ---------------------------------------------------------------


def _destination_gone(record: dict[str, Any]) -> str:
    """The result of a destination record (made by Load) whose QEMU went away: the
    last step it reached."""
    step = "running" if "running_at" in record else \
        "restored" if "restored_at" in record else "loaded"
    return f"destination-gone after {step}"


class VfLink:
    """A VF and the QEMU that attached it: the helper on its bus and its monitor."""

    def __init__(self, service: VmStateService, fn: PciFunction, att: Attachment) -> None:
        self.service = service
        self.fn = fn
        self.att = att
        self.id = helper_id(att.device_id)
        self.qmp: QMPClient | None = None
        self.loaded = asyncio.Event()
        self.address: int | Exception | None = None  # of the VF in its QEMU (destination)
        # the config replay (destination); its result: what goes into the record
        self.replay: asyncio.Task[dict[str, Any]] | None = None
        self.undescribed: tuple[dict[str, Any], bytes] | None = None  # a Load's record
        self.record: dict[str, Any] | None = None  # the migration in progress

    def _new_record(self, role: str) -> dict[str, Any]:
        record: dict[str, Any] = {"vf": self.fn.index, "id": self.id, "role": role,
                                  "mode": self.fn.migration_mode, "started": time.time()}
        self.service.add_record(record)
        self.record = record
        return record

    def _regs(self, record: dict[str, Any]) -> None:
        """The VF's registers (BAR0) as the stream left them: at the stop (source, still
        stopped), restored (destination, before the replay lets it run)."""
        with self.fn.lock:
            regs = {r.name: self.fn.bank.get(r.name) for r in self.fn.bank.table}
        self.service.update(record, regs=regs)

    def _describe(self, record: dict[str, Any], data: bytes) -> None:
        """The stream's CRC, extents and page count."""
        extents = vfstate.extents_in(data)
        self.service.update(record, crc=zlib.crc32(data), extents=len(extents),
                            pages=vfstate.pages_of(extents),
                            dma_bytes=sum(len(b) for _, b in extents))

    # Save and Load run with QEMU's main loop blocked: no monitor call from here.

    def save(self) -> bytes:
        t0 = time.perf_counter()
        record = self.record if self.record and self.record["role"] == "source" else \
            self._new_record("source")
        if self.fn.dma.dirty_log is None:
            # No monitor told us the migration started: pages the VF wrote by DMA after
            # QEMU sent them are not in this state (the guest may see stale buffers).
            warning = "DMA dirty log was not running: DMA-written pages not carried"
            self.service.update(record, warning=warning)
            log.warning("%s: %s", self.id, warning)
        fault = self.service.faults.pop(self.fn.index, None)
        limit = 64 if fault == "oversize" else vfstate.LIMIT
        try:
            data = vfstate.save(self.fn, limit)
        except VfnicError as exc:
            self.service.update(record, error=str(exc))
            raise
        if fault == "corrupt":
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        self.service.update(record, save_ms=round((time.perf_counter() - t0) * 1000, 3),
                            bytes=len(data), saved=True)
        # Bookkeeping after the reply, outside QEMU's pause (the VF stays stopped).
        loop = asyncio.get_running_loop()
        loop.call_soon(self._regs, record)
        loop.call_soon(self._describe, record, data)
        return data

    def load(self, data: bytes) -> None:
        t0 = time.perf_counter()
        record = self._new_record("destination")
        try:
            vfstate.load(self.fn, data)
        except VfnicError as exc:
            self.service.update(record, error=str(exc), result="refused")
            raise
        self.service.update(record, load_ms=round((time.perf_counter() - t0) * 1000, 3),
                            bytes=len(data), loaded_at=time.time(),
                            mode=self.fn.migration_mode)  # as the source's VF had it
        # The config replay, queued now: its commands go out right behind this reply and
        # wait in the monitor until QEMU's main loop runs again, ahead of any `cont`.
        # Registers as restored, right after this reply (the VF runs only once the
        # replay, queued next, is done).
        asyncio.get_running_loop().call_soon(self._regs, record)
        self.loaded.set()
        self._queue_replay()
        # Bookkeeping once the guest runs (it would hold the GIL while the replay's
        # config writes wait for this server); at once if no monitor is followed.
        if self.att.monitor is None:
            asyncio.get_running_loop().call_soon(self._describe, record, data)
        else:
            self.undescribed = (record, data)

    def _queue_replay(self) -> None:
        """Queue the config replay once both the stream is loaded and the VF's address
        is known (whichever comes last), once."""
        if (self.replay is None and self.loaded.is_set() and self.qmp is not None
                and isinstance(self.address, int)):
            self.replay = asyncio.get_running_loop().create_task(
                self._replay_config(self.qmp, self.address))

    # -- the link's life -------------------------------------------------------------------

    async def run(self) -> None:
        bus: MessageBus | None = None
        try:
            if self.att.bus is not None:
                bus = await MessageBus(bus_address=f"unix:path={self.att.bus}",
                                       bus_type=BusType.SESSION).connect()
                bus.export(OBJECT_PATH, VMState1(self))
                await bus.request_name(INTERFACE, NameFlag(0))  # queued: one per VF
                asyncio.create_task(_quietly(bus.wait_for_disconnect()))  # bus gone: no noise
                log.info("%s: helper on %s (QEMU %d)", self.id, self.att.bus, self.att.pid)
            if self.att.monitor is not None:
                await self._follow(self.att.monitor)
            else:
                log.warning("%s: QEMU %d has no monitor %s.qmp: its migrations cannot be "
                            "followed (no DMA dirty log, no config replay, no rollback)",
                            self.id, self.att.pid, self.att.device_id)
                await asyncio.Event().wait()
        finally:
            if bus is not None:
                bus.disconnect()

    async def _follow(self, path: str) -> None:
        qmp = self.qmp = QMPClient(f"vfnic-{self.id}")
        for _ in range(50):
            try:
                await asyncio.wait_for(qmp.connect(path), 2.0)
                break
            except Exception:
                await asyncio.sleep(0.1)
        else:
            log.warning("%s: cannot connect to the monitor %s", self.id, path)
            await asyncio.Event().wait()
        events = EventListener("MIGRATION")
        resumes = EventListener("RESUME")
        qmp.register_listener(events)
        qmp.register_listener(resumes)
        dest = asyncio.create_task(self._destination(qmp, resumes))
        try:
            while qmp.runstate == Runstate.RUNNING:
                if await control.next_status(qmp, events, 0.25) not in ("setup", "active"):
                    continue
                run = await query_status(qmp)
                if run.get("status") == "inmigrate":
                    continue
                await self._source(qmp, events)
                events.clear()
        except Exception as exc:  # the QEMU went away
            log.debug("%s: monitor closed: %s", self.id, exc)
        finally:  # also when the link is cancelled: its QEMU left the VF
            dest.cancel()
            await asyncio.gather(dest, return_exceptions=True)  # its QMP errors: seen
            record = self.record
            if record is not None and "result" not in record:
                if record["role"] == "source":
                    # QEMU went before _source saw the end (libvirt ends the source right
                    # after a migration): its events tell how the migration ended.
                    self.service.update(record, result=control.ended_as(events))
                else:  # killed after Load: the last step the destination reached
                    self.service.update(record, result=_destination_gone(record))
            with contextlib.suppress(Exception):
                await qmp.disconnect()

    async def _mailbox(self, state: str, words: list[int]) -> dict[str, Any]:
        server = self.service.server
        return await asyncio.to_thread(server.migration_command, self.fn.index, state,
                                       MAILBOX_TIMEOUT, words)

    async def _source(self, qmp: QMPClient, events: EventListener) -> None:
        if (await query_migrate(qmp)).get("status") not in ("setup", "active"):
            return
        t0 = time.perf_counter()
        record = self._new_record("source")
        vfstate.start_dirty_log(self.fn)
        try:  # QEMU's MSI-X state into the VF's own, so that the state carries it
            if self.service.faults.get(self.fn.index) == "no-msix":
                del self.service.faults[self.fn.index]
                raise VfnicError("not read (fault injected)")
            ecam = await self._ecam(qmp)
            await asyncio.to_thread(self.fn.pull_msix, ecam)
            self.service.update(record, msix_table="carried")
        except Exception as exc:  # VfnicError, QMP errors: the driver's fallback then
            self.service.update(record, msix_table=f"not carried: {exc}")
            log.warning("%s: MSI-X state not carried: %s", self.id, exc)
        coop = None
        if self.fn.migration_mode == MIGRATION_COOPERATIVE:
            coop = control.CooperativeSource(qmp, self._mailbox)
            try:
                await coop.start()
                ack = await coop.suspend()
                self.service.update(record, suspend_mailbox_ms=ack.get("mailbox_ms"),
                                    suspend_driver_us=ack.get("driver_us"),
                                    suspended_at_ms=round((time.perf_counter() - t0) * 1000, 1))
            except control.SuspendOvertaken as exc:  # no cancel: the VF goes as transparent
                self.service.update(record, suspend_overtaken=True)
                log.warning("%s: %s: the VF's state goes as in transparent mode", self.id, exc)
            except Exception as exc:  # MailboxTimeout, MigrationError, QMP errors
                self.service.update(record, error=str(exc))
                log.warning("%s: %s: cancelling the migration", self.id, exc)
                with contextlib.suppress(Exception):
                    await qmp.execute("migrate_cancel")
            finally:
                if coop.point:
                    self.service.update(record, suspend_point=coop.point)
                await coop.release()
                if coop.released_at is not None:
                    self.service.update(record, released_sync=coop.released_sync,
                                        released_at_ms=round((coop.released_at - t0) * 1000, 1))
        result = await control.wait_end(qmp, events)
        self.service.update(record, result=result,
                            total_ms=round((time.perf_counter() - t0) * 1000, 1))
        if result in ("failed", "cancelled"):
            # QEMU resumed the source (return-path): the VF goes on where it stopped.
            vfstate.run(self.fn)
            vfstate.stop_dirty_log(self.fn)
            self.service.update(record, vf_running=self.fn.migration.state.name == "RUNNING")
            if coop is not None:
                await coop.rollback()
                self.service.update(record, resumed=True)
            log.warning("%s: migration %s: the VF runs on here", self.id, result)
        else:
            vfstate.stop_dirty_log(self.fn)
        self.record = None

    async def _destination(self, qmp: QMPClient, resumes: EventListener) -> None:
        st = await query_status(qmp)
        if st.get("status") != "inmigrate":
            return
        try:
            self.address = await self._find_device(qmp)  # now: the main loop is free
        except Exception as exc:
            self.address = exc
        self._queue_replay()  # if Load came before the address, the replay goes now
        await self.loaded.wait()
        record = self.record or self._new_record("destination")
        t0 = time.perf_counter()
        outcome: dict[str, Any] = {"msix_restored": False, "early_access": False}
        try:
            if isinstance(self.address, Exception):
                raise self.address
            if self.replay is None:
                raise VfnicError("no replay queued")
            outcome = await self.replay
        except Exception as exc:
            self.service.update(record, replay_error=str(exc))
            log.error("%s: PCI config not restored in QEMU: %s", self.id, exc)
        vfstate.run(self.fn)
        if isinstance(self.address, int) and self.replay is None:
            outcome["early_access"] = not resumes.empty()
        # `vfnic migrate` sends `cont` on restored_at
        self.service.update(record, replay_ms=round((time.perf_counter() - t0) * 1000, 3),
                            restored_at=time.time(), **outcome)
        nic = self.service.server.nic
        if self.fn.migration_mode != MIGRATION_COOPERATIVE:
            # Transparent: the LAN learns the VF's new port now, while the guest is still
            # paused, so the first frames for it after `cont` already come here.
            await asyncio.to_thread(nic.switch.announce, self.fn, 1)
            self.service.update(record, announced_at=time.time())
        if resumes.empty():  # whoever sends `cont`: libvirt, `vfnic migrate`, a user
            await control.wait_runstate(qmp, lambda st: bool(st.get("running")), None,
                                        wake=resumes, poll=0.5)
        self.service.update(record, running_at=time.time())
        if self.undescribed is not None:
            self._describe(*self.undescribed)
            self.undescribed = None
        if self.fn.migration_mode == MIGRATION_COOPERATIVE:
            try:
                ack = await self._mailbox("resume", [0])
                self.service.update(record, resume_mailbox_ms=ack.get("mailbox_ms"),
                                    resume_driver_us=ack.get("driver_us"))
            except VfnicError as exc:
                self.service.update(record, resume_error=str(exc))
        else:  # and again once it runs, as QEMU's announce-self repeats
            await asyncio.to_thread(nic.switch.announce, self.fn, 2)
            self.service.update(record, announced=True)
        self.service.update(record, result="completed")

    async def _ecam(self, qmp: QMPClient) -> int:
        """Where the VF's config space lies in its QEMU's memory (q35's MMCONFIG)."""
        base = await qmp.execute("qom-get", {"path": "/machine/q35", "property": "MCFG"})
        if not isinstance(base, int) or base in (0, (1 << 64) - 1):
            raise VfnicError(f"no MMCONFIG window in this QEMU ({base})")
        address = await self._find_device(qmp)  # 0x80000000 | bus << 16 | devfn << 8
        return base + ((address >> 8 & 0xFFFF) << 12)

    async def _find_device(self, qmp: QMPClient) -> int:
        """The VF's bus/device/function in its QEMU, as a config address (0xcf8)."""
        buses = await query_pci(qmp)
        found = [d for b in buses for d in b.get("devices", [])
                 if d.get("qdev_id") == self.att.device_id]
        if len(found) != 1:
            raise VfnicError(f"device {self.att.device_id} not found in query-pci")
        dev = found[0]
        return 0x80000000 | int(dev["bus"]) << 16 | int(dev["slot"]) << 11 | \
            int(dev["function"]) << 8

    async def _replay_config(self, qmp: QMPClient, address: int) -> dict[str, Any]:
        """Write the guest's PCI config for this VF into the destination QEMU through the
        legacy config ports (0xcf8/0xcfc), 0xcf8 left as the guest had it. The commands
        are sent at once, in order (one monitor runs them in order): they are all queued
        before anyone's `cont`, which libvirt sends only once the source has completed.
        Returns what the record says of it: the MSI-X table back, a RESUME before the
        last reply (the guest may have run with its VF's config or table not back),
        and the steps' times (ms: the ports, counted from the replay's start, queued at
        Load, so QEMU's end of its incoming migration included; then 0xcf8 and the
        table)."""
        with self.fn.lock:
            config = bytes(self.fn.config.data[:0x100])

        def dword(off: int) -> int:
            return int.from_bytes(config[off:off + 4], "little")

        words = [(off, dword(off)) for off in REPLAYED_CONFIG if dword(off)]
        words.append((pci.COMMAND, dword(pci.COMMAND) & 0xFFFF))
        # MSI-X only if the state carries the guest's table (read from the source QEMU);
        # else it stays off here and the guest driver restores its own (the fallback).
        msix = bool(dword(CAP_MSIX) >> 16 & pci.MSIX_FLAGS_ENABLE) and self.fn.msix_programmed()
        if msix:  # MSI-X Message Control, after the BARs and the command register
            words.append((CAP_MSIX, dword(CAP_MSIX)))
        lines = ["i /w 0xcf8"]
        for off, value in words:
            lines += [f"o /w 0xcf8 {address | off:#x}", f"o /w 0xcfc {value:#x}"]
        resumes = EventListener("RESUME")
        qmp.register_listener(resumes)
        t0 = time.perf_counter()
        try:
            replies = await asyncio.gather(*(
                qmp.execute("human-monitor-command", {"command-line": line})
                for line in lines))
            # Then, side by side: 0xcf8 as the guest left it, and the MSI-X table by DMA
            # to BAR3 (the monitor has no guest-physical write).
            t1 = time.perf_counter()
            saved = re.findall(r"0x[0-9a-fA-F]+", str(replies[0]))
            last: list[Awaitable[Any]] = []
            if saved:
                last.append(qmp.execute("human-monitor-command",
                                        {"command-line": f"o /w 0xcf8 {saved[-1]}"}))
            if msix:
                last.append(asyncio.to_thread(self.fn.push_msix_table))
            await asyncio.gather(*last)
            return {"msix_restored": msix, "early_access": not resumes.empty(),
                    "replay_steps_ms": {"ports": round((t1 - t0) * 1000, 2),
                                        "then": round((time.perf_counter() - t1) * 1000, 2)}}
        finally:
            qmp.remove_listener(resumes)


# -- the service: every VF of one NIC ------------------------------------------------------


class VmStateService:
    """A thread with an asyncio loop running a VfLink for every attached VF."""

    def __init__(self, server: NicServer) -> None:
        self.server = server
        self.history: list[dict[str, Any]] = []
        self.seq = 0  # every record's number, never reused (history keeps the last 100)
        # test hook: VF -> "corrupt" | "oversize" (next Save) | "no-msix" (next migration
        # does not read QEMU's MSI-X state: the guest driver's fallback restores it)
        self.faults: dict[int, str] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # update() changed a record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vfnic-vmstate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(SCAN_INTERVAL + 5)

    def add_record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.seq += 1
            record["seq"] = self.seq
            self.history.append(record)
            del self.history[:-100]

    def update(self, record: dict[str, Any], **fields: Any) -> None:
        """Change a record: under the lock (readers copy records whole), waking whoever
        waits for one (a result, an error, the restore)."""
        with self._changed:
            record.update(fields)
            self._changed.notify_all()

    def records(self, settle: float = 0.0, since: int = 0) -> list[dict[str, Any]]:
        """The migrations seen so far (those numbered after ``since``); with ``settle``,
        first wait up to that many seconds for the newest one to have its result."""
        deadline = time.monotonic() + settle
        with self._changed:
            while True:
                done = not self.history or "result" in self.history[-1]
                left = deadline - time.monotonic()
                if done or left <= 0:
                    return [dict(r) for r in self.history if r["seq"] > since]
                self._changed.wait(left)

    def wait_record(self, role: str, key: str, since: int, timeout: float) -> dict[str, Any]:
        """The newest record of ``role`` numbered after ``since`` once it has ``key`` (or
        an error), waiting up to ``timeout`` s: one request instead of a polling client."""
        deadline = time.monotonic() + min(timeout, MAX_WAIT)
        with self._changed:
            while True:
                mine = [r for r in self.history if r["seq"] > since and r["role"] == role]
                if mine and (key in mine[-1] or "error" in mine[-1]):
                    return dict(mine[-1])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VfnicError(f"no {role} record with {key!r} after {timeout:g} s")
                self._changed.wait(left)  # every change goes through update()

    def control(self, req: dict[str, Any]) -> Any:
        """The management operations this layer adds to `vfnic serve`."""
        if req.get("op") == "migrations":
            return self.records(float(req.get("settle", 0.0)), int(req.get("since", 0)))
        if req.get("op") == "migration-wait":
            return self.wait_record(str(req.get("role")), str(req.get("key")),
                                    int(req.get("since", 0)), float(req.get("timeout", 10.0)))
        fault = str(req.get("fault"))
        if fault not in ("corrupt", "oversize", "no-msix", "none"):
            raise VfnicError(f"unknown vmstate fault {fault!r}")
        vf = self.server.nic.vf(int(req.get("vf", -1))).index
        if fault == "none":
            self.faults.pop(vf, None)
        else:
            self.faults[vf] = fault
        return None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        links: dict[tuple[int, int], asyncio.Task[None]] = {}
        while not self._stop.is_set():
            live = set()
            for fn in self.server.nic.vfs:
                session = fn.session
                if session is None:
                    continue
                try:
                    pid = peer_pid(session.endpoint.sock)
                except OSError:
                    continue
                key = (fn.index, pid)
                live.add(key)
                if key not in links:
                    links[key] = asyncio.create_task(self._link(fn, pid))
            for key in [k for k in links if k not in live]:
                links.pop(key).cancel()
            await asyncio.sleep(SCAN_INTERVAL)
        for task in links.values():
            task.cancel()
        await asyncio.gather(*links.values(), return_exceptions=True)

    async def _link(self, fn: PciFunction, pid: int) -> None:
        att = find_attachment(pid, self.server.servers[fn.name].path)
        if att is None:
            return
        try:
            await VfLink(self, fn, att).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: following QEMU %d failed", fn.name, pid)


def attach(server: NicServer) -> VmStateService:
    """Wire the helper service into a NIC server (the `vfnic serve` command does)."""
    service = VmStateService(server)
    server.services.append(service)
    for op in ("migrations", "migration-wait", "vmstate-fault"):
        server.control_ops[op] = service.control
    return service
