"""The NIC: one PF and N VFs, each function served on its own vfio-user socket.

This layer wires the register bank's doorbells to device behaviour (reset,
link, interrupt causes) and owns the runtime folder:
DIR/pf.sock, DIR/vf0.sock ... and DIR/control.sock (management, JSON lines).
"""

from __future__ import annotations

import fcntl
import grp
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from vfnic.device import pci
from vfnic.device.egress import EgressScheduler
from vfnic.device.function import CAP_MSIX, PciFunction
from vfnic.device.pfagent import PfAgent
from vfnic.device.policy import (
    LINK_DISABLE,
    LINK_STATE_NAMES,
    MAX_QOS,
    MAX_RATE,
    MAX_VLAN,
    MIGRATION_MODES,
)
from vfnic.device.switch import Switch
from vfnic.device.throttle import Throttle
from vfnic.errors import (
    FolderError,
    PolicyError,
    ServerUnreachable,
    SnapshotError,
    UsageError,
    VfnicError,
)
from vfnic.regs import table as T
from vfnic.regs.bank import WriteHook
from vfnic.regs.table import Register
from vfnic.vfiouser import wire
from vfnic.vfiouser.server import FunctionServer, accept_retry, listen_unix

log = logging.getLogger(__name__)

DEFAULT_VFS = 4

# EICR cause bit -> MSI-X vector
VECTOR_OF_CAUSE = {**{q: q for q in range(T.NUM_QUEUES)}, 30: 2, 31: 3}


def default_mac(nic_id: int, fn: int) -> bytes:
    """Locally administered unicast MAC: 02:56:46:<nic>:<fn>:01 (0x56 0x46 = "VF")."""
    return bytes([0x02, 0x56, 0x46, nic_id & 0xFF, fn & 0xFF, 0x01])


# What a guest write does beyond storing the value, by register (keys are the
# table's identifiers, so a misspelt register fails at import). Each entry makes the
# function's hook: make(nic, fn) -> hook(register name, value).
HookMaker = Callable[["Nic", PciFunction], WriteHook]


def _ctl_hook(ring: T.Ring, q: int) -> HookMaker:
    def make(_nic: Nic, fn: PciFunction) -> WriteHook:
        dp = fn.datapath
        return lambda _n, _v: dp.on_ctl_write(ring, q)
    return make


def _tail_hook(ring: T.Ring, q: int) -> HookMaker:
    def make(_nic: Nic, fn: PciFunction) -> WriteHook:
        dp = fn.datapath
        return lambda _n, _v: dp.on_tail_write(ring, q)
    return make


WRITE_HOOKS: dict[Register, HookMaker] = {
    T.CTRL: lambda nic, fn: lambda _n, v: nic._on_ctrl(fn, v),
    T.EICS: lambda nic, fn: lambda _n, v: nic.raise_cause(fn, v),  # software-set causes
    T.EIMS: lambda nic, fn: lambda _n, _v: nic._deliver(fn),  # unmasked pending causes fire
    **{ring.XDCTL(q): _ctl_hook(ring, q) for ring in (T.RX, T.TX) for q in range(T.NUM_QUEUES)},
    **{ring.DT(q): _tail_hook(ring, q) for ring in (T.RX, T.TX) for q in range(T.NUM_QUEUES)},
}
VF_WRITE_HOOKS: dict[Register, HookMaker] = {
    T.VFMBDOORBELL: lambda nic, fn: lambda _n, v: nic.pf_agent.on_vf_doorbell(fn, v),
    # admin MAC / spoofchk policy: the switch filters on the address the PF approved
    T.RAL: lambda nic, fn: lambda _n, _v: nic._on_mac_register(fn),
    T.RAH: lambda nic, fn: lambda _n, _v: nic._on_mac_register(fn),
}


