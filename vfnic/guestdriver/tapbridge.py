"""A TAP interface in front of the VF driver: the guest's network stack sees the VF.

Frames the stack sends on the TAP go out through ``VfDriver.tx_batch``; frames
the VF receives are written to the TAP. The TAP's carrier follows the VF's link
(LINK_CHANGE, SUSPEND/RESUME). Stdlib only, plus the `ip` command (iproute2).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import select
import struct
import subprocess
import threading

from vfnic.guestdriver.driver import DriverError, VfDriver

log = logging.getLogger("vfnic.guestdriver")

TUN_PATH = "/dev/net/tun"
# linux/if_tun.h
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETCARRIER = 0x400454E2  # _IOW('T', 226, int), Linux 5.0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no packet information header: plain Ethernet frames

TX_BATCH = 32  # frames read from the TAP per doorbell
DEFAULT_POLL_US = 500


class Tap:
    """A TAP device opened through /dev/net/tun (non-blocking)."""

    def __init__(self, name: str) -> None:
        if not name or len(name) > 15:
            raise DriverError(f"bad interface name {name!r}")
        if not os.path.exists(TUN_PATH):
            subprocess.run(["modprobe", "tun"], capture_output=True, check=False)
        try:
            self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise DriverError(f"cannot open {TUN_PATH}: {exc.strerror}") from exc
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as exc:
            os.close(self.fd)
            raise DriverError(f"cannot create TAP {name}: {exc.strerror}") from exc
        self.name = name

    def read(self) -> bytes | None:
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return None

    def write(self, frame: bytes) -> bool:
        try:
            os.write(self.fd, frame)
            return True
        except OSError:  # TAP down or its queue full: lost, as on a wire
            return False

    def set_carrier(self, up: bool) -> None:
        try:
            fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", int(up)))
        except OSError as exc:
            log.debug("%s: TUNSETCARRIER: %s", self.name, exc.strerror)

    def close(self) -> None:
        os.close(self.fd)


def ip_command(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise DriverError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class TapBridge:
    """Moves frames between a TAP and the VF driver, polling the rings."""

    def __init__(self, driver: VfDriver, ifname: str = "vfnic0", ip: str | None = None,
                 poll_us: int = DEFAULT_POLL_US, netns: str | None = None) -> None:
        self.driver = driver
        self.ifname = ifname
        self.ip = ipaddress.ip_interface(ip) if ip else None
        if self.ip is not None and self.ip.version != 4:
            raise DriverError(f"--ip {ip}: only IPv4 is supported")
        self.poll_s = poll_us / 1e6
        self.netns = netns
        self.tap: Tap | None = None
        self.stop_event = threading.Event()
        self.tap_dropped = 0

    def setup(self) -> Tap:
        """Create the TAP with the VF's MAC, address it, bring it up."""
        tap = Tap(self.ifname)
        self.tap = tap
        if self.netns:
            ip_command("link", "set", "dev", self.ifname, "netns", self.netns)
        ip_command("link", "set", "dev", self.ifname, "address", self.driver.mac_text,
                   netns=self.netns)
        if self.ip is not None:
            ip_command("addr", "add", str(self.ip), "dev", self.ifname, netns=self.netns)
            self.driver.ipv4 = self.ip.ip.packed
        ip_command("link", "set", "dev", self.ifname, "up", netns=self.netns)
        tap.set_carrier(self.driver.link_up)
        self.driver.link_listener = tap.set_carrier
        self.driver.ipv6_addresses = self.ipv6_addresses
        return tap

    def ipv6_addresses(self) -> list[bytes]:
        """The TAP's IPv6 addresses (/proc/net/if_inet6), for neighbour advertisements."""
        try:
            with open("/proc/net/if_inet6") as f:
                rows = [line.split() for line in f]
        except OSError:
            return []
        return [bytes.fromhex(r[0]) for r in rows if len(r) >= 6 and r[5] == self.ifname]

    def run(self) -> None:
        """Move frames until ``stop_event`` is set."""
        tap = self.tap if self.tap is not None else self.setup()
        driver = self.driver
        timeout = self.poll_s
        while not self.stop_event.is_set():
            ready, _, _ = select.select([tap.fd], [], [], timeout)
            if ready:
                frames: list[bytes] = []
                while len(frames) < TX_BATCH:
                    frame = tap.read()
                    if frame is None:
                        break
                    frames.append(frame)
                if frames:
                    driver.tx_batch(frames)
            received = driver.rx_poll()
            for frame in received:
                if not tap.write(frame):
                    self.tap_dropped += 1
            driver.watchdog()
            # Busy traffic: look again at once; idle: wait up to the poll interval.
            timeout = 0 if received or ready else self.poll_s

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
            self.tap = None
