"""The VF driver model against the real NIC model, on the host (no QEMU).

Every test runs twice: "guest RAM" as a memfd the server mmaps (QEMU with
share=on memory) and as client memory reached through DMA_READ/DMA_WRITE
messages (QEMU without shared memory).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hostdriver import MakeDriver, stop_when_detached, vf_drivers

from vfnic.device.nic import NicServer
from vfnic.device.pfagent import PendingMessage
from vfnic.guestdriver import driver as G
from vfnic.guestdriver.bus import COMMAND_MASTER, COMMAND_MEMORY, PCI_COMMAND
from vfnic.guestdriver.driver import VfDriver, gratuitous_arp
from vfnic.regs import descriptors as D
from vfnic.regs import mailbox as M
from vfnic.regs import table as T

ETH_TEST = 0x88B5  # IEEE 802 local experimental ethertype
RING = 32
BAD_ADDRESS = 0xDEAD_0000_0000  # outside every DMA mapping
REPO = Path(__file__).resolve().parents[1]

def frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = ETH_TEST) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload.ljust(46, b"\0")


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def receive(drv: VfDriver, count: int, timeout: float = 5.0) -> list[bytes]:
    """Poll until ``count`` frames arrived (fd-less DMA completes asynchronously)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += drv.rx_poll()
        drv.watchdog()
        if len(got) < count:
            time.sleep(0.001)
    return got


def quiet(drv: VfDriver, settle: float = 0.1) -> list[bytes]:
    """Frames that arrive within ``settle`` seconds (expected: none)."""
    return receive(drv, 1 << 30, settle)


def pf_message(nic: NicServer, vf: int, drv: VfDriver, msg_type: int) -> PendingMessage:
    """The PF posts a message and waits for the ACK while the driver polls, as in a guest."""
    result: list[PendingMessage | BaseException] = []

    def send() -> None:
        try:
            result.append(nic.nic.pf_agent.send_and_wait(vf, msg_type, timeout=5.0))
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive():
        drv.watchdog()
        time.sleep(0.001)
    sender.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.fixture
def nic() -> Iterator[NicServer]:
    # A short folder: AF_UNIX socket paths are limited to 108 bytes.
    folder = tempfile.mkdtemp(prefix="vfn-gd-")
    server = NicServer(folder, num_vfs=3)
    server.start()
    yield server
    stop_when_detached(server)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["memfd", "messages"])
def make(request: pytest.FixtureRequest, nic: NicServer) -> Iterator[MakeDriver]:
    with vf_drivers(nic, RING, fd_backed=request.param == "memfd") as make_driver:
        yield make_driver


# -- bring-up ---------------------------------------------------------------------------


def test_init_takes_the_mac_the_pf_assigns(nic: NicServer, make: MakeDriver) -> None:
    d0 = make(0)
    assert d0.mac == nic.nic.vfs[0].perm_mac
    assert d0.get_reg(T.RAL) | (d0.get_reg(T.RAH) & 0xFFFF) << 32 == int.from_bytes(
        d0.mac, "little")
    assert d0.get_reg(T.RAH) & 1 << 31  # AV
    assert d0.link_up and d0.get_reg(T.STATUS) & T.STATUS_LU
    cmd = d0.bus.config_read(PCI_COMMAND, 2)
    assert cmd & COMMAND_MASTER and cmd & COMMAND_MEMORY
    assert d0.get_reg(T.RXDCTL(0)) & T.QCTL_ENABLE and d0.get_reg(T.TXDCTL(0)) & T.QCTL_ENABLE
    assert d0.get_reg(T.RDT(0)) == RING - 1

    nic.nic.set_vf_mac(1, "02:00:00:00:00:42")  # `vfnic link set DIR vf 1 mac ...`
    assert make(1).mac == bytes.fromhex("020000000042")


# -- the NIC's switch ----------------------------------------------------------------


def test_unicast_reaches_only_the_addressed_vf(make: MakeDriver) -> None:
    d0, d1, d2 = make(0), make(1), make(2)
    f = frame(d1.mac, d0.mac, b"to vf1")
    assert d0.tx(f)
    assert receive(d1, 1) == [f]
    assert quiet(d2) == [] and quiet(d0) == []
    assert d0.stats()["GPTC"] == 1 and d1.stats()["GPRC"] == 1
    assert d1.stats()["GORC"] == len(f)


