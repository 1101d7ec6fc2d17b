"""Two hosts and a peer on one machine, in network namespaces.

  <id>-a     host A: its QEMU; 192.168.77.1 on the migration network
  <id>-b     host B: its QEMU; 192.168.77.2
  <id>-peer  a machine on the LAN: 10.77.0.1/24
  <id>-fab   the fabric: bridge "lan" (the NICs' uplink TAPs and the peer) and
             bridge "mig" (the hosts' migration network)
Each host's vfnic NIC runs in the fabric namespace, its uplink TAP plugged into
the LAN bridge, the way an SR-IOV NIC's port is cabled to a switch. Only these
namespaces carry traffic; everything is removed by ``down()``.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vfnic.errors import OperatorError
from vfnic.host.process import stop_process

LAN_PREFIX = "10.77.0"
MIG_PREFIX = "192.168.77"
PEER_IP = f"{LAN_PREFIX}.1"
GUEST_IP = f"{LAN_PREFIX}.2"
VIRTIO_GUEST_IP = f"{LAN_PREFIX}.3"  # a virtio-net guest running beside the VF guest


def virtio_netsetup(ip: str = GUEST_IP) -> str:
    """Guest shell lines that give a virtio-net guest a lab address (the baseline the
    VF is compared with in the demo and the benchmarks)."""
    return f"""
