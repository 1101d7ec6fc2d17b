"""The NIC: one PF and N VFs, each function served on its own vfio-user socket.

This layer wires the register bank's doorbells to device behaviour (reset,
link, interrupt causes) and owns the runtime folder:
DIR/pf.sock, DIR/vf0.sock ... and DIR/control.sock (management, JSON lines).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vfnic.device import pci
from vfnic.device.function import (
    CAP_MSIX,
    LINK_DISABLE,
    LINK_STATE_NAMES,
    PciFunction,
)
from vfnic.errors import UsageError, VfnicError
from vfnic.regs import table as T
from vfnic.vfiouser import wire
from vfnic.vfiouser.server import FunctionServer

log = logging.getLogger(__name__)

DEFAULT_VFS = 4

# EICR cause bit -> MSI-X vector
VECTOR_OF_CAUSE = {**{q: q for q in range(T.NUM_QUEUES)}, 30: 2, 31: 3}


def default_mac(nic_id: int, fn: int) -> bytes:
    """Locally administered unicast MAC: 02:56:46:<nic>:<fn>:01 (0x56 0x46 = "VF")."""
    return bytes([0x02, 0x56, 0x46, nic_id & 0xFF, fn & 0xFF, 0x01])


class Nic:
    def __init__(self, num_vfs: int = DEFAULT_VFS, nic_id: int = 0) -> None:
        if not 0 <= num_vfs <= T.MAX_VFS:
            raise UsageError(f"--vfs must be between 0 and {T.MAX_VFS}")
        self.lock = threading.RLock()
        self._held: set[PciFunction] | None = None  # functions whose interrupt waits (burst)
        self.nic_id = nic_id
        self.pf = PciFunction(self.lock, True, 0, default_mac(nic_id, 0xFF), T.MAX_VFS, num_vfs)
        self.vfs = [
            PciFunction(self.lock, False, i, default_mac(nic_id, i), T.MAX_VFS)
            for i in range(num_vfs)
        ]
        from vfnic.device.pfagent import PfAgent
        from vfnic.device.switch import Switch

        self.switch = Switch(self)
        self.pf_agent = PfAgent(self)
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
        hooks = fn.bank.write_hooks
        hooks["CTRL"] = lambda _n, v: self._on_ctrl(fn, v)
        hooks["EICS"] = lambda _n, v: self.raise_cause(fn, v)
        hooks["EIMS"] = lambda _n, v: self._deliver(fn)
        dp = fn.datapath
        def ctl(kind: str, q: int) -> Callable[[str, int], None]:
            return lambda _n, _v: dp.on_ctl_write(kind, q)

        def tail(kind: str, q: int) -> Callable[[str, int], None]:
            return lambda _n, _v: dp.on_tail_write(kind, q)

        for q in range(T.NUM_QUEUES):
            for kind in ("R", "T"):
                hooks[f"{kind}XDCTL{q}"] = ctl(kind, q)
                hooks[f"{kind}DT{q}"] = tail(kind, q)
        if not fn.is_pf:
            hooks["VFMBDOORBELL"] = lambda _n, v: self.pf_agent.on_vf_doorbell(fn, v)

    def _on_ctrl(self, fn: PciFunction, value: int) -> None:
        if value & T.CTRL_RST:  # self-clearing software reset of the function's registers
            fn.software_reset()
        self._update_link(fn)

    def _update_link(self, fn: PciFunction) -> None:
        up = bool(fn.bank.get("CTRL") & T.CTRL_SLU) and fn.link_state != LINK_DISABLE
        was = bool(fn.bank.get("STATUS") & T.STATUS_LU)
        if up:
            fn.bank.set_bits("STATUS", T.STATUS_LU)
        else:
            fn.bank.clear_bits("STATUS", T.STATUS_LU)
        if up != was:
            self.raise_cause(fn, T.EICR_LSC)
            if not fn.is_pf:
                self.pf_agent.notify_link(fn)

    def raise_cause(self, fn: PciFunction, bits: int) -> None:
        fn.bank.set_bits("EICR", bits)
        if self._held is not None:  # a burst of frames: one interrupt at its end
            self._held.add(fn)
        else:
            self._deliver(fn)

    @contextlib.contextmanager
    def one_interrupt(self) -> Iterator[None]:
        """Hold interrupts while a burst of frames is delivered, then signal each function's
        pending causes once (per batch, not per frame). Called with the NIC lock held."""
        if self._held is not None:  # nested: the outer burst signals
            yield
            return
        self._held = set()
        try:
            yield
        finally:
            held, self._held = self._held, None
            for fn in held:
                self._deliver(fn)

    def _deliver(self, fn: PciFunction) -> None:
        """Signal every pending, unmasked cause (MSI-X vector per cause, else MSI/INTx)."""
        pending = fn.bank.get("EICR") & fn.bank.get("EIMS")
        if not pending:
            return
        msix_on = fn.config.get(CAP_MSIX + pci.MSIX_FLAGS, 2) & pci.MSIX_FLAGS_ENABLE
        if msix_on:
            for bit, vector in VECTOR_OF_CAUSE.items():
                if pending & (1 << bit):
                    fn.signal(wire.PciIrq.MSIX, vector)
        elif not fn.signal(wire.PciIrq.MSI, 0) and fn.is_pf:
            if not fn.config.get(pci.COMMAND, 2) & pci.COMMAND_INTX_DISABLE:
                fn.signal(wire.PciIrq.INTX, 0)

    def set_link_state(self, vf: int, state: str) -> None:
        names = {v: k for k, v in LINK_STATE_NAMES.items()}
        if state not in names:
            raise UsageError(f"link state must be one of {', '.join(names)}")
        fn = self.vf(vf)
        with self.lock:
            fn.link_state = names[state]
            self._update_link(fn)

    def set_vf_mac(self, vf: int, mac_text: str) -> None:
        """`ip link set PF vf N mac MAC`: the host assigns the VF's MAC."""
        try:
            mac = bytes(int(x, 16) for x in mac_text.split(":"))
        except ValueError:
            mac = b""
        if len(mac) != 6 or mac[0] & 1:
            raise UsageError(f"bad unicast MAC address {mac_text!r}")
        fn = self.vf(vf)
        with self.lock:
            fn.perm_mac = mac
            self.pf_agent.admin_mac[vf] = mac
            fn.load_mac(mac)

    # -- views for the management socket ---------------------------------------------

    def link_info(self, servers: dict[str, FunctionServer] | None = None) -> dict[str, Any]:
        def one(fn: PciFunction) -> dict[str, Any]:
            srv = (servers or {}).get(fn.name)
            return {
                "function": fn.name,
                "mac": ":".join(f"{b:02x}" for b in fn.mac),
                "link": "up" if fn.bank.get("STATUS") & T.STATUS_LU else "down",
                "state": LINK_STATE_NAMES[fn.link_state],
                "attached": bool(srv and srv.attached),
                "migration": fn.migration.state.name,
                "dropped_while_stopped": fn.stopped_drops,
            }

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