def test_broadcast_reaches_every_other_vf(make: MakeDriver) -> None:
    d0, d1, d2 = make(0), make(1), make(2)
    f = frame(b"\xff" * 6, d2.mac, b"to all")
    assert d2.tx(f)
    assert receive(d0, 1) == [f]
    assert receive(d1, 1) == [f]
    assert quiet(d2) == []


def test_frames_for_an_unknown_mac_reach_no_vf(make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    assert d0.tx(frame(bytes.fromhex("02aabbccddee"), d0.mac, b"nobody"))
    assert quiet(d1) == []


# -- rings --------------------------------------------------------------------------------


def test_rings_wrap_around(make: MakeDriver) -> None:
    ring = 16
    d0, d1 = make(0, ring), make(1, ring)
    total, chunk = 5 * ring + 3, ring // 2
    sent = [frame(d1.mac, d0.mac, b"frame %d" % i) for i in range(total)]
    for start in range(0, total, chunk):
        batch = sent[start : start + chunk]
        assert d0.tx_batch(batch) == len(batch)
        assert receive(d1, len(batch)) == batch, f"frames {start}.."
    assert d0.tx_ring.index == d0.tx_ring.clean == total % ring
    assert d0.get_reg(T.TDH(0)) == d0.get_reg(T.TDT(0)) == total % ring
    assert d1.rx_ring.index == d1.get_reg(T.RDH(0)) == total % ring
    assert d1.get_reg(T.RDT(0)) == (total - 1) % ring  # one slot always stays empty
    assert d1.stats()["MPC"] == 0


def test_tx_batch_fills_the_ring_but_one_slot(make: MakeDriver) -> None:
    d0, d1 = make(0, 16), make(1, 32)
    frames = [frame(d1.mac, d0.mac, b"%d" % i) for i in range(20)]
    assert d0.tx_batch(frames) == 15  # TDT may not catch up with TDH
    assert d0.counters.tx_dropped == 5
    assert receive(d1, 15) == frames[:15]


def test_full_rx_ring_drops_frames_and_counts_mpc(make: MakeDriver) -> None:
    ring = 16
    d0, d1 = make(0), make(1, ring)
    sent = [frame(d1.mac, d0.mac, b"%d" % i) for i in range(40)]
    for f in sent:
        assert d0.tx(f)
    # The device owns ring - 1 descriptors; everything after is missed.
    wait_for(lambda: d1.get_reg(T.MPC) == 40 - (ring - 1), what="MPC")
    assert receive(d1, ring - 1) == sent[: ring - 1]
    assert quiet(d1) == []
    assert d1.stats()["GPRC"] == ring - 1
    # Descriptors posted back: reception goes on.
    late = frame(d1.mac, d0.mac, b"late")
    assert d0.tx(late)
    assert receive(d1, 1) == [late]


def test_oversized_and_runt_frames_are_not_sent(make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    assert not d0.tx(frame(d1.mac, d0.mac, bytes(G.MAX_FRAME)))
    assert not d0.tx(d1.mac)
    assert d0.counters.tx_dropped == 2
    assert d0.get_reg(T.QERR(0)) == 0 and quiet(d1) == []


# -- queue errors ------------------------------------------------------------------------


def test_bad_rx_descriptor_disables_the_queue_and_the_driver_recovers(
        make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    ring = d1.rx_ring
    G.RX_DESC.pack_into(ring.desc.view, ring.index * G.DESC_SIZE, BAD_ADDRESS, 0, 0, 0, 0, 0)
    assert d0.tx(frame(d1.mac, d0.mac, b"lost"))
    wait_for(lambda: d1.get_reg(T.QERR(0)) & T.QERR_DMA != 0, what="QERR0.DMA")
    assert not d1.get_reg(T.RXDCTL(0)) & T.QCTL_ENABLE
    assert d1.get_reg(T.TXDCTL(0)) & T.QCTL_ENABLE  # only the RX ring stopped

    d1.watchdog(force=True)
    assert d1.counters.queue_resets == 1
    assert d1.get_reg(T.QERR(0)) == 0 and d1.get_reg(T.RXDCTL(0)) & T.QCTL_ENABLE
    ok = frame(d1.mac, d0.mac, b"after the reset")
    assert d0.tx(ok)
    assert receive(d1, 1) == [ok]


@pytest.mark.parametrize(
    ("address", "length", "cause"),
    [(BAD_ADDRESS, 60, T.QERR_DMA), (None, 0, T.QERR_LEN), (None, D.MAX_FRAME + 1, T.QERR_LEN)],
    ids=["address", "length-0", "length-too-big"],
)
def test_bad_tx_descriptor_disables_the_queue_and_the_driver_recovers(
        make: MakeDriver, address: int | None, length: int, cause: int) -> None:
    d0, d1 = make(0), make(1)
    ring = d0.tx_ring
    addr = ring.buffer_phys(ring.index) if address is None else address
    G.TX_DESC.pack_into(ring.desc.view, ring.index * G.DESC_SIZE, addr, length, 0,
                        G.CMD_EOP | G.CMD_RS, 0, 0, 0)
    ring.index = (ring.index + 1) % ring.count
    d0.set_reg(T.TDT(0), ring.index)
    assert d0.get_reg(T.QERR(0)) & cause
    assert not d0.get_reg(T.TXDCTL(0)) & T.QCTL_ENABLE
    assert d0.stats()["TXERRC"] == 1

    d0.watchdog(force=True)
    assert d0.counters.queue_resets == 1
    assert d0.get_reg(T.QERR(0)) == 0 and d0.get_reg(T.TXDCTL(0)) & T.QCTL_ENABLE
    ok = frame(d1.mac, d0.mac, b"after the reset")
    assert d0.tx(ok)
    assert receive(d1, 1) == [ok]


def test_tail_beyond_the_ring_is_a_queue_error(make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    d1.set_reg(T.RDT(0), RING + 5)
    assert d1.get_reg(T.QERR(0)) & T.QERR_TAIL
    d1.watchdog(force=True)
    ok = frame(d1.mac, d0.mac, b"after the reset")
    assert d0.tx(ok)
    assert receive(d1, 1) == [ok]


# -- PF messages ----------------------------------------------------------------------------


def test_link_change_is_seen_and_acknowledged(nic: NicServer, make: MakeDriver) -> None:
    d0 = make(0)
    seen: list[bool] = []
    d0.link_listener = seen.append
    nic.nic.set_link_state(0, "disable")  # `vfnic link set DIR vf 0 state disable`
    pending = nic.nic.pf_agent.pending[0]
    d0.watchdog(force=True)
    assert pending.acked.is_set() and pending.reply[0] == M.MsgType.LINK_CHANGE | M.FLAG_ACK
    assert not d0.link_up and seen == [False]
    assert not d0.get_reg(T.STATUS) & T.STATUS_LU
    nic.nic.set_link_state(0, "auto")
    d0.watchdog(force=True)
    assert d0.link_up and seen == [False, True]


def test_suspend_stops_the_queues_and_resume_announces_the_address(
        nic: NicServer, make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    d1.ipv4 = bytes([10, 0, 0, 2])
    early = frame(d1.mac, d0.mac, b"before suspend")
    assert d0.tx(early)
    wait_for(lambda: d1.get_reg(T.RDH(0)) == 1, what="the early frame")

    ack = pf_message(nic, 1, d1, M.MsgType.SUSPEND)
    assert ack.reply[0] == M.MsgType.SUSPEND | M.FLAG_ACK
    assert ack.reply[1] == d1.last_suspend_us > 0
    assert d1.suspended and d1.saved is not None and d1.saved.rx_index == 1
    assert not d1.get_reg(T.RXDCTL(0)) & T.QCTL_ENABLE
    assert not d1.get_reg(T.TXDCTL(0)) & T.QCTL_ENABLE
    assert d1.rx_poll() == []  # held while the interface is down ...
    assert not d1.tx(frame(d0.mac, d1.mac, b"while suspended"))
    assert d0.tx(frame(d1.mac, d0.mac, b"missed"))
    wait_for(lambda: d1.get_reg(T.MPC) == 1, what="MPC")

    ack = pf_message(nic, 1, d1, M.MsgType.RESUME)
    assert ack.reply[0] == M.MsgType.RESUME | M.FLAG_ACK
    assert not d1.suspended and d1.get_reg(T.RXDCTL(0)) & T.QCTL_ENABLE
    assert receive(d0, 1) == [gratuitous_arp(d1.mac, d1.ipv4)]
    arp = gratuitous_arp(d1.mac, d1.ipv4)
    assert arp[12:14] == b"\x08\x06" and arp[28:32] == arp[38:42] == d1.ipv4
    again = frame(d1.mac, d0.mac, b"after resume")
    assert d0.tx(again)
    assert receive(d1, 2) == [early, again]  # ... and not lost: delivered after resume


def test_suspended_driver_takes_over_a_fresh_vf_and_keeps_its_address(
        nic: NicServer, make: MakeDriver) -> None:
    """virsh migrate: nobody restores the VF's state on the destination, the driver
    finds a VF in reset state under it, puts its PCI config back, reinitializes it
    with the address it had, and announces it."""
    d0, d1 = make(0), make(1)
    d1.ipv4 = bytes([10, 0, 0, 2])
    wanted = bytes.fromhex("02aabbccdd01")  # set through SET_MAC, not the PF's default
    d1.mailbox_request(M.MsgType.SET_MAC, M.mac_to_words(wanted))
    d1.mac = wanted
    d1._program_mac()
    pf_message(nic, 1, d1, M.MsgType.MIGRATE)
    pf_message(nic, 1, d1, M.MsgType.SUSPEND)
    assert d1.saved is not None and not d1.moved()
    config = dict((off, v) for off, _, v in d1.saved.config)
    assert config[PCI_COMMAND] & COMMAND_MASTER

    vf1 = nic.nic.vfs[1]
    with nic.nic.lock:  # what the destination host's VF looks like: FLR'd, default MAC
        vf1.perm_mac = bytes.fromhex("025646990101")
        vf1.function_reset()
    assert vf1.config.get(PCI_COMMAND, 2) & COMMAND_MASTER == 0
    assert d1.moved()
    d1.watchdog(force=True)
    assert d1.counters.moves == 1 and not d1.suspended and not d1.dirtying
    assert vf1.config.get(PCI_COMMAND, 2) & (COMMAND_MEMORY | COMMAND_MASTER) == \
        COMMAND_MEMORY | COMMAND_MASTER
    assert d1.mac == wanted and vf1.perm_mac == wanted  # the new PF learnt it too
    assert receive(d0, 1) == [gratuitous_arp(wanted, d1.ipv4)]
    after = frame(wanted, d0.mac, b"after the move")
    assert d0.tx(after)
    assert receive(d1, 1) == [after]


def test_a_fresh_vf_is_recognised_even_with_the_same_mac(nic: NicServer,
                                                         make: MakeDriver) -> None:
    """An administrator gives the VF on the destination the guest's MAC: RAH then looks
    the same, the token in SCRATCH does not."""
    d0 = make(0)
    pf_message(nic, 0, d0, M.MsgType.SUSPEND)
    assert not d0.moved() and d0.get_reg(T.SCRATCH) == d0.token != 0
    pf_message(nic, 0, d0, M.MsgType.RESUME)
    pf_message(nic, 0, d0, M.MsgType.SUSPEND)
    with nic.nic.lock:
        nic.nic.vfs[0].function_reset()  # same perm_mac: RAH comes back equal
    assert d0.get_reg(T.RAH) & 0xFFFF == int.from_bytes(d0.mac[4:], "little")
    assert d0.moved()
    d0.watchdog(force=True)
    assert d0.counters.moves == 1 and not d0.suspended and not d0.moved()


def test_migrate_dirties_every_received_buffer_until_cancelled(
        nic: NicServer, make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    pf_message(nic, 1, d1, M.MsgType.MIGRATE)
    assert d1.dirtying
    big = [frame(d1.mac, d0.mac, bytes([i]) * 1500) for i in range(5)]
    assert d0.tx_batch(big) == 5
    assert receive(d1, 5) == big
    assert d1.counters.pages_touched == 5  # 2 KiB buffers, one page each

    pf_message(nic, 1, d1, M.MsgType.CANCEL_MIGRATION)
    assert not d1.dirtying
    assert d0.tx_batch(big) == 5
    assert receive(d1, 5) == big
    assert d1.counters.pages_touched == 5


def test_resume_ends_the_dirtying(nic: NicServer, make: MakeDriver) -> None:
    """RESUME closes a migration (on the destination, or on the source after a
    rollback): the driver stops dirtying the buffers the device writes."""
    d0, d1 = make(0), make(1)
    pf_message(nic, 1, d1, M.MsgType.MIGRATE)
    pf_message(nic, 1, d1, M.MsgType.SUSPEND)
    pf_message(nic, 1, d1, M.MsgType.RESUME)
    assert not d1.dirtying and not d1.suspended
    big = [frame(d1.mac, d0.mac, bytes([i]) * 1500) for i in range(5)]
    assert d0.tx_batch(big) == 5
    assert receive(d1, 5) == big
    assert d1.counters.pages_touched == 0


def test_unknown_pf_message_is_refused(nic: NicServer, make: MakeDriver) -> None:
    d0 = make(0)
    ack = pf_message(nic, 0, d0, 0x2FF)
    assert ack.reply[0] == 0x2FF | M.FLAG_NACK


# -- the guest's code path ----------------------------------------------------------------


def test_the_driver_uses_the_devices_definitions() -> None:
    """Descriptor layouts, register offsets and bits: the same objects as the device's."""
    assert G.RX_DESC is D.RX_DESC and G.TX_DESC is D.TX_DESC
    for name in ("DESC_SIZE", "RX_BUFFER_SIZE", "MIN_FRAME", "MAX_FRAME", "STAT_DD", "STAT_EOP",
                 "CMD_EOP", "CMD_RS", "STATUS_OFFSET"):
        assert getattr(G, name) == getattr(D, name), name
    assert G.QCTL_ENABLE == T.QCTL_ENABLE and G.QERR_NAMES is T.QERR_NAMES
    assert G.REG == {r.name: r for r in T.VF_TABLE}
    assert D.STATUS_OFFSET == struct.calcsize("<QHH") == struct.calcsize("<QHBB")


def test_pci_ids_are_declared_once() -> None:
    """Only vfnic/regs/ids.py spells the NIC's device IDs; everything else imports them."""
    import re

    spelled = re.compile(r"5fe[01]", re.IGNORECASE)
    where = [str(p.relative_to(REPO)) for p in sorted((REPO / "vfnic").rglob("*.py"))
             if spelled.search(p.read_text())]
    assert where == ["vfnic/regs/ids.py"]


GUEST_IMPORTS = """
import sys
import vfnic.guestdriver.__main__, vfnic.guestdriver.tapbridge, vfnic.guestdriver.bus
bad = [m for m in sys.modules
       if m.split(".")[0] in ("construct", "hypothesis") or m.startswith("vfnic.vfiouser")]
assert not bad, bad
"""


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
def test_guest_code_path_needs_only_the_stdlib() -> None:
    # -S: no site-packages, as on the guest's bare python3.
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(["/usr/bin/python3", "-S", "-c", GUEST_IMPORTS], env=env,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["/usr/bin/python3", "-S", "-m", "vfnic.guestdriver", "--help"], env=env,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "--poll-us" in res.stdout, res.stderr


def test_entry_point_reports_a_missing_function_in_one_line(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "vfnic.guestdriver", "--bdf", "00:1f.7"],
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("vfnic-guestdriver: error: 0000:00:1f.7: no vfnic function")
    assert res.stderr.count("\n") == 1


def test_unsolicited_neighbour_advertisement_is_well_formed() -> None:
    import ipaddress
    import struct as st

    from vfnic.guestdriver.driver import unsolicited_na

    mac = bytes.fromhex("025646000001")
    addr = ipaddress.IPv6Address("fe80::56:46ff:fe00:1").packed
    frame = unsolicited_na(mac, addr)
    assert frame[:6] == bytes.fromhex("333300000001") and frame[12:14] == b"\x86\xdd"
    ip6, icmp = frame[14:54], frame[54:]
    assert ip6[6] == 58 and ip6[7] == 255 and ip6[8:24] == addr
    assert st.unpack("!H", ip6[4:6])[0] == len(icmp) == 32
    assert icmp[0] == 136 and icmp[4] & 0x20 and icmp[8:24] == addr and icmp[26:32] == mac
    # RFC 4443 2.3: summing the pseudo-header and the message, checksum included, gives 0xffff
    pseudo = ip6[8:40] + st.pack("!I3xB", len(icmp), 58)
    words = st.unpack(f"!{(len(pseudo) + len(icmp)) // 2}H", pseudo + icmp)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
