"""A libvirtd for each lab host (vfnic.migrate.lab), so that `virsh` drives its VMs.

Each libvirtd runs in its host's network namespace and in a private mount
namespace where the host's own directories (under ``workdir``) are bind-mounted
over /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and
/var/cache/libvirt: two independent libvirt "hosts" on one machine. In the same
mount namespace the host's NIC dir (``lab.nic_dir(host)``) is bind-mounted on
:func:`shared_nic_dir`, so one domain XML names the VF sockets of host A on A
and of host B on B, like a well-known path on two real machines.

The configuration is the one that works without systemd, dbus, cgroups or
virtlogd: QEMU runs as root, no security driver, no per-VM namespaces, QEMU's
stdio into /var/log/libvirt/qemu/<name>.log. virsh (run from the real root)
reaches a host's libvirtd through the socket under its ``workdir``.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vfnic.host.process import stop_process
from vfnic.host.runtime import cache_dir, qemu_root
from vfnic.migrate.lab import Lab, LabError

# The directories a libvirtd owns; each host has its own copy under its workdir.
LIBVIRT_DIRS = ("etc/libvirt", "run/libvirt", "var/lib/libvirt", "var/log/libvirt",
                "var/cache/libvirt")
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "{uuid}"
"""
_START_TIMEOUT = 30.0


def shared_nic_dir(lab: Lab) -> Path:
    """The NIC dir as a lab host's libvirtd and QEMU see it: that host's own NIC."""
    return lab.workdir / "nic"


VIRTIO_MAC = "52:54:00:12:34:56"


def lab_domain(lab: Lab, name: str = "g1", guest_command: str | None = None,
               virtio_bridge: str | None = None) -> Path:
    """Write the XML of the lab's guest: VF 0 of the host's NIC, the guest driver up at
    boot with GUEST_IP, the console in the host's NIC dir (console.log: A's QEMU and
    B's each write their own). With ``virtio_bridge``, a virtio-net guest on that host
    bridge instead (no VF; ``guest_command`` must give it its address). Returns the
    XML file."""
    from vfnic.host.vm import VfioUserFunction
    from vfnic.libvirt.domain import domain_xml, guest_exec_arg
    from vfnic.migrate.lab import GUEST_IP

    nic = shared_nic_dir(lab)
    kargs = [] if virtio_bridge else [f"vfnic.ip={GUEST_IP}/24"]
    if guest_command is not None:
        kargs.append(guest_exec_arg(guest_command))
    fns = [] if virtio_bridge else [VfioUserFunction(nic / "vf0.sock", "vf0")]
    bridges = [(virtio_bridge, VIRTIO_MAC)] if virtio_bridge else []
    path = lab.workdir / f"{name}.xml"
    # The VF guest's console is the NIC dir's console.log; a virtio-net guest (which
    # may run beside it) has its own.
    console = nic / (f"console-{name}.log" if virtio_bridge else "console.log")
    path.write_text(domain_xml(name, fns, kernel_args=kargs, console_log=console,
                               bridges=bridges))
    return path


def _die_with_parent() -> None:
    # prctl(PR_SET_PDEATHSIG, SIGKILL): a killed test run leaves no libvirtd behind.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


