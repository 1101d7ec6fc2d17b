"""The VF's Linux kernel driver (kmod/, vfnic_vf.ko) in a real guest (TCG).

The module is built by `make setup` against the guest image's kernel and installed
in the image; the guest's init loads it by modalias, nothing is started by hand.
The peer is vf1 of the same NIC, driven from the host by the Python driver model
behind a TAP in a network namespace; traffic crosses the NIC's switch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostdriver import tap_peer

from vfnic.device.nic import NicServer
from vfnic.guestdriver.bus import HostBus
from vfnic.guestdriver.driver import VfDriver
from vfnic.host import image, kmod
from vfnic.host.vm import VM, VfioUserFunction, guest_net_args, run_command
from vfnic.regs import descriptors as D
from vfnic.regs import table as T

PEER_IP, GUEST_IP = "10.7.1.1", "10.7.1.2"
UDP_PORT = 9000

# A UDP echo server for the peer namespace: every datagram goes back to its sender.
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
n = 0
while True:
    data, addr = s.recvfrom(2048)
    n += 1
    s.sendto(data, addr)
    print(f"echo {n} {addr[0]}", flush=True)
"""

# In the guest: 50 datagrams of 64..1400 bytes to the peer, count the echoes.
UDP_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3.0)
got = 0
for i in range(50):
    s.sendto(bytes([i]) * (64 + 27 * i), (sys.argv[1], int(sys.argv[2])))
    try:
        data, _ = s.recvfrom(2048)
        got += len(data) == 64 + 27 * i
    except OSError:
        pass
print(f"udp echoes {got}/50")
"""


def test_register_header_is_generated_from_the_table() -> None:
    """kmod/vfnic_regs.h is what the generator makes of the register table now."""
    text = (kmod.kmod_dir() / kmod.HEADER).read_text()
    assert text == kmod.header_text(), "stale: run `python -m vfnic.host.kmod header`"
    for reg in T.VF_TABLE:
        assert re.search(rf"X\({reg.name}, 0x{reg.offset:04x}\)", text), reg.name
    assert "#define VFNIC_RDT(n)           (0x1010 + (n) * 0x0040)" in text


def test_stale_header_is_detected(tmp_path: Path) -> None:
    stale = tmp_path / kmod.HEADER
    stale.write_text(kmod.header_text().replace("0x0030", "0x0034"))
    assert not kmod.header_is_current(stale)
    assert kmod.main(["check"]) == 0


pytestmark_qemu = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (network namespace for the peer)"),
]


def _ns() -> str:
    return f"vfnk{os.getpid() % 100000}"


@pytest.fixture
def peer(nic: NicServer) -> Iterator[tuple[VfDriver, subprocess.Popen[str]]]:
    """vf1 on the host: VfDriver + TAP PEER_IP/24 in its own namespace, a UDP echo."""
    ns = _ns()
    with tap_peer(nic, 1, ns, f"{PEER_IP}/24") as drv:
        echo = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO,
                                 PEER_IP, str(UDP_PORT)], stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
            yield drv, echo
        finally:
            echo.kill()
            echo.wait()


def _guest(nic: NicServer, script: str) -> str:
    fn = VfioUserFunction(Path(nic.dir / "vf0.sock"), "vf0")
    status, output = run_command(script, [fn], timeout=300, out=sys.stdout)
    assert status == 0, output
    return output


GUEST_SCRIPT = rf"""
set -u
cat > /run/udp.py <<'EOF'
{UDP_CLIENT}
EOF
lsmod | grep -o '^vfnic_vf'
ip -br link show vfnic0
ethtool -i vfnic0
ip addr add {GUEST_IP}/24 dev vfnic0
ip link set vfnic0 up
for i in $(seq 100); do [ "$(cat /sys/class/net/vfnic0/carrier)" = 1 ] && break; sleep 0.05; done
echo carrier=$(cat /sys/class/net/vfnic0/carrier)
grep vfnic_vf /proc/interrupts | wc -l | sed 's/^/msix-vectors=/'
ping -c 3 -i 0.2 -W 5 {PEER_IP}; rc=$?
python3 /run/udp.py {PEER_IP} {UDP_PORT}
# checksum offload (off by default): the peer's kernel drops a datagram whose checksum
# is wrong, the guest's reports a wrong packet checksum (CHECKSUM_COMPLETE)
ethtool -k vfnic0 | grep -E '^(rx|tx)-checksumming:'
ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool | grep -E '^RXCSUM ' | sed 's/^/off: /'
ethtool -K vfnic0 rx on tx on && python3 /run/udp.py {PEER_IP} {UDP_PORT} | sed 's/^/on: /'
ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool | grep -E '^RXCSUM ' | sed 's/^/on: /'
ethtool -K vfnic0 rx off tx off
dmesg | grep -c 'csum failure' | sed 's/^/csum-faults=/'
ethtool -S vfnic0
ethtool -d vfnic0 | head -3
ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool
ethtool -g vfnic0
ethtool -l vfnic0
# interrupt moderation: EITR of the queue vector (ethtool -c/-C rx-usecs)
ethtool -c vfnic0 | grep -E '^rx-usecs:' | sed 's/^/default /'
ethtool -C vfnic0 rx-usecs 200 && ethtool -c vfnic0 | grep -E '^rx-usecs:' | sed 's/^/set /'
ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool | grep -E '^EITR0 ' | sed 's/^/set: /'
ethtool -C vfnic0 rx-usecs 5000 2>/dev/null; echo "rx-usecs 5000 rc=$?"
ethtool -C vfnic0 rx-usecs 0 && ping -c 2 -i 0.2 -W 5 {PEER_IP} > /dev/null && echo "itr 0: ping ok"
ethtool -C vfnic0 rx-usecs 50
# MAC and multicast through the PF mailbox (SET_MAC, SET_MULTICAST)
ip maddr add 01:00:5e:01:02:03 dev vfnic0
ip link set vfnic0 address 02:56:46:00:00:77 && echo "mac set"
sleep 0.5
ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool | grep -E '^(RAL|RAH|MTA) ' |
    sed 's/^/after: /'
