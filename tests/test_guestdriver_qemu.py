"""The guest driver inside a real QEMU guest (TCG): `python3 -m vfnic.guestdriver` on
vf0 through sysfs, hugetlbfs and pagemap; a host-side VfDriver behind a TAP in a
network namespace on vf1; the guest pings the host side across the NIC's switch."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostdriver import tap_peer

from vfnic.device.nic import NicServer
from vfnic.guestdriver.driver import VfDriver
from vfnic.host.vm import VfioUserFunction, guest_net_args, run_command

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (network namespace for the peer)"),
]

GUEST_SCRIPT = r"""
set -u
python3 -m vfnic.guestdriver --list
python3 -m vfnic.guestdriver --ip 10.7.0.2/24 --poll-us 1000 > /run/gd.log 2>&1 &
pid=$!
for i in $(seq 200); do grep -q ready /run/gd.log && break; sleep 0.1; done
cat /run/gd.log
ip -br link show vfnic0
ping -c 3 -i 0.3 -W 5 10.7.0.1; rc=$?
kill -USR1 $pid; sleep 0.5
kill $pid; wait $pid
cat /run/gd.log
exit $rc
"""


@pytest.fixture
def peer(nic: NicServer) -> Iterator[VfDriver]:
    """vf1 on the host: VfDriver + TAP 10.7.0.1/24 in its own namespace."""
    with tap_peer(nic, 1, f"vfnq{os.getpid() % 100000}", "10.7.0.1/24") as drv:
        yield drv


def test_guest_driver_pings_through_the_nic(nic: NicServer, peer: VfDriver) -> None:
    out = io.StringIO()
    fn = VfioUserFunction(Path(nic.dir / "vf0.sock"), "vf0")
    status, output = run_command(GUEST_SCRIPT, [fn], timeout=240, out=out,
                                 kernel_args=guest_net_args(driver="python"))
    assert status == 0, output
    assert "ready vfnic0 bdf=" in output and f"mac={nic.nic.vfs[0].mac.hex(':')}" in output
    assert "3 received" in output
    assert nic.nic.vfs[0].bank.get("GPRC") >= 3 and peer.counters.rx_frames >= 3