class _Burst:
    """``Nic.one_interrupt()``'s context (a plain class: entered once per burst, also
    for a lone frame). Nested bursts leave the signalling to the outer one, which
    tells afterwards whether the burst starved (``Nic._end_burst``)."""

    __slots__ = ("_nic", "_outer", "starved")

    def __init__(self, nic: Nic) -> None:
        self._nic = nic
        self._outer = False
        self.starved = False

    def __enter__(self) -> None:
        nic = self._nic
        if nic._held is None:
            nic._held = set()
            self._outer = True

    def __exit__(self, *exc: object) -> None:
        if self._outer:
            self.starved = self._nic._end_burst()


class Nic:
    pf_agent: PfAgent
    switch: Switch

    def __init__(self, num_vfs: int = DEFAULT_VFS, nic_id: int = 0, link_speed: int = 0) -> None:
        if not 0 <= num_vfs <= T.MAX_VFS:
            raise UsageError(f"--vfs must be between 0 and {T.MAX_VFS}")
        # The uplink port's line rate (Mbit/s, 0: unlimited) and its egress scheduler,
        # which gives min_tx_rate / max_tx_rate their meaning under contention.
        self.egress = EgressScheduler(link_speed)
        self.lock = threading.RLock()
        self._held: set[PciFunction] | None = None  # functions whose interrupt waits (burst)
        self.burst_rx: list[PciFunction] = []  # functions with frames pending in the burst
        self.nic_id = nic_id
        self.pf = PciFunction(self.lock, True, 0, default_mac(nic_id, 0xFF), T.MAX_VFS, num_vfs)
        self.vfs = [
            PciFunction(self.lock, False, i, default_mac(nic_id, i), T.MAX_VFS)
            for i in range(num_vfs)
        ]
        self.switch = Switch(self)
        self.pf_agent = PfAgent(self)
        self.throttle = Throttle(self._deferred_interrupt)  # EITRn
        self.rx_posted = threading.Event()  # a function posted RX descriptors (RDT)
        for fn in self.functions:
            self._wire(fn)
            self._update_link(fn)

    @property
    def functions(self) -> list[PciFunction]:
        return [self.pf, *self.vfs]

    def vf(self, index: int) -> PciFunction:
        if not 0 <= index < len(self.vfs):
            raise UsageError(f"no VF {index} (this NIC has {len(self.vfs)})")
        return self.vfs[index]

    def function(self, name: str) -> PciFunction:
        for fn in self.functions:
            if fn.name == name:
                return fn
        have = ", ".join(f.name for f in self.functions)
        raise UsageError(f"no function {name!r} (have: {have})")

    # -- register behaviour -------------------------------------------------------------

    def _wire(self, fn: PciFunction) -> None:
        fn.nic = self
        hooks = {**WRITE_HOOKS, **({} if fn.is_pf else VF_WRITE_HOOKS)}
        for reg, make in hooks.items():
            fn.bank.on_write(reg, make(self, fn))

    def _on_ctrl(self, fn: PciFunction, value: int) -> None:
        if value & T.CTRL_RST:  # self-clearing software reset of the function's registers
            fn.software_reset()
        self._update_link(fn)

    def _update_link(self, fn: PciFunction) -> None:
        up = bool(fn.bank.get(T.CTRL) & T.CTRL_SLU) and fn.link_state != LINK_DISABLE
        was = bool(fn.bank.get(T.STATUS) & T.STATUS_LU)
        if up:
            fn.bank.set_bits(T.STATUS, T.STATUS_LU)
        else:
            fn.bank.clear_bits(T.STATUS, T.STATUS_LU)
        if up != was:
            self.raise_cause(fn, T.EICR_LSC)
            if not fn.is_pf:
                self.pf_agent.notify_link(fn)

    def raise_cause(self, fn: PciFunction, bits: int) -> None:
        fn.bank.set_bits(T.EICR, bits)
        if self._held is not None:  # a burst of frames: one interrupt at its end
            self._held.add(fn)
        else:
            self._deliver(fn)

    @property
    def in_burst(self) -> bool:
        """Whether a burst (``one_interrupt``) is being delivered."""
        return self._held is not None

    def one_interrupt(self) -> _Burst:
        """Hold interrupts while a burst of frames is delivered, then signal each function's
        pending causes once (per batch, not per frame). Called with the NIC lock held."""
        return _Burst(self)

    def _end_burst(self) -> bool:
        """Deliver each receiving function's frames as one batch, then its interrupt.
        Returns whether the burst starved: frames were missed (no RX descriptors) and
        every function that got frames missed some too."""
        rx = iter(self.burst_rx)
        self.burst_rx = []
        starved = fed = False
        try:
            for fn in rx:
                done, missed = fn.datapath.flush()
                fed = fed or (done > 0 and not missed)
                starved = starved or missed > 0
            return starved and not fed
        finally:
            self.burst_rx.extend(rx)  # not flushed (an error): with the next burst
            held, self._held = self._held, None
            for fn in held or ():
                self._deliver(fn)

    def _deliver(self, fn: PciFunction) -> None:
        """Signal every pending, unmasked cause (MSI-X vector per cause, else MSI/INTx)."""
        pending = fn.bank.get(T.EICR) & fn.bank.get(T.EIMS)
        if not pending:
            return
        msix_on = fn.config.get(CAP_MSIX + pci.MSIX_FLAGS, 2) & pci.MSIX_FLAGS_ENABLE
        if msix_on:
            now = time.monotonic()
            for bit, vector in VECTOR_OF_CAUSE.items():
                if pending & (1 << bit) and self.throttle.allow(
                        fn, vector, fn.bank.get(T.EITR(vector)), now):
                    fn.signal(wire.PciIrq.MSIX, vector)
        elif not fn.signal(wire.PciIrq.MSI, 0) and fn.is_pf:
            if not fn.config.get(pci.COMMAND, 2) & pci.COMMAND_INTX_DISABLE:
                fn.signal(wire.PciIrq.INTX, 0)

    def _deferred_interrupt(self, fn: PciFunction, vector: int) -> None:
        """A vector's EITR interval ended with an interrupt held back: signal it if
        one of its causes is still pending and enabled."""
        with self.lock:
            pending = fn.bank.get(T.EICR) & fn.bank.get(T.EIMS)
            msix_on = fn.config.get(CAP_MSIX + pci.MSIX_FLAGS, 2) & pci.MSIX_FLAGS_ENABLE
            if not msix_on or not any(pending & (1 << bit) for bit, v in
                                      VECTOR_OF_CAUSE.items() if v == vector):
                return
            if self.throttle.allow(fn, vector, fn.bank.get(T.EITR(vector)), time.monotonic()):
                fn.signal(wire.PciIrq.MSIX, vector)

    def set_link_state(self, vf: int, state: str) -> None:
        names = {v: k for k, v in LINK_STATE_NAMES.items()}
        if state not in names:
            raise UsageError(f"link state must be one of {', '.join(names)}")
        fn = self.vf(vf)
        with self.lock:
            fn.link_state = names[state]
            self._update_link(fn)

    # -- the host's VF settings (vfnic.device.policy) ------------------------------------

    def mac_owner(self, mac: bytes, exclude: PciFunction | None = None) -> PciFunction | None:
        """The function (other than ``exclude``) whose address ``mac`` is."""
        for fn in self.functions:
            if fn is exclude:
                continue
            if (fn.mac == mac) if fn.is_pf else mac in (fn.perm_mac, fn.rx_mac):
                return fn
        return None

    def mac_refusal(self, fn: PciFunction, mac: bytes) -> str | None:
        """Why VF ``fn`` may not take ``mac`` itself (mailbox or RAL/RAH), or None."""
        if mac[0] & 1:
            return "not a unicast address"
        if fn.policy.mac is not None and mac != fn.policy.mac and not fn.policy.trust:
            return f"the host set {fn.policy.mac.hex(':')} and the VF is not trusted"
        owner = self.mac_owner(mac, fn)
        if owner is not None:
            return f"in use by {owner.name}"
        return None

    def _on_mac_register(self, fn: PciFunction) -> None:
        """A VF wrote RAL/RAH: the switch filters on the new address only if the PF
        would grant it through the mailbox; else the VF keeps receiving (and, with
        spoofchk, sending) as its approved address (rx_mac)."""
        if not fn.bank.get(T.RAH) & T.RAH_AV:
            return
        mac = fn.mac
        if mac == fn.rx_mac:
            return
        why = None if mac == fn.perm_mac else self.mac_refusal(fn, mac)
        if why is not None:
            fn.policy.mac_refused += 1
            if fn.policy.mac_refused == 1 or log.isEnabledFor(logging.DEBUG):
                log.warning("%s: RAL/RAH %s ignored: %s", fn.name, mac.hex(":"), why)
            return
        fn.rx_mac = mac

    def set_migration_mode(self, vf: int, mode: str) -> None:
        """`vfnic link set DIR vf N migration transparent|cooperative`."""
        if mode not in MIGRATION_MODES:
            raise UsageError(f"migration mode must be one of {', '.join(MIGRATION_MODES)}")
        fn = self.vf(vf)
        with self.lock:
            fn.migration_mode = mode

    @staticmethod
    def parse_mac(mac_text: str) -> bytes:
        try:
            mac = bytes(int(x, 16) for x in mac_text.split(":"))
        except ValueError:
            mac = b""
        if len(mac) != 6 or mac[0] & 1:
            raise PolicyError(f"bad unicast MAC address {mac_text!r}")
        return mac

    def set_vf_mac(self, vf: int, mac_text: str) -> None:
        """`ip link set PF vf N mac MAC`: the host assigns the VF's MAC."""
        self.set_vf(vf, {"mac": mac_text})

    def set_vf(self, vf: int, settings: dict[str, Any]) -> None:
        """`ip link set PF vf N [mac M] [vlan V [qos Q]] [spoofchk on|off] [trust on|off]
        [max_tx_rate R] [min_tx_rate R] [state S]`: everything is checked first, then
        applied together (PolicyError names the first bad setting)."""
        fn = self.vf(vf)
        known = {"mac", "vlan", "qos", "spoofchk", "trust", "max_tx_rate", "min_tx_rate",
                 "state"}
        unknown = set(settings) - known
        if unknown:
            raise PolicyError(f"unknown VF setting {sorted(unknown)[0]!r}")

        def flag(name: str) -> bool | None:
            v = settings.get(name)
            if v is None:
                return None
            if v in (True, "on"):
                return True
            if v in (False, "off"):
                return False
            raise PolicyError(f"{name} must be on or off")

        def number(name: str, top: int) -> int | None:
            v = settings.get(name)
            if v is None:
                return None
            try:
                n = int(v)
            except (TypeError, ValueError):
                n = -1
            if not 0 <= n <= top or isinstance(v, bool):
                raise PolicyError(f"{name} must be between 0 and {top}")
            return n

        spoofchk, trust = flag("spoofchk"), flag("trust")
        vlan, qos = number("vlan", MAX_VLAN), number("qos", MAX_QOS)
        max_rate, min_rate = number("max_tx_rate", MAX_RATE), number("min_tx_rate", MAX_RATE)
        state = settings.get("state")
        names = {v: k for k, v in LINK_STATE_NAMES.items()}
        if state is not None and state not in names:
            raise PolicyError(f"link state must be one of {', '.join(names)}")
        mac: bytes | None = None
        clear_mac = False
        with self.lock:
            pol = fn.policy
            if "mac" in settings:
                text = str(settings["mac"])
                if text == "00:00:00:00:00:00":
                    clear_mac = True  # the VF may choose its MAC again
                else:
                    mac = self.parse_mac(text)
                    owner = self.mac_owner(mac, fn)
                    if owner is not None:
                        raise PolicyError(f"MAC {text} is already used by {owner.name}")
            if qos and not (vlan if vlan is not None else pol.vlan):
                raise PolicyError("qos needs a vlan")
            mx = pol.max_tx_rate if max_rate is None else max_rate
            mn = pol.min_tx_rate if min_rate is None else min_rate
            if mx and mn > mx:
                raise PolicyError(f"min_tx_rate {mn} exceeds max_tx_rate {mx}")
            if min_rate is not None:  # the floors must fit in the line (ice's rule)
                self.egress.check_min_rates(
                    mn + sum(v.policy.min_tx_rate for v in self.vfs if v is not fn))
            # checked: apply
            if clear_mac:
                pol.mac = None
            if mac is not None:
                pol.mac = mac
                fn.perm_mac = mac
                fn.load_mac(mac)
            if spoofchk is not None:
                pol.spoofchk = spoofchk
            if trust is not None:
                pol.trust = trust
            if vlan is not None:
                pol.vlan = vlan
                pol.qos = qos or 0
            elif qos is not None:
                pol.qos = qos
            if max_rate is not None:
                pol.max_tx_rate = max_rate
                pol.bucket.configure(max_rate)
            if min_rate is not None:
                pol.min_tx_rate = min_rate
            if fn in self.egress.shares and (max_rate, min_rate) != (None, None):
                self.egress.reallocate()
            if state is not None:
                fn.link_state = names[state]
                self._update_link(fn)
            log.info("vf %d settings: %s", vf, settings)

    def check_restore(self, fn: PciFunction, restored_mac: bytes) -> None:
        """Refuse (SnapshotError) a restored state whose MAC another function here uses."""
        mac = fn.policy.mac or restored_mac
        owner = self.mac_owner(mac, fn)
        if owner is not None:
            raise SnapshotError(f"restored MAC {mac.hex(':')} is in use by {owner.name} "
                                "on this NIC")

    def after_restore(self, fn: PciFunction, host_link_state: int) -> None:
        """The destination host's settings win over the stream's (MAC, link state)."""
        fn.link_state = host_link_state
        if fn.policy.mac is not None and fn.perm_mac != fn.policy.mac:
            fn.perm_mac = fn.policy.mac
            fn.load_mac(fn.policy.mac)
        else:
            fn.rx_mac = fn.perm_mac
            self._on_mac_register(fn)  # the stream's RAL/RAH, if this NIC grants it

    # -- views for the management socket ---------------------------------------------

    def link_info(self, servers: dict[str, FunctionServer] | None = None) -> dict[str, Any]:
        def one(fn: PciFunction) -> dict[str, Any]:
            srv = (servers or {}).get(fn.name)
            mac = fn.mac if fn.is_pf else fn.rx_mac
            info: dict[str, Any] = {
                "function": fn.name,
                "mac": ":".join(f"{b:02x}" for b in mac),
                "link": "up" if fn.bank.get(T.STATUS) & T.STATUS_LU else "down",
                "state": LINK_STATE_NAMES.get(fn.link_state, f"unknown({fn.link_state})"),
                "attached": bool(srv and srv.attached),
                "migration": fn.migration.state.name,
                "migration_mode": fn.migration_mode,
                "dropped_while_stopped": fn.stopped_drops,
            }
            if fn.is_pf:  # the uplink port: line rate (Mbit/s, 0: unlimited)
                info["speed"] = self.egress.link_speed
            if not fn.is_pf:
                pol = fn.policy
                info |= {
                    "admin_mac": pol.mac is not None,
                    "vlan": pol.vlan, "qos": pol.qos,
                    "spoofchk": pol.spoofchk, "trust": pol.trust,
                    "max_tx_rate": pol.max_tx_rate, "min_tx_rate": pol.min_tx_rate,
                    # Mbit/s the uplink's scheduler gives it now (0: no frames waiting)
                    "tx_share": round(self.egress.allocated.get(fn, 0.0) * 8 / 1e6, 3),
                    "spoof_dropped": pol.spoof_dropped, "vlan_dropped": pol.vlan_dropped,
                    "mac_refused": pol.mac_refused,
                    "readonly_sessions": len(srv.readonly) if srv else 0,
                }
            return info

        with self.lock:
            return {"pf": one(self.pf), "vfs": [one(vf) | {"vf": vf.index} for vf in self.vfs]}

    def regs(self, name: str) -> list[dict[str, Any]]:
        fn = self.function(name)
        with self.lock:
            return [
                {"name": r.name, "offset": r.offset, "access": r.access.value,
                 "value": fn.bank.get(r.name)}
                for r in fn.bank.table
            ]

    def counters(self, name: str) -> dict[str, int]:
        """The function's host-side event counts (PciFunction.counters) and the
        vfio-user commands its client sent (``message.<COMMAND>``), since it started."""
        fn = self.function(name)
        with self.lock:
            out = dict(fn.counters)
            out["server_cpu_us"] = int(time.process_time() * 1e6)  # the whole server
            session = fn.session
            if session is not None:
                for cmd, n in session.endpoint.received.items():
                    out["message." + wire.command_name(cmd).removeprefix("VFIO_USER_")] = n
        return out

    def config_dump(self, name: str) -> str:
        """The function's whole config space (4 KiB) in `lspci -xxxx` form, which
        `lspci -F FILE` decodes: the PF at 01:00.0, VF n at 01:00.(n+1) (First VF
        Offset 1, VF Stride 1), as a host with the NIC in slot 1 would see them."""
        fn = self.function(name)
        with self.lock:
            data = fn.config.read(0, pci.CONFIG_SIZE)
        kind = "PF" if fn.is_pf else f"VF {fn.index}"
        lines = [f"01:00.{0 if fn.is_pf else fn.index + 1} Ethernet controller: vfnic {kind}"]
        for off in range(0, len(data), 16):
            lines.append(f"{off:02x}: " + " ".join(f"{b:02x}" for b in data[off:off + 16]))
        return "\n".join(lines) + "\n"