exit $rc
"""


@pytest.mark.qemu
def test_guest_kernel_driver_pings_and_udp_both_ways(
        nic: NicServer, peer: tuple[VfDriver, subprocess.Popen[str]]) -> None:
    mac = nic.nic.vfs[0].mac.hex(":")  # the PF's, before the guest sets another
    output = _guest(nic, GUEST_SCRIPT)
    assert "vfnic_vf" in output.splitlines()[0]
    assert re.search(r"vfnic0\s+DOWN\s+" + mac, output), output
    assert "driver: vfnic_vf" in output and "bus-info: 0000:" in output
    assert "carrier=1" in output and "msix-vectors=3" in output
    assert "3 received" in output
    m = re.search(r"udp echoes (\d+)/50", output)
    assert m and int(m.group(1)) >= 48, output
    # checksum offload (RXCSUM.PCSE, CMD.IC): the datagrams' checksums right both ways
    assert "rx-checksumming: off" in output and "tx-checksumming: off" in output
    assert re.search(r"^off: RXCSUM\s+0x0034 RW\s+0x00000000$", output, re.M), output
    assert re.search(r"^on: RXCSUM\s+0x0034 RW\s+0x00001000$", output, re.M), output
    m = re.search(r"on: udp echoes (\d+)/50", output)
    assert m and int(m.group(1)) >= 48, output
    assert "csum-faults=0" in output
    stats = dict(re.findall(r"^\s+(\w+): (\d+)$", output, re.M))
    assert int(stats["GPRC"]) >= 101 and int(stats["GPTC"]) >= 101
    assert int(stats["rx_packets"]) >= 101 and int(stats["tx_packets"]) >= 101
    assert "config_restores" in stats and "last_resume_us" in stats
    # ethtool -c/-C: EITR0, the queue vector's throttle, default 50 us, at most 4095
    assert "default rx-usecs: 50" in output and "set rx-usecs: 200" in output
    assert re.search(r"^set: EITR0\s+0x0040 RW\s+0x000000c8$", output, re.M), output
    assert re.search(r"rx-usecs 5000 rc=[1-9]", output) and "itr 0: ping ok" in output
    # ethtool -d, named by the register table (vfnic.regs.ethtool decodes the raw dump)
    assert re.search(r"^RAL\s+0x0020 RW\s+0x00465602$", output, re.M), output
    assert re.search(r"^RAH\s+0x0024 RW\s+0x80000100$", output, re.M)
    assert re.search(r"^STATUS\s+0x0008 RO\s+0x00000002$", output, re.M)
    assert re.search(r"^RXDCTL0\s+0x1014 RW\s+0x02000000$", output, re.M)
    # the new MAC went through the PF (its record of the VF's MAC) into RAL/RAH
    assert "mac set" in output
    assert re.search(r"^after: RAL\s+0x0020 RW\s+0x00465602$", output, re.M)
    assert re.search(r"^after: RAH\s+0x0024 RW\s+0x80007700$", output, re.M)
    assert nic.nic.vfs[0].perm_mac == bytes.fromhex("025646000077")
    mta = re.search(r"^after: MTA\s+0x0028 RW\s+(0x[0-9a-f]+)$", output, re.M)
    assert mta and int(mta.group(1), 16) != 0  # multicast groups joined: hash bits set
    assert nic.nic.vfs[0].bank.get("GPRC") >= 51
    drv, _echo = peer
    assert drv.counters.rx_frames >= 53


def test_image_carries_the_module() -> None:
    img = image.ensure_image(verbose=False)
    assert img.exists()
    module = kmod.installed_module(image.guest_root())
    assert module.exists()
    alias = (module.parents[1] / "modules.alias").read_text()
    assert "pci:v00001234d00005FE1" in alias and "vfnic_vf" in alias


CYCLE_SCRIPT = rf"""
set -u
bdf=$(basename "$(readlink /sys/class/net/vfnic0/device)")
up_vf() {{
    for n in /sys/bus/pci/devices/$bdf/net/*; do
        [ "${{n##*/}}" = vfnic0 ] || ip link set "${{n##*/}}" name vfnic0
    done
    ip addr add {GUEST_IP}/24 dev vfnic0
    ip link set vfnic0 up
    for i in $(seq 100); do
        [ "$(cat /sys/class/net/vfnic0/carrier)" = 1 ] && break; sleep 0.05
    done
    ping -c 2 -i 0.2 -W 5 {PEER_IP} > /dev/null && echo "$1: ping ok"
}}
up_vf boot
for i in 1 2 3; do
    rmmod vfnic_vf && echo "rmmod $i: $(grep -c vfnic_vf /proc/interrupts) vectors left," \
        "$(ls /sys/bus/pci/devices/$bdf/net 2>/dev/null | wc -l) netdevs left"
    modprobe "$(cat /sys/bus/pci/devices/$bdf/modalias)"
    up_vf "modprobe $i"
