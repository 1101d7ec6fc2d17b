"""A QEMU guest with vfnic functions attached over vfio-user.

Guest RAM is a shared memfd so that the client's DMA_MAP messages carry fds.
The serial console is a unix socket (connect to it for a shell) that QEMU also
logs to console.log; QMP listens on qmp.sock. Both live in the VM's run dir.

With a command, the guest init runs it between two markers and powers off;
`wait_exec` follows the console log, streams the command's output and returns
its exit status.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import concurrent.futures
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

from qemu.qmp import QMPClient

from vfnic.errors import OperatorError, UsageError
from vfnic.host import image, runtime
from vfnic.host.vmbus import VmBus, vmstate_object

# qemu.qmp logs connection teardown at warning level; errors reach us as exceptions.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False

T = TypeVar("T")
DEFAULT_MEM = "512M"
# Past this many base64 characters the command goes through fw_cfg, not the
# kernel command line (2048 bytes in all on x86).
_CMDLINE_MAX = 1024
_POLL = 0.05
_KERNEL_ARGS = (
    "console=ttyS0",
    "root=/dev/vda",
    "rw",
    "init=/sbin/vfnic-init",
    "quiet",
    "loglevel=0",
    "fsck.mode=skip",
    "panic=-1",
)


# The VF's driver in the guest: the kernel module (kmod/, vfnic_vf.ko) or the Python
# driver model bridged to a TAP (python3 -m vfnic.guestdriver). Both name it vfnic0.
GUEST_DRIVERS = ("kernel", "python")
DEFAULT_GUEST_DRIVER = "kernel"


def guest_net_args(ip: str | None = None, driver: str = DEFAULT_GUEST_DRIVER) -> list[str]:
    """Kernel arguments for the guest's init: the VF driver, and ADDR/LEN for vfnic0."""
    if driver not in GUEST_DRIVERS:
        raise UsageError(f"guest driver must be one of {', '.join(GUEST_DRIVERS)}, not {driver!r}")
    args = [] if driver == DEFAULT_GUEST_DRIVER else [f"vfnic.driver={driver}"]
    return args + ([f"vfnic.ip={ip}"] if ip else [])


def _die_with_parent() -> None:
    # prctl(PR_SET_PDEATHSIG, SIGKILL), in the child before exec.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)


class VmError(OperatorError):
    """QEMU or the guest failed: did not start, died, or timed out."""


@dataclass(frozen=True)
class VfioUserFunction:
    """One vfio-user-pci device: the server's socket and the QEMU device id."""

    socket: Path
    id: str
    props: Mapping[str, object] = field(default_factory=dict)

    def check(self) -> None:
        try:
            mode = self.socket.stat().st_mode
        except OSError:
            raise UsageError(f"no vfio-user socket at {self.socket}") from None
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"not a unix socket: {self.socket}")

    def device_arg(self) -> str:
        """The JSON -device value (the socket property is a SocketAddress)."""
        dev: dict[str, object] = {
            "driver": "vfio-user-pci",
            "id": self.id,
            "socket": {"type": "unix", "path": str(self.socket.absolute())},
            "rombar": 0,
        }
        dev.update(self.props)
        return json.dumps(dev)


class ExecParser:
    """Finds a guest command's output and status between the init's markers."""

    def __init__(self, token: str, begun: bool = False) -> None:
        self.begin = f"@@vfnic-exec-begin {token}@@\n"
        self.end_prefix = f"\n@@vfnic-exec-end {token} status="
        self._end = re.compile(re.escape(self.end_prefix) + r"(\d+)@@\n")
        self.started = begun
        self.status: int | None = None
        self._buf = ""
        self._cr = False

    def feed(self, text: str) -> str:
        """Add console text; return the part of the output that is now certain."""
        if self.status is not None:
            return ""
        # The serial tty turns \n into \r\n; undo it, even across chunks.
        if self._cr:
            text = "\r" + text
        self._cr = text.endswith("\r")
        if self._cr:
            text = text[:-1]
        self._buf += text.replace("\r\n", "\n")
        if not self.started:
            i = self._buf.find(self.begin)
            if i < 0:
                self._buf = self._buf[-len(self.begin) :]
                return ""
            self.started = True
            self._buf = self._buf[i + len(self.begin) :]
        m = self._end.search(self._buf)
        if m:
            self.status = int(m.group(1))
            out, self._buf = self._buf[: m.start()], ""
            return out
        # Hold back whatever may be the start of the end marker.
        hold = self._buf.find(self.end_prefix)
        if hold < 0:
            hold = len(self._buf)
            for k in range(min(len(self._buf), len(self.end_prefix)), 0, -1):
                if self._buf.endswith(self.end_prefix[:k]):
                    hold = len(self._buf) - k
                    break
        out, self._buf = self._buf[:hold], self._buf[hold:]
        return out


def _run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion, also from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def qmp_command(
    socket_path: Path, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10.0
) -> object:
    """Connect to a QMP socket, run one command, disconnect; returns its result."""

    async def go() -> object:
        client = QMPClient("vfnic")
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
        try:
            return await asyncio.wait_for(client.execute(cmd, args), timeout)
        finally:
            await client.disconnect()

    return _run_sync(go)