MAX_CONTROL_LINE = 1 << 20  # bytes per request line on control.sock
MAX_CONTROL_CONNS = 16  # concurrent control.sock connections
CONTROL_IDLE = 60.0  # seconds a control.sock connection may stay silent
MAX_WAIT = 120.0  # longest wait a control request may ask for (mailbox acks)
LOCK_NAME = ".vfnic.lock"


def prepare_folder(directory: Path, gid: int | None = None) -> int:
    """Create DIR owner-only, or accept it only if it is a real folder of ours that
    nobody else can write; lock it against a second `vfnic serve`. Returns the lock
    fd (FolderError with a one-line reason otherwise)."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise FolderError(f"cannot create {directory}: {exc.strerror}") from exc
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(directory):
            raise FolderError(f"{directory} is a symlink: refusing to serve in it") from exc
        raise FolderError(f"{directory} is not a usable folder: {exc.strerror}") from exc
    try:
        st = os.fstat(dfd)
        if st.st_uid != os.geteuid():
            raise FolderError(f"{directory} is owned by uid {st.st_uid}, not by the serving "
                              f"user (uid {os.geteuid()}): refusing to serve in it")
        if st.st_mode & 0o022:
            raise FolderError(f"{directory} is writable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):o}): refusing to serve in it")
        if gid is not None:
            os.fchown(dfd, -1, gid)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode) | 0o010)  # the group may reach the sockets
        try:
            lock = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600, dir_fd=dfd)
        except OSError as exc:
            raise FolderError(f"cannot lock {directory}: {exc.strerror}") from exc
    finally:
        os.close(dfd)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(lock, 32, 0).decode(errors="replace").strip() or "?"
        os.close(lock)
        raise FolderError(f"{directory} is already served by another vfnic serve "
                          f"(pid {holder})") from exc
    os.ftruncate(lock, 0)
    os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
    return lock


def group_id(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise UsageError(f"no group {group!r}") from None


class Service(Protocol):
    """Something an upper layer runs alongside a NicServer."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


