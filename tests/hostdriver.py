"""Helpers shared by the tests that drive a NicServer's VFs from the host with the
Python driver model (VfDriver over a HostBus): drivers made on demand, a peer VF
bridged to a TAP in its own network namespace, and a server stopped once its
clients have left."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

from vfnic.device.nic import NicServer
from vfnic.guestdriver.bus import HostBus
from vfnic.guestdriver.driver import VfDriver
from vfnic.guestdriver.tapbridge import TapBridge

MakeDriver = Callable[..., VfDriver]


@contextlib.contextmanager
def vf_drivers(nic: NicServer, ring_size: int, *, fd_backed: bool = True
               ) -> Iterator[MakeDriver]:
    """``make(vf[, ring_size])``: an initialised driver on that VF's socket (guest RAM
    a memfd when ``fd_backed``, else reached by DMA messages); every bus closed after."""
    made: list[VfDriver] = []

    def make(vf: int, ring: int = ring_size) -> VfDriver:
        drv = VfDriver(HostBus(str(nic.dir / f"vf{vf}.sock"), fd_backed=fd_backed), ring)
        made.append(drv)
        drv.init()
        return drv

    try:
        yield make
    finally:
        for drv in made:
            drv.bus.close()


@contextlib.contextmanager
def tap_peer(nic: NicServer, vf: int, netns: str, cidr: str) -> Iterator[VfDriver]:
    """VF ``vf`` driven on the host and bridged to a TAP ``<netns>t`` with address
    ``cidr`` inside a new network namespace ``netns`` (deleted after)."""
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        drv = VfDriver(HostBus(str(nic.dir / f"vf{vf}.sock")))
        drv.init()
        bridge = TapBridge(drv, f"{netns}t", cidr, poll_us=200, netns=netns)
        bridge.setup()
        thread = threading.Thread(target=bridge.run, daemon=True)
        thread.start()
        try:
            yield drv
        finally:
            bridge.stop()
            thread.join(2.0)
            drv.stop()
            bridge.close()
            drv.bus.close()
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def stop_when_detached(server: NicServer, wait: float = 2.0) -> None:
    """Stop ``server`` once every session noticed its client left (at most ``wait``
    seconds), so no socket is closed under a session still reading it."""
    deadline = time.monotonic() + wait
    while any(s.attached for s in server.servers.values()) and time.monotonic() < deadline:
        time.sleep(0.005)
    server.stop()