IF=$(for d in /sys/class/net/*; do [ -e "$d/device" ] && basename "$d"; done | head -n1)
echo "virtio-net interface: $IF"
ip addr add {ip}/24 dev "$IF"
ip link set "$IF" up
"""


VIRTIO_NETSETUP = virtio_netsetup()


class LabError(OperatorError):
    """The namespaces could not be set up."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass
class Lab:
    workdir: Path
    ident: str = field(default_factory=lambda: "vf" + secrets.token_hex(2))
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pingers: list[Pinger] = field(default_factory=list)  # stopped by down() if still running

    def ns(self, name: str) -> str:
        return f"{self.ident}-{name}"

    def nic_dir(self, host: str) -> Path:
        return self.workdir / f"nic-{host}"

    def tap(self, host: str) -> str:
        return f"{self.ident}t{host}"

    def host_ip(self, host: str) -> str:
        return f"{MIG_PREFIX}.{1 if host == 'a' else 2}"

    def up(self) -> None:
        try:
            for name in ("fab", "a", "b", "peer"):
                sh("ip", "netns", "add", self.ns(name))
                sh("ip", "-n", self.ns(name), "link", "set", "lo", "up")
            fab = self.ns("fab")
            for br in ("lan", "mig"):
                sh("ip", "-n", fab, "link", "add", br, "type", "bridge", "stp_state", "0",
                   "forward_delay", "0")
                sh("ip", "-n", fab, "link", "set", br, "up")
            self._veth("peer", "lan", f"{PEER_IP}/24")
            self._veth("a", "mig", f"{self.host_ip('a')}/24")
            self._veth("b", "mig", f"{self.host_ip('b')}/24")
        except BaseException:
            self.down()
            raise

    def _veth(self, host: str, bridge: str, addr: str) -> None:
        inner, outer = f"{self.ident}{host}0", f"{self.ident}{host}1"
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", inner, "netns", self.ns(host))
        sh("ip", "link", "set", outer, "netns", self.ns("fab"))
        sh("ip", "-n", self.ns("fab"), "link", "set", outer, "master", bridge, "up")
        sh("ip", "-n", self.ns(host), "addr", "add", addr, "dev", inner)
        sh("ip", "-n", self.ns(host), "link", "set", inner, "up")

    def start_nic(self, host: str, vfs: int = 2, nic_id: int = 0) -> Path:
        """`vfnic serve` for one host, in the fabric namespace, uplink on the LAN."""
        folder = self.nic_dir(host)
        folder.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"serve-{host}.log", "wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns("fab"), sys.executable, "-m", "vfnic.cli", "serve",
             "--dir", str(folder), "--vfs", str(vfs), "--uplink", self.tap(host),
             "--nic-id", str(nic_id)],
            stdout=log, stderr=subprocess.STDOUT)
        self.servers[host] = proc
        deadline = time.monotonic() + 20
        while not (folder / "control.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"vfnic serve for host {host} did not start "
                               f"(see {self.workdir}/serve-{host}.log)")
            time.sleep(0.05)
        sh("ip", "-n", self.ns("fab"), "link", "set", self.tap(host), "master", "lan", "up")
        return folder

    def reachable(self, target: str = GUEST_IP) -> bool:
        """One ping from the peer, one second to answer."""
        return sh("ip", "netns", "exec", self.ns("peer"), "ping", "-c1", "-W1", target,
                  check=False).returncode == 0

    def wait_reachable(self, timeout: float, what: str = "the guest",
                       target: str = GUEST_IP) -> None:
        deadline = time.monotonic() + timeout
        while not self.reachable(target):
            if time.monotonic() > deadline:
                raise LabError(f"{what} did not answer the peer's ping within {timeout:g} s")

    def bridge_to_lan(self, host: str, name: str = "lan0") -> str:
        """A bridge in a host namespace, cabled to the LAN (veth): where a host's
        virtual NICs (libvirt's TAPs for virtio-net) get plugged."""
        sh("ip", "-n", self.ns(host), "link", "add", name, "type", "bridge", "stp_state", "0",
           "forward_delay", "0")
        sh("ip", "-n", self.ns(host), "link", "set", name, "up")
        inner, outer = f"{self.ident}{host}l0", f"{self.ident}{host}l1"
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", inner, "netns", self.ns(host))
        sh("ip", "link", "set", outer, "netns", self.ns("fab"))
        sh("ip", "-n", self.ns("fab"), "link", "set", outer, "master", "lan", "up")
        sh("ip", "-n", self.ns(host), "link", "set", inner, "master", name, "up")
        return name

    def plug_into_lan(self, host: str, ifname: str) -> None:
        """Move a TAP that a QEMU created in a host namespace onto the LAN bridge."""
        sh("ip", "-n", self.ns(host), "link", "set", ifname, "netns", self.ns("fab"))
        sh("ip", "-n", self.ns("fab"), "link", "set", ifname, "master", "lan", "up")

    def down(self) -> None:
        for pinger in self.pingers:
            if pinger.proc is not None and pinger.proc.poll() is None:
                pinger.stop()
        self.pingers.clear()
        for proc in self.servers.values():  # only the processes we started, by pid
            stop_process(proc)
        self.servers.clear()
        for name in ("a", "b", "peer", "fab"):
            sh("ip", "netns", "del", self.ns(name), check=False)


@dataclass
class Pinger:
    """`ping` from the peer every ``interval`` seconds, timestamps kept (-D); its
    output is read as it comes, so replies can be watched while it runs."""

    lab: Lab
    target: str = GUEST_IP
    interval: float = 0.01
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.ns("peer"), "ping", "-D", "-n", "-W", "1",
             "-i", f"{self.interval:g}", self.target],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lab.pingers.append(self)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> str:
        assert self.proc is not None
        stop_process(self.proc, signal.SIGINT)  # our own ping: its summary on SIGINT
        if self._reader is not None:
            self._reader.join(5)
        return self.output

    def replies(self) -> list[tuple[float, int]]:
        """(timestamp, icmp_seq) of every reply so far."""
        return [(float(t), int(s)) for t, s in
                re.findall(r"\[(\d+\.\d+)\] \d+ bytes from .*?icmp_seq=(\d+)", self.output)]

    def replies_after(self, t: float) -> int:
        """How many replies came after ``t`` (time.time() clock, as ping -D)."""
        return sum(1 for when, _ in self.replies() if when > t)

    def downtime_ms(self, after: float | None = None) -> float:
        """Longest silence between two replies (minus one interval), in ms."""
        r = [t for t, _ in self.replies() if after is None or t >= after]
        if len(r) < 2:
            return float("inf")
        gap = max(b - a for a, b in zip(r, r[1:], strict=False))
        return max(0.0, (gap - self.interval) * 1000)

    def loss(self) -> tuple[int, int]:
        """(sent, received) from ping's summary line (after stop())."""
        m = re.search(r"(\d+) packets transmitted, (\d+) received", self.output)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the two-host lab needs root (network namespaces, TAP devices)")