def exec_kernel_arg(command: str) -> str | None:
    """The kernel argument that makes the guest's init run ``command`` (base64), or
    None if it is too long for the kernel command line."""
    encoded = base64.b64encode(command.encode()).decode()
    return f"vfnic.exec={encoded}" if len(encoded) <= _CMDLINE_MAX else None


def probe_kvm() -> bool:
    """Boot the guest once under KVM and cache whether it ran a command."""
    ok = False
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        try:
            with VM(command="true", accel="kvm") as vm:
                ok = vm.wait_exec(runtime.PROBE_TIMEOUT) == 0
        except Exception:  # any failure to boot means "no KVM"
            ok = False
    runtime.write_probe(ok)
    return ok


def accel() -> str:
    """The accelerator a VM uses by default (runtime.accel, probing KVM with a boot
    when VFNIC_KVM_PROBE=1)."""
    return runtime.accel(probe_kvm)


class VM:
    """One QEMU process running the vfnic guest image.

    Use as a context manager (starts on enter, stops on exit), or call
    start() and stop(). The run dir holds qmp.sock, console.sock,
    console.log and qemu.log; a run dir made here is removed on a clean
    stop unless keep=True. With die_with_parent (the default) the kernel
    kills QEMU when the thread that started it ends, so a killed test run
    leaves no QEMU behind: start the VM from a long-lived thread.
    """

    def __init__(
        self,
        functions: Sequence[VfioUserFunction] = (),
        *,
        command: str | None = None,
        mem: str = DEFAULT_MEM,
        smp: int = 1,
        accel: str | None = None,
        extra_args: Sequence[str] = (),
        kernel_args: Sequence[str] = (),
        modules: Sequence[str] = (),
        run_dir: Path | None = None,
        token: str | None = None,
        keep: bool = False,
        verbose: bool = False,
        die_with_parent: bool = True,
        netns: str | None = None,
        vmstate: bool | None = None,
    ) -> None:
        self.netns = netns  # run QEMU inside this network namespace (a lab host)
        # QEMU's dbus-vmstate object on a bus of this VM's own, so that a migration
        # carries the VFs' state (vfnic.migrate.vmstate); default: when VFs are attached.
        self.vmstate = bool(functions) if vmstate is None else vmstate
        self.bus: VmBus | None = None
        self.functions = list(functions)
        self.command = command
        self.mem = mem
        self.smp = smp
        self.accel = accel
        self.extra_args = list(extra_args)
        self.kernel_args = list(kernel_args)
        self.modules = list(modules)
        self.token = token or secrets.token_hex(6)
        self.keep = keep
        self.verbose = verbose
        self.die_with_parent = die_with_parent
        self._own_run_dir = run_dir is None
        self._run_dir = run_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = ""  # the command's output, once wait_exec has run
        self.failed = False
        self._log_fd: int | None = None
        self.started_at = 0.0  # time.monotonic() at start()

    # -- paths -----------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="vfnic-vm-"))
        return self._run_dir

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def bus_socket(self) -> Path:
        """The VM's D-Bus bus (QEMU's dbus-vmstate object and the VF helpers)."""
        return self.run_dir / "vmstate.bus"

    def function_monitor(self, function: VfioUserFunction) -> Path:
        """The QMP monitor of its own a function's NIC server follows: <id>.qmp."""
        return self.run_dir / f"{function.id}.qmp"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- command line ------------------------------------------------------------------

    def _append(self) -> str:
        args = [*_KERNEL_ARGS, f"vfnic.token={self.token}"]
        if self.modules:
            args.append("vfnic.modules=" + ",".join(self.modules))
        if self.command is not None:
            args.append(exec_kernel_arg(self.command) or "vfnic.exec=fw_cfg")
        return " ".join([*args, *self.kernel_args])

    def argv(self) -> list[str]:
        """The full QEMU command line."""
        img = image.ensure_image(verbose=self.verbose)
        run = self.run_dir
        argv = [
            *runtime.qemu_argv(),
            "-name", f"vfnic-{self.token}",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-machine", "q35,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={self.mem},share=on",
            "-m", self.mem,
            "-smp", str(self.smp),
            *runtime.accel_args(self.accel or accel()),
            "-chardev",
            f"socket,id=con,path={run / 'console.sock'},server=on,wait=off,"
            f"logfile={run / 'console.log'}",
            "-serial", "chardev:con",
            "-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off",
            "-kernel", str(image.kernel()),
            "-initrd", str(image.initrd()),
            # snapshot=on: many VMs share the image and none writes to it, so a
            # migration need not drop its page cache (file-posix drop-cache) for all.
            "-drive", f"file={img},if=virtio,format=raw,snapshot=on,file.drop-cache=off",
            "-append", self._append(),
        ]  # fmt: skip
        if self.command is not None and "vfnic.exec=fw_cfg" in argv[-1]:
            script = run / "exec.sh"
            script.write_text(self.command)
            argv += ["-fw_cfg", f"name=opt/vfnic/exec,file={script}"]
        if self.vmstate:
            argv += ["-object", vmstate_object(self.bus_socket)]
        for fn in self.functions:
            argv += ["-device", fn.device_arg(),
                     "-qmp", f"unix:{self.function_monitor(fn)},server=on,wait=off"]
        return argv + self.extra_args

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> VM:
        try:
            self.start()
        except BaseException:
            self.failed = True
            self.stop()  # a half-started QEMU must not outlive us
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.failed = True
        self.stop()

    def _progress(self, msg: str) -> None:
        if self.verbose:
            print(f"vfnic: {msg}", file=sys.stderr, flush=True)

    def start(self, timeout: float = 60.0) -> None:
        """Start QEMU and return once its QMP monitor answers."""
        if self.proc is not None:
            raise VmError("VM already started")
        for fn in self.functions:
            fn.check()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.console_socket)) > 107:  # sun_path holds 108 bytes
            raise UsageError(f"run dir path too long for unix sockets: {self.run_dir}")
        argv = self.argv()
        if self.vmstate:
            self.bus = VmBus(self.bus_socket)
            self.bus.start()
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self._log_fd = os.open(self.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.started_at = time.monotonic()
        self._progress(f"starting QEMU ({self.accel or accel()}), run dir {self.run_dir}")
        # Own session: a Ctrl-C in the terminal reaches us, and we quit QEMU cleanly.
        self.proc = subprocess.Popen(
            argv,
            env=runtime.qemu_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_fd,
            stderr=self._log_fd,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("while starting")
            if self.qmp_socket.exists():
                try:
                    qmp_command(self.qmp_socket, "query-status", timeout=5.0)
                    return
                except Exception as exc:
                    # Not serving yet (still realizing devices) or just died.
                    self._check_alive("while starting")
                    if time.monotonic() > deadline:
                        self.failed = True
                        raise VmError(f"QMP did not answer within {timeout:.0f} s: {exc}") from None
            if time.monotonic() > deadline:
                self.failed = True
                raise VmError(f"QEMU did not start within {timeout:.0f} s (see {self.qemu_log})")
            time.sleep(_POLL)

    def _qemu_error(self) -> str:
        """The last line QEMU wrote to stderr."""
        try:
            lines = self.qemu_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1].strip() if lines else f"see {self.console_log}"

    def _check_alive(self, when: str) -> None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None:
            self.failed = True
            raise VmError(f"QEMU exited with status {rc} {when}: {self._qemu_error()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def qmp(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10.0
    ) -> object:
        """Run one QMP command on this VM."""
        return qmp_command(self.qmp_socket, cmd, args, timeout)

    def wait_exec(
        self, timeout: float = 300.0, out: TextIO | None = None, begun: bool = False
    ) -> int:
        """Follow the console until the guest command ends; return its exit status.

        The output is written to `out` as it arrives and kept in self.output.
        `begun` is for a VM that took over a running guest (after migration).
        """
        if self.proc is None:
            raise VmError("VM not started")
        parser = ExecParser(self.token, begun)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chunks: list[str] = []
        deadline = time.monotonic() + timeout
        offset = 0
        while parser.status is None:
            exited = self.proc.poll() is not None
            try:
                with open(self.console_log, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            offset += len(data)
            was_started = parser.started
            text = parser.feed(decoder.decode(data))
            if parser.started and not was_started:
                self._progress(
                    f"guest up after {time.monotonic() - self.started_at:.1f} s, running command"
                )
            if text:
                chunks.append(text)
                if out is not None:
                    out.write(text)
                    out.flush()
            if parser.status is not None:
                break
            if exited:
                self.failed = True
                self.output = "".join(chunks)
                where = "inside the guest command" if parser.started else "before the command ran"
                raise VmError(
                    f"QEMU exited with status {self.proc.returncode} {where}: "
                    f"{self._qemu_error()} (console: {self.console_log})"
                )
            if time.monotonic() > deadline:
                self.failed = True
                self.output = "".join(chunks)
                raise VmError(
                    f"guest command did not finish within {timeout:.0f} s "
                    f"(console: {self.console_log})"
                )
            if not data:
                time.sleep(_POLL)
        self.output = "".join(chunks)
        return parser.status

    def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit by itself; returns its exit status."""
        if self.proc is None:
            raise VmError("VM not started")
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """QMP quit, then kill (only our own QEMU process) if it lingers."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                self.qmp("quit", timeout=min(timeout, 5.0))
            except Exception:  # gone already, or not answering: kill below
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.bus is not None:
            self.bus.stop()
            self.bus = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        if self._own_run_dir and self._run_dir is not None and not (self.keep or self.failed):
            shutil.rmtree(self._run_dir, ignore_errors=True)


def run_command(
    command: str,
    functions: Sequence[VfioUserFunction] = (),
    *,
    timeout: float = 300.0,
    out: TextIO | None = None,
    **vm_args: Any,
) -> tuple[int, str]:
    """Boot a guest, run one command in it; returns (exit status, output)."""
    vm = VM(functions, command=command, **vm_args)
    with vm:
        status = vm.wait_exec(timeout, out)
    return status, vm.output
