"""The TAP bridge end to end on the host: two VFs driven by VfDriver, each behind a
TAP in its own network namespace, a TCP echo across the NIC's switch (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from vfnic.device.nic import NicServer
from vfnic.guestdriver.bus import HostBus
from vfnic.guestdriver.driver import VfDriver
from vfnic.guestdriver.tapbridge import TapBridge

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2",
)


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)


# A TCP echo of 200 kB (full-size frames both ways, ARP first).
ECHO_SERVER = """
import socket
s = socket.create_server(("10.9.0.2", 5555))
s.settimeout(20)
c, _ = s.accept()
while data := c.recv(65536):
    c.sendall(data)
"""
ECHO_CLIENT = """
import socket, sys, time
payload = bytes(range(256)) * 800
deadline = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection(("10.9.0.2", 5555), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
c.sendall(payload)
c.shutdown(socket.SHUT_WR)
got = b""
while data := c.recv(65536):
    got += data
sys.exit(0 if got == payload else 1)
"""


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    tag = f"{os.getpid() % 100000}"
    names = (f"vfn{tag}a", f"vfn{tag}b")
    for ns in names:
        assert sh("ip", "netns", "add", ns).returncode == 0
    yield names
    for ns in names:
        sh("ip", "netns", "del", ns)


@pytest.mark.parametrize("fd_backed", [True, False], ids=["memfd", "messages"])
def test_tcp_between_two_vfs_through_taps(nic: NicServer, namespaces: tuple[str, str],
                                           fd_backed: bool) -> None:
    bridges: list[TapBridge] = []
    threads: list[threading.Thread] = []
    try:
        for vf, (ns, ip) in enumerate(zip(namespaces, ("10.9.0.1/24", "10.9.0.2/24"),
                                          strict=True)):
            drv = VfDriver(HostBus(str(nic.dir / f"vf{vf}.sock"), fd_backed=fd_backed))
            drv.init()
            bridge = TapBridge(drv, f"{ns}t", ip, poll_us=200, netns=ns)
            bridge.setup()
            assert drv.ipv4 == bytes([10, 9, 0, vf + 1])
            bridges.append(bridge)
            threads.append(threading.Thread(target=bridge.run, daemon=True))
        for t in threads:
            t.start()
        server = subprocess.Popen(["ip", "netns", "exec", namespaces[1], sys.executable, "-c",
                                   ECHO_SERVER])
        try:
            res = sh("ip", "netns", "exec", namespaces[0], sys.executable, "-c", ECHO_CLIENT)
            assert res.returncode == 0, res.stdout + res.stderr
        finally:
            server.kill()
            server.wait()
        link = sh("ip", "-n", namespaces[1], "link", "show", f"{namespaces[1]}t").stdout
        assert nic.nic.vfs[1].mac.hex(":") in link and "LOWER_UP" in link
    finally:
        for b in bridges:
            b.stop()
        for t in threads:
            t.join(2.0)
        for b in bridges:
            b.driver.stop()
            b.close()
            b.driver.bus.close()
        time.sleep(0.05)