done
echo 1 > /sys/bus/pci/devices/$bdf/reset && echo "flr done"
for i in $(seq 100); do [ "$(cat /sys/class/net/vfnic0/carrier)" = 1 ] && break; sleep 0.05; done
ping -c 3 -i 0.2 -W 5 {PEER_IP} > /dev/null && echo "flr: ping ok"
ethtool -S vfnic0 | grep -E ' (GPRC|suspends|resumes|moves):'
dmesg | grep -E 'BUG|WARNING|Oops|leak' || echo "no kernel warnings"
"""


@pytest.mark.qemu
def test_rmmod_modprobe_cycles_and_flr_keep_the_vf_working(
        nic: NicServer, peer: tuple[VfDriver, subprocess.Popen[str]]) -> None:
    output = _guest(nic, CYCLE_SCRIPT)
    assert "boot: ping ok" in output
    for i in (1, 2, 3):
        assert f"rmmod {i}: 0 vectors left, 0 netdevs left" in output
        assert f"modprobe {i}: ping ok" in output
    assert "flr done" in output and "flr: ping ok" in output
    stats = dict(re.findall(r"^\s+(\w+): (\d+)$", output, re.M))
    assert int(stats["resumes"]) == 1 and int(stats["moves"]) == 0  # the FLR's reinit
    assert "no kernel warnings" in output


def test_register_dump_is_named_by_the_table() -> None:
    """`ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool`: one line per register."""
    from vfnic.regs import ethtool

    values = [0x1000 + i for i in range(len(T.VF_TABLE))]
    raw = b"".join(v.to_bytes(4, "little") for v in values)
    text = ethtool.render(ethtool.decode(raw))
    lines = text.splitlines()
    assert len(lines) == len(T.VF_TABLE)
    assert lines[0] == "CTRL           0x0000 RW  0x00001000"
    assert "VFMBDOORBELL   0x0104 WO  0x0000100c (write-only: reads 0)" in lines
    with pytest.raises(ethtool.DumpError, match="not a vfnic_vf register dump"):
        ethtool.decode(raw[:-4])


# The guest waits for the peer's "done" datagram, then reports the driver's counters.
HOOKS_GUEST = r"""
python3 - <<'PY'
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9100))
print("@@waiting", flush=True)
s.settimeout(300)
s.recvfrom(64)
PY
ethtool -S vfnic0 2>/dev/null | grep -E ' (suspends|resumes|pages_touched|pf_messages):'
if [ -f /run/vfnic-driver.pid ]; then
    kill -USR1 "$(cat /run/vfnic-driver.pid)"; sleep 1; grep pages_touched /run/vfnic-driver.log