class NicServer:
    """A Nic with its sockets in a runtime folder."""

    def __init__(self, directory: str | os.PathLike[str], num_vfs: int = DEFAULT_VFS,
                 uplink: str | None = None, nic_id: int = 0, busy_poll_us: int = 0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nic = Nic(num_vfs, nic_id)
        if uplink:
            from vfnic.device.switch import TapUplink

            self.nic.switch.uplink = TapUplink(uplink)
        self.servers: dict[str, FunctionServer] = {}
        for fn in self.nic.functions:
            path = str(self.dir / f"{fn.name}.sock")
            self.servers[fn.name] = FunctionServer(fn, path, fn.name, busy_poll_us / 1e6)
        self.control_path = str(self.dir / "control.sock")
        if os.path.exists(self.control_path):
            os.unlink(self.control_path)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(self.control_path)
        self.control.listen(8)
        self._stopped = threading.Event()
        from vfnic.migrate.follower import Follower

        self.follower = Follower(self)  # migrations libvirt drives, seen through DIR/vfN.qmp

    def start(self) -> None:
        for srv in self.servers.values():
            srv.start()
        if self.nic.switch.uplink is not None:
            self.nic.switch.uplink.start(self.nic.switch)
        threading.Thread(target=self._control_loop, name="vfnic-control", daemon=True).start()
        self.follower.start()

    def stop(self) -> None:
        self._stopped.set()
        self.follower.stop()
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

    # -- management socket: one JSON object per line each way ------------------------

    def _control_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self.control.accept()
            except OSError:
                return
            threading.Thread(target=self._control_conn, args=(conn,), daemon=True).start()

    def _control_conn(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise UsageError("request must be a JSON object")
                    reply = {"ok": True, "result": self.control_request(req)}
                except (ValueError, VfnicError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

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
        if op == "vf-state":
            state = str(req.get("state"))
            vf = int(req.get("vf", -1))
            if state in MIGRATION_COMMANDS:
                words = [int(w) & 0xFFFFFFFF for w in req.get("args", [])][:7]
                return self.migration_command(vf, state, float(req.get("timeout", 5.0)), words)
            self.nic.set_link_state(vf, state)
            return None
        if op == "announce":
            fn = self.nic.vf(int(req.get("vf", -1)))
            return self.nic.switch.announce(fn, int(req.get("count", 1)))
        if op == "migrations":
            return self.follower.records(float(req.get("settle", 0.0)))
        if op == "vf-mac":
            self.nic.set_vf_mac(int(req.get("vf", -1)), str(req.get("mac")))
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
    """Send one management request to a running `vfnic serve`."""
    path = Path(directory) / "control.sock"
    if not path.exists():
        raise UsageError(f"no vfnic server in {directory} (no control.sock)")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(req).encode() + b"\n")
            with s.makefile("rb") as f:
                line = f.readline()
    except OSError as exc:
        raise UsageError(f"cannot reach the vfnic server in {directory}: {exc}") from exc
    if not line:
        raise UsageError(f"the vfnic server in {directory} closed the connection")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise UsageError(reply.get("error", "request failed"))
    return reply.get("result")
