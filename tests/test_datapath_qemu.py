"""Real QEMU and real packets: a guest on a vfnic VF and a peer namespace, joined
by the NIC's uplink TAP and a Linux bridge."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from vfnic.host.vm import VM, VfioUserFunction
from vfnic.migrate.lab import GUEST_IP, Lab, sh


def wait_reachable(lab: Lab, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sh("ip", "netns", "exec", lab.ns("peer"), "ping", "-c1", "-W1", GUEST_IP,
              check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the guest never answered on its VF")


def test_guest_and_peer_ping_100_times_without_loss_and_arping_resolves(lab: Lab) -> None:
    nic_dir = lab.start_nic("a", vfs=2, nic_id=3)
    vm = VM([VfioUserFunction(nic_dir / "vf0.sock", "vf0")], command="sleep 600",
            kernel_args=[f"vfnic.ip={GUEST_IP}/24"], netns=lab.ns("a"))
    with vm:
        wait_reachable(lab)
        ping = sh("ip", "netns", "exec", lab.ns("peer"), "ping", "-c", "100", "-i", "0.02",
                  "-W", "2", GUEST_IP, check=False).stdout
        arping = sh("ip", "netns", "exec", lab.ns("peer"), "arping", "-c", "3", "-I",
                    f"{lab.ident}peer0", GUEST_IP, check=False).stdout
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "vfnic.cli", "link", "show", str(nic_dir), "--json"],
            check=True, capture_output=True, text=True).stdout)
        regs = json.loads(subprocess.run(
            [sys.executable, "-m", "vfnic.cli", "regs", str(nic_dir), "vf0", "--json"],
            check=True, capture_output=True, text=True).stdout)
    assert "100 packets transmitted, 100 received, 0% packet loss" in ping, ping
    assert "DUP" not in ping
    mac = info["vfs"][0]["mac"]
    assert re.search(rf"from {mac}", arping, re.I), arping
    stats = {r["name"]: r["value"] for r in regs}
    assert stats["GPRC"] >= 100 and stats["GPTC"] >= 100
    assert info["vfs"][0]["attached"] and info["vfs"][0]["link"] == "up"
