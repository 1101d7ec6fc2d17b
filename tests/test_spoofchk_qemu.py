"""A real guest (QEMU, TCG) on vf0 with spoofchk on cannot receive another VF's
traffic by writing that VF's MAC into its RAL/RAH, nor send as it (issue 10,
item 6). vf1 (the victim) and vf2 (a sender) are host-side drivers."""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfnic.device.nic import NicServer
from vfnic.guestdriver.bus import HostBus
from vfnic.guestdriver.driver import VfDriver
from vfnic.host.vm import VfioUserFunction, guest_net_args, run_command

pytestmark = [pytest.mark.qemu]

ETH_TEST = 0x88B5

# In the guest: bring the VF up with the project's driver, write the victim's MAC
# into RAL/RAH (the register path, not the mailbox), send as the victim, then count
# for a while the frames that arrive addressed to the victim.
GUEST_SCRIPT = r"""
set -u
python3 - <<'EOF'
import time
from vfnic.guestdriver.bus import GuestBus
from vfnic.guestdriver.driver import VfDriver
from vfnic.regs import mailbox as M
victim = bytes.fromhex("{victim}")
sender = bytes.fromhex("{sender}")
d = VfDriver(GuestBus())
d.init()
ral, rah = M.mac_to_words(victim)
d.set_reg("RAL", ral)
d.set_reg("RAH", rah | 1 << 31)
print("guest: RAL/RAH now", hex(d.get_reg("RAL")), hex(d.get_reg("RAH")), flush=True)
forged = sender + victim + (0x88B5).to_bytes(2, "big") + b"forged".ljust(46, b"\0")
sent = sum(d.tx(forged) for _ in range(20))
print("guest: sent", sent, "forged frames", flush=True)
stolen = 0
end = time.monotonic() + 8
while time.monotonic() < end:
    for f in d.rx_poll():
        if f[:6] == victim and f[12:14] == (0x88B5).to_bytes(2, "big"):
            stolen += 1
    time.sleep(0.002)
print("guest: STOLEN", stolen, flush=True)
EOF
"""


@pytest.fixture
def nic() -> Iterator[NicServer]:
    folder = tempfile.mkdtemp(prefix="vfn-sq-")
    server = NicServer(folder, num_vfs=3)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_a_guest_setting_another_vfs_mac_receives_none_of_its_traffic(nic: NicServer) -> None:
    victim = VfDriver(HostBus(str(nic.dir / "vf1.sock")))
    sender = VfDriver(HostBus(str(nic.dir / "vf2.sock")))
    victim.init()
    sender.init()
    assert nic.nic.vfs[0].policy.spoofchk  # the default
    stop = threading.Event()
    counts = {"victim": 0, "forged_at_sender": 0, "sent": 0}

    def traffic() -> None:
        """vf2 sends to the victim's MAC all along; both host drivers poll."""
        frame = victim.mac + sender.mac + ETH_TEST.to_bytes(2, "big") + b"to-vf1".ljust(46, b"\0")
        while not stop.is_set():
            if sender.tx(frame):
                counts["sent"] += 1
            for f in sender.rx_poll():
                if f[6:12] == victim.mac and f[14:20] == b"forged":
                    counts["forged_at_sender"] += 1
            counts["victim"] += sum(1 for f in victim.rx_poll() if f[14:20] == b"to-vf1")
            victim.watchdog()
            sender.watchdog()
            time.sleep(0.01)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    out = io.StringIO()
    try:
        script = GUEST_SCRIPT.replace("{victim}", victim.mac.hex()).replace(
            "{sender}", sender.mac.hex())
        # The guest drives vf0's registers itself (GuestBus): no kernel driver on it.
        status, output = run_command(script, [VfioUserFunction(Path(nic.dir / "vf0.sock"), "vf0")],
                                     timeout=300, out=out,
                                     kernel_args=guest_net_args(driver="python"))
    finally:
        stop.set()
        thread.join(5)
        victim.bus.close()
        sender.bus.close()
    assert status == 0, output
    assert "guest: STOLEN 0" in output, output
    assert "guest: sent 20 forged frames" in output, output
    pol = nic.nic.vfs[0].policy
    assert pol.mac_refused >= 1  # the guest did write the victim's MAC
    assert pol.spoof_dropped >= 20 and counts["forged_at_sender"] == 0
    assert counts["victim"] > 0  # the victim kept receiving its traffic meanwhile