fi
"""


def _ping(count: int, wait: float = 2.0) -> str:
    return subprocess.run(["ip", "netns", "exec", _ns(), "ping", "-c", str(count), "-i", "0.1",
                           "-W", str(wait), GUEST_IP], capture_output=True, text=True).stdout


@pytest.mark.qemu
@pytest.mark.parametrize("driver", ["kernel", "python"])
def test_pf_mailbox_migration_hooks(nic: NicServer, peer: tuple[VfDriver, subprocess.Popen[str]],
                                    driver: str) -> None:
    """The 2015 hooks, the same scenario for both drivers in the guest: migrate (DMA'd
    pages dirtied by the driver), suspend (queues stopped, acknowledged with its time),
    resume (queues back, a gratuitous ARP / NA sent, acknowledged, no more dirtying),
    migrate and cancelmigration."""
    fn = nic.nic.vfs[0]
    vm = VM([VfioUserFunction(Path(nic.dir / "vf0.sock"), "vf0")], command=HOOKS_GUEST,
            kernel_args=guest_net_args(f"{GUEST_IP}/24", driver))
    acks: dict[str, dict[str, object]] = {}
    with vm:
        deadline = time.monotonic() + 240
        while "@@waiting" not in vm.console_log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the guest did not come up"
            time.sleep(0.2)
        assert "5 received" in _ping(5, 5)
        acks["migrate"] = nic.migration_command(0, "migrate", 5.0)
        assert "5 received" in _ping(5)  # received while dirtying
        acks["suspend"] = nic.migration_command(0, "suspend", 5.0)
        suspended_ctl = (fn.bank.get("RXDCTL0"), fn.bank.get("TXDCTL0"))
        assert " 0 received" in _ping(2, 1)  # queues quiesced
        gptc = fn.bank.get("GPTC")
        acks["resume"] = nic.migration_command(0, "resume", 5.0)
        time.sleep(1.0)
        announced = fn.bank.get("GPTC") - gptc  # gratuitous ARP (and NA) sent on resume
        resumed_ctl = (fn.bank.get("RXDCTL0"), fn.bank.get("TXDCTL0"))
        after = _ping(5)  # not dirtied: RESUME ended the migration
        acks["migrate again"] = nic.migration_command(0, "migrate", 5.0)
        acks["cancelmigration"] = nic.migration_command(0, "cancelmigration", 5.0)
        subprocess.run(["ip", "netns", "exec", _ns(), sys.executable, "-c",
                        "import socket; socket.socket(2, 2).sendto(b'done', "
                        f"('{GUEST_IP}', 9100))"], check=True)
        assert vm.wait_exec(120) == 0, vm.output
    assert all(a["acked"] for a in acks.values()), acks
    for state in ("suspend", "resume"):
        us = acks[state]["driver_us"]
        assert isinstance(us, int) and 0 <= us < 1_000_000, acks[state]
    assert not suspended_ctl[0] & T.QCTL_ENABLE and not suspended_ctl[1] & T.QCTL_ENABLE
    assert resumed_ctl[0] & T.QCTL_ENABLE and resumed_ctl[1] & T.QCTL_ENABLE
    assert announced >= 1
    assert "5 received" in after, after
    if driver == "kernel":
        stats = dict(re.findall(r"^\s+(\w+): (\d+)$", vm.output, re.M))
        assert stats["suspends"] == "1" and stats["resumes"] == "1", vm.output
        touched, messages = int(stats["pages_touched"]), int(stats["pf_messages"])
        assert messages >= 5, vm.output
    else:
        m = re.search(r'"pages_touched": (\d+)', vm.output)
        assert m, vm.output
        touched = int(m.group(1))
    # the 5 echo requests received while dirtying (an ARP request at most besides; the
    # Python driver also touches the TX descriptors of its 5 replies), none of the 5
    # after the resume
    assert 5 <= touched < (10 if driver == "kernel" else 20), vm.output


# -- the server's per-batch work (issue 9, item 5) -------------------------------------------


def test_tx_interrupt_only_for_a_batch_that_asks_for_a_report(nic: NicServer) -> None:
    """RS once per batch (as vfnic_vf does): the device sends every frame, writes DD only
    where RS was set, and raises the queue's cause only for a batch with RS."""
    from vfnic.guestdriver.driver import TX_DESC

    drivers = [VfDriver(HostBus(str(nic.dir / f"vf{i}.sock"))) for i in range(2)]
    try:
        for drv in drivers:
            drv.init()
        tx, rx = drivers
        fn = nic.nic.vfs[0]
        ring = tx.tx_ring
        frame = rx.mac + tx.mac + b"\x88\xb5" + bytes(46)

        def queue(first: int, n: int, rs_last: bool) -> None:
            for i in range(first, first + n):
                ring.buffer(i)[: len(frame)] = frame
                cmd = D.CMD_EOP | (D.CMD_RS if rs_last and i == first + n - 1 else 0)
                TX_DESC.pack_into(ring.desc.view, i * D.DESC_SIZE, ring.buffer_phys(i),
                                  len(frame), 0, cmd, 0, 0, 0)
            tx.set_reg("EICR", 0xFFFFFFFF)
            tx.set_reg("TDT0", first + n)

        queue(0, 3, rs_last=False)
        assert fn.bank.get("TDH0") == 3 and fn.bank.get("GPTC") == 3
        assert not fn.bank.get("EICR") & 1  # no report asked for: no interrupt
        assert all(ring.desc.view[i * D.DESC_SIZE + 12] == 0 for i in range(3))
        queue(3, 4, rs_last=True)
        assert fn.bank.get("TDH0") == 7 and fn.bank.get("GPTC") == 7
        assert fn.bank.get("EICR") & 1
        assert [ring.desc.view[i * D.DESC_SIZE + 12] for i in range(3, 7)] == [0, 0, 0, 1]
        assert len(receive_all(rx, 7)) == 7
    finally:
        for drv in drivers:
            drv.bus.close()


