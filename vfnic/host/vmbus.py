"""A VM's own D-Bus bus for QEMU's dbus-vmstate object: one dbus-daemon per VM.

QEMU asks the bus for the queued owners of org.qemu.VMState1 (ListQueuedOwners),
so it must be a real message bus, and it must exist before QEMU starts ("failed to
connect to DBus" otherwise). The address given to QEMU is the plain unix path: the
``,guid=`` part dbus-daemon prints would split QEMU's -object options.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from vfnic.errors import SetupError
from vfnic.host.process import stop_process

DAEMON = "dbus-daemon"


def vmstate_object(bus: Path, ident: str = "vmstate") -> str:
    """The -object value for QEMU (no id-list: every helper on the bus is saved)."""
    return f"dbus-vmstate,id={ident},addr=unix:path={bus}"


class VmBus:
    """``dbus-daemon --session`` listening on ``path``; start() returns once it serves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.path}"

    def start(self, timeout: float = 10.0) -> None:
        daemon = shutil.which(DAEMON)
        if daemon is None:
            raise SetupError("dbus-daemon not found: install Debian's dbus-daemon "
                             "(make setup does)")
        if len(str(self.path)) > 107:
            raise SetupError(f"bus path too long for a unix socket: {self.path}")
        self.path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [daemon, "--session", "--nofork", "--nopidfile", f"--address={self.address}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.path.is_socket():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise SetupError(f"dbus-daemon exited: {err.strip() or self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise SetupError(f"dbus-daemon did not create {self.path}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, timeout=5)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        self.path.unlink(missing_ok=True)