class NicServer:
    """A Nic with its sockets in a runtime folder.

    Trust model: whoever can connect to a socket may use it (the file mode is the
    gate: owner-only, or a group with ``group``); DIR/control.sock is the host's
    (VF settings, migration control); DIR/vfN.sock is owned by its first client
    (QEMU), any other connection meanwhile is read-only."""

    def __init__(self, directory: str | os.PathLike[str], num_vfs: int = DEFAULT_VFS,
                 uplink: str | None = None, nic_id: int = 0, busy_poll_us: int = 0,
                 group: str | None = None, link_speed: int = 0) -> None:
        self.dir = Path(directory)
        gid = group_id(group)
        mode = 0o660 if gid is not None else 0o600
        self._lock_fd = prepare_folder(self.dir, gid)
        try:
            self._setup(num_vfs, uplink, nic_id, busy_poll_us, mode, gid, link_speed)
        except BaseException:
            for srv in getattr(self, "servers", {}).values():
                srv.stop()
            os.close(self._lock_fd)
            raise

    def _setup(self, num_vfs: int, uplink: str | None, nic_id: int, busy_poll_us: int,
               mode: int, gid: int | None, link_speed: int) -> None:
        self.nic = Nic(num_vfs, nic_id, link_speed)
        if uplink:
            from vfnic.device.switch import TapUplink

            self.nic.switch.uplink = TapUplink(uplink)
        self.servers: dict[str, FunctionServer] = {}
        for fn in self.nic.functions:
            path = str(self.dir / f"{fn.name}.sock")
            self.servers[fn.name] = FunctionServer(fn, path, fn.name, busy_poll_us / 1e6,
                                                   mode, gid)
        self.control_path = str(self.dir / "control.sock")
        self.control = listen_unix(self.control_path, 16, mode, gid)
        self._stopped = threading.Event()
        # Management operations added by the layers above (`vfnic serve` wires the
        # migration layer in): op -> handler(request); services started and stopped
        # with the server.
        self.services: list[Service] = []
        self.control_ops: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self._control_conns = 0
        self._control_lock = threading.Lock()

    def start(self) -> None:
        for srv in self.servers.values():
            srv.start()
        if self.nic.switch.uplink is not None:
            self.nic.switch.uplink.start(self.nic.switch)
        threading.Thread(target=self._control_loop, name="vfnic-control", daemon=True).start()
        for service in self.services:
            service.start()

    def stop(self) -> None:
        self._stopped.set()
        for service in self.services:
            service.stop()
        for srv in self.servers.values():
            srv.stop()
        if self.nic.switch.uplink is not None:
            self.nic.switch.uplink.close()
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.control.close()
        try:
            os.unlink(self.control_path)
        except OSError:
            pass
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)  # releases the folder lock

    # -- management socket: one JSON object per line each way ------------------------

    def _control_loop(self) -> None:
        while True:
            conn = accept_retry(self.control, self._stopped, "control.sock")
            if conn is None:
                return
            try:
                with self._control_lock:
                    busy = self._control_conns >= MAX_CONTROL_CONNS
                    if not busy:
                        self._control_conns += 1
                if busy:
                    log.warning("control.sock: refused a connection (%d open)",
                                MAX_CONTROL_CONNS)
                    conn.settimeout(0.5)
                    conn.sendall(json.dumps({"ok": False, "error": "too many control "
                                             "connections"}).encode() + b"\n")
                    conn.close()
                    continue
                threading.Thread(target=self._control_conn, args=(conn,), daemon=True,
                                 name="vfnic-control-conn").start()
            except Exception as exc:  # this connection only
                log.warning("control.sock: dropped a connection: %s", exc)
                conn.close()
                with self._control_lock:
                    self._control_conns = max(0, self._control_conns - 1)

    def _control_conn(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(CONTROL_IDLE)
            with conn, conn.makefile("rwb") as f:
                while True:
                    line = f.readline(MAX_CONTROL_LINE + 1)
                    if not line:
                        return
                    if len(line) > MAX_CONTROL_LINE:
                        log.warning("control.sock: request line over %d bytes: closed",
                                    MAX_CONTROL_LINE)
                        f.write(json.dumps({"ok": False, "error": "request line too long"})
                                .encode() + b"\n")
                        f.flush()
                        return
                    reply: dict[str, Any]
                    try:
                        req = json.loads(line)
                        if not isinstance(req, dict):
                            raise UsageError("request must be a JSON object")
                        reply = {"ok": True, "result": self.control_request(req)}
                    except VfnicError as exc:
                        reply = {"ok": False, "error": str(exc), "errno": exc.errno}
                    except (ValueError, TypeError, KeyError, RecursionError) as exc:
                        reply = {"ok": False, "error": f"bad request: {exc}"}
                    f.write(json.dumps(reply).encode() + b"\n")
                    f.flush()
        except (OSError, TimeoutError):
            pass  # idle too long, or the peer went away
        except Exception:
            log.exception("control.sock: request failed")
        finally:
            with self._control_lock:
                self._control_conns -= 1

    def migration_command(self, vf: int, state: str, timeout: float,
                          words: list[int] | None = None) -> dict[str, Any]:
        """Pass a migration command to the VF driver through the mailbox and wait
        for its acknowledgement (the 2015 prototype's `ip link set PF vf N state X`)."""
        from vfnic.regs.mailbox import MsgType

        self.nic.vf(vf)
        pending = self.nic.pf_agent.send_and_wait(vf, MsgType[MIGRATION_COMMANDS[state]],
                                                  timeout, words)
        return {
            "vf": vf,
            "command": state,
            "acked": True,
            "mailbox_ms": round(pending.rtt * 1000, 3),
            # The driver reports how long it took, in microseconds, in reply word 1.
            "driver_us": pending.reply[1] if len(pending.reply) > 1 else None,
        }

    def control_request(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        if op == "link-show":
            return self.nic.link_info(self.servers)
        if op == "regs":
            return self.nic.regs(str(req.get("function")))
        if op == "config":
            return self.nic.config_dump(str(req.get("function")))
        if op == "counters":
            return self.nic.counters(str(req.get("function")))
        if op == "vf-state":
            state = str(req.get("state"))
            vf = int(req.get("vf", -1))
            if state in MIGRATION_COMMANDS:
                words = [int(w) & 0xFFFFFFFF for w in req.get("args", [])][:7]
                timeout = min(max(float(req.get("timeout", 5.0)), 0.0), MAX_WAIT)
                return self.migration_command(vf, state, timeout, words)
            self.nic.set_link_state(vf, state)
            return None
        if op == "announce":
            fn = self.nic.vf(int(req.get("vf", -1)))
            return self.nic.switch.announce(fn, int(req.get("count", 1)))
        if op == "vf-migration":
            self.nic.set_migration_mode(int(req.get("vf", -1)), str(req.get("mode")))
            return None
        if isinstance(op, str) and op in self.control_ops:
            return self.control_ops[op](req)
        if op == "vf-mac":
            self.nic.set_vf_mac(int(req.get("vf", -1)), str(req.get("mac")))
            return None
        if op == "vf-set":
            settings = req.get("settings")
            if not isinstance(settings, dict):
                raise UsageError("vf-set needs a settings object")
            self.nic.set_vf(int(req.get("vf", -1)), settings)
            return None
        raise UsageError(f"unknown management operation {op!r}")


MIGRATION_COMMANDS = {
    "migrate": "MIGRATE",
    "cancelmigration": "CANCEL_MIGRATION",
    "suspend": "SUSPEND",
    "resume": "RESUME",
}


def control_call(directory: str | os.PathLike[str], req: dict[str, Any],
                 timeout: float = 30.0) -> Any:
    """Send one management request to a running `vfnic serve`; returns its result.

    Raises ServerUnreachable (no server in ``directory``, it died or timed out) or
    UsageError (the server refused the request: its one-line reason)."""
    path = Path(directory) / "control.sock"
    if not path.exists():
        raise ServerUnreachable(f"no vfnic server in {directory} (no control.sock)")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(req).encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline()
    except OSError as exc:
        raise ServerUnreachable(f"cannot reach the vfnic server in {directory}: {exc}") from exc
    if not line:
        raise ServerUnreachable(f"the vfnic server in {directory} closed the connection")
    try:
        reply = json.loads(line)
    except ValueError as exc:
        raise ServerUnreachable(f"the vfnic server in {directory} sent a bad reply") from exc
    if not reply.get("ok"):
        err = reply.get("errno")
        raise UsageError(reply.get("error", "request failed"),
                         err if isinstance(err, int) else None)
    return reply.get("result")