@dataclass
class LibvirtHost:
    """One lab host's libvirtd: ``start()``, ``virsh(...)``, ``stop()``, or ``with``."""

    lab: Lab
    host: str  # "a" or "b"
    workdir: Path | None = None  # default: <lab workdir>/libvirt-<host>
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def root(self) -> Path:
        """The per-host directory tree (etc/, run/, var/, libvirtd.log)."""
        return self.workdir or self.lab.workdir / f"libvirt-{self.host}"

    @property
    def socket(self) -> Path:
        return self.root / "run/libvirt/libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        """libvirtd's own output; QEMU's is var/log/libvirt/qemu/<domain>.log."""
        return self.root / "libvirtd.log"

    def qemu_log(self, domain: str) -> Path:
        return self.root / "var/log/libvirt/qemu" / f"{domain}.log"

    def _script(self) -> Path:
        """The shell script run in the new mount namespace: bind mounts, then libvirtd
        from Debian sid's root (chroot): libvirt 12.8 drives QEMU 11.1, which the hosts'
        own libvirt (9.0 on Debian 12) cannot migrate (it passes `migrate` a `detach`
        argument QEMU has dropped)."""
        root = qemu_root()
        q = shlex.quote
        lines = ["#!/bin/sh", "set -e", "mount --make-rprivate /", f"R={q(str(root))}"]
        for d in LIBVIRT_DIRS:
            lines.append(f"mkdir -p \"$R/{d}\" && mount --bind {q(str(self.root / d))} \"$R/{d}\"")
        lines += ['mount --rbind /dev "$R/dev"', 'mount -t proc proc "$R/proc"',
                  'mount --rbind /sys "$R/sys"']
        # The paths a domain names (guest image and kernel, sockets, logs) as on the host.
        for path in (cache_dir(), self.lab.workdir):
            lines.append(f"mkdir -p \"$R\"{q(str(path))} && mount --bind {q(str(path))} "
                         f"\"$R\"{q(str(path))}")
        nic, shared = self.lab.nic_dir(self.host), shared_nic_dir(self.lab)
        lines.append(f"mount --bind {q(str(nic))} \"$R\"{q(str(shared))}")
        # As root, libvirtd's pid file is /run/libvirtd.pid: one per host, under its /run/libvirt.
        lines.append('exec chroot "$R" libvirtd --pid-file /run/libvirt/libvirtd.pid')
        script = self.root / "libvirtd.sh"
        script.write_text("\n".join(lines) + "\n")
        return script

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Start this host's libvirtd and return once its socket is there."""
        if self.proc is not None:
            raise LabError(f"libvirtd for host {self.host} already started")
        for d in LIBVIRT_DIRS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "run/libvirt").iterdir():  # like a fresh tmpfs /run
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        self.lab.nic_dir(self.host).mkdir(parents=True, exist_ok=True)
        shared_nic_dir(self.lab).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc/libvirt"
        (etc / "qemu.conf").write_text(QEMU_CONF)
        # Distinct host UUIDs: libvirt refuses a migration to "the same host".
        host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"vfnic-lab:{self.lab.ident}:{self.host}")
        (etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(uuid=host_uuid))
        # The domain's dbus-vmstate bus, started before QEMU on either host.
        from vfnic.libvirt.domain import HOOK

        hook = etc / "hooks/qemu.d/vfnic"
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text(HOOK)
        hook.chmod(0o755)
        script = self._script()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                # ip netns exec and unshare exec in turn: the pid is libvirtd's.
                ["ip", "netns", "exec", self.lab.ns(self.host), "unshare", "-m",
                 "--propagation", "private", "sh", str(script)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                self.proc = None
                raise LabError(f"libvirtd for host {self.host} exited: {self._last_error()} "
                               f"(see {self.log})")
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"libvirtd for host {self.host} did not create {self.socket} "
                               f"within {timeout:.0f} s (see {self.log})")
            time.sleep(0.05)

    def _last_error(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if " error : " in line]
        return (errors or lines or ["empty log"])[-1].strip()

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``virsh -c <uri> ARGS`` (from the real root namespace)."""
        proc = subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        if check and proc.returncode != 0:
            raise LabError(f"virsh ({self.host}) {' '.join(args)}: "
                           f"{proc.stderr.strip() or proc.returncode}")
        return proc

    def _qemu_pids(self) -> list[int]:
        """The QEMUs this libvirtd runs, from its pid files."""
        pids = []
        for f in (self.root / "run/libvirt/qemu").glob("*.pid"):
            try:
                pids.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def stop(self, timeout: float = 10.0) -> None:
        """Destroy the running domains, then stop the libvirtd we started (by pid)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            names = self.virsh("list", "--name", check=False, timeout=30).stdout.split()
            for name in names:
                self.virsh("destroy", name, check=False, timeout=30)
            stop_process(proc, timeout=timeout)
        # A QEMU that outlived its libvirtd (destroy failed): only those it started.
        for pid in self._qemu_pids():
            try:
                if "qemu" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def __enter__(self) -> LibvirtHost:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