def receive_all(drv: VfDriver, count: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += drv.rx_poll()
        time.sleep(0.001)
    return got


def test_a_burst_from_the_uplink_interrupts_once() -> None:
    """Frames switched in one burst (Nic.one_interrupt) signal the VF's queue vector once;
    frames switched one by one, once each. Counted on a real eventfd."""
    from vfnic.device import pci
    from vfnic.device.function import CAP_MSIX
    from vfnic.device.nic import Nic
    from vfnic.vfiouser import wire

    nic = Nic(1)
    fn = nic.vfs[0]
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fn.irq_fds[(wire.PciIrq.MSIX, 0)] = efd
        fn.config.set(CAP_MSIX + pci.MSIX_FLAGS, 2, pci.MSIX_FLAGS_ENABLE)
        fn.bank.set("EIMS", 1)

        def signals() -> int:
            try:
                return os.eventfd_read(efd)
            except BlockingIOError:
                return 0

        with nic.lock, nic.one_interrupt():
            for _ in range(5):
                nic.raise_cause(fn, 1)
            assert signals() == 0  # held until the burst ends
        assert signals() == 1
        for _ in range(5):
            nic.raise_cause(fn, 1)
        assert signals() == 5
    finally:
        fn.irq_fds.clear()
        os.close(efd)
