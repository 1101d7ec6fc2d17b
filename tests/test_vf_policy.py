"""MAC and VLAN isolation, iproute2's VF knobs (issue 10, item 3), with the VF
driver model on the host against the real NIC, and a real TAP uplink for what
goes on the wire."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hostdriver import MakeDriver, vf_drivers
from tapnic import tap_nic_server

from vfnic.device.nic import Nic, NicServer, control_call
from vfnic.errors import PolicyError, SnapshotError, UsageError
from vfnic.guestdriver.driver import MailboxError, VfDriver
from vfnic.migrate import vfstate
from vfnic.regs import mailbox as M
from vfnic.savevm.migration import State
from vfnic.serve import format_vf, parse_vf_settings

ETH_TEST = 0x88B5
RING = 32
PF_MAC = bytes([0x02, 0x56, 0x46, 0, 0xFF, 0x01])  # default_mac(0, 0xFF)



def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + ETH_TEST.to_bytes(2, "big") + payload.ljust(46, b"\0")


def ours(f: bytes) -> bool:
    """A test frame (the host kernel sends its own IPv6 multicast on the TAP)."""
    return ETH_TEST.to_bytes(2, "big") in (f[12:14], f[16:18])


def receive(drv: VfDriver, count: int, timeout: float = 3.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += [f for f in drv.rx_poll() if ours(f)]
        if len(got) < count:
            time.sleep(0.001)
    return got


def quiet(drv: VfDriver, settle: float = 0.15) -> list[bytes]:
    return receive(drv, 1 << 30, settle)


@pytest.fixture
def nic() -> Iterator[NicServer]:
    with tap_nic_server("vfp", num_vfs=3) as server:
        yield server


@pytest.fixture
def make(nic: NicServer) -> Iterator[MakeDriver]:
    with vf_drivers(nic, RING) as make_driver:
        yield make_driver


# -- spoofchk and the receive address ---------------------------------------------------------


def test_spoofchk_drops_frames_with_another_source_mac(nic: NicServer, make: MakeDriver) -> None:
    d0, d1, d2 = make(0), make(1), make(2)
    forged = frame(d2.mac, d1.mac)  # vf0 pretends to be vf1
    assert d0.tx(forged)
    assert quiet(d2) == []
    assert nic.nic.vfs[0].policy.spoof_dropped == 1
    assert d0.tx(frame(d2.mac, PF_MAC))  # nor the PF's
    assert quiet(d2) == []
    assert d0.tx(frame(d2.mac, d0.mac))  # its own: delivered
    assert len(receive(d2, 1)) == 1
    info = control_call(nic.dir, {"op": "link-show"})["vfs"][0]
    assert info["spoofchk"] is True and info["spoof_dropped"] == 2
    nic.nic.set_vf(0, {"spoofchk": "off"})
    assert d0.tx(forged)
    assert receive(d2, 1) == [forged]


def test_a_vf_writing_another_vfs_mac_into_ral_rah_does_not_receive_its_traffic(
        nic: NicServer, make: MakeDriver) -> None:
    d0, d1, d2 = make(0), make(1), make(2)
    victim = d1.mac
    ral, rah = M.mac_to_words(victim)
    d0.set_reg("RAL", ral)  # the attack through the registers, not the mailbox
    d0.set_reg("RAH", rah | 1 << 31)
    assert d2.tx(frame(victim, d2.mac, b"for vf1"))
    assert [f[14:21] for f in receive(d1, 1)] == [b"for vf1"]
    assert quiet(d0) == []
    assert nic.nic.vfs[0].policy.mac_refused >= 1
    assert nic.nic.vfs[0].rx_mac == d0.mac


def test_a_vf_may_pick_a_free_mac_through_the_registers(nic: NicServer, make: MakeDriver) -> None:
    d0, d2 = make(0), make(2)
    new = bytes.fromhex("02aabbccdd01")
    ral, rah = M.mac_to_words(new)
    d0.set_reg("RAL", ral)
    d0.set_reg("RAH", rah | 1 << 31)
    assert d2.tx(frame(new, d2.mac))
    assert len(receive(d0, 1)) == 1


def test_mailbox_set_mac_of_another_vf_is_refused(nic: NicServer, make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    with pytest.raises(MailboxError):
        d0.mailbox_request(M.MsgType.SET_MAC, M.mac_to_words(d1.mac))
    assert nic.nic.vfs[0].perm_mac == d0.mac


def test_an_administrative_mac_holds_unless_the_vf_is_trusted(nic: NicServer,
                                                              make: MakeDriver) -> None:
    nic.nic.set_vf(0, {"mac": "02:00:00:00:aa:01"})
    d0, d2 = make(0), make(2)
    assert d0.mac == bytes.fromhex("02000000aa01")
    other = bytes.fromhex("02000000aa02")
    with pytest.raises(MailboxError):
        d0.mailbox_request(M.MsgType.SET_MAC, M.mac_to_words(other))
    ral, rah = M.mac_to_words(other)
    d0.set_reg("RAL", ral)
    d0.set_reg("RAH", rah | 1 << 31)
    assert d2.tx(frame(other, d2.mac))
    assert quiet(d0) == []
    nic.nic.set_vf(0, {"trust": "on"})
    d0.mailbox_request(M.MsgType.SET_MAC, M.mac_to_words(other))
    d0.set_reg("RAL", ral)
    d0.set_reg("RAH", rah | 1 << 31)
    assert d2.tx(frame(other, d2.mac))
    assert len(receive(d0, 1)) == 1


def test_duplicate_macs_are_refused(nic: NicServer) -> None:
    nic.nic.set_vf(0, {"mac": "02:00:00:00:00:10"})
    with pytest.raises(PolicyError, match="already used by vf0"):
        nic.nic.set_vf(1, {"mac": "02:00:00:00:00:10"})
    with pytest.raises(UsageError, match="already used"):
        control_call(nic.dir, {"op": "vf-set", "vf": 2, "settings": {"mac": "02:00:00:00:00:10"}})
    with pytest.raises(PolicyError):  # the PF's own address too
        nic.nic.set_vf(1, {"mac": PF_MAC.hex(":")})


def test_settings_are_checked_whole_before_any_applies(nic: NicServer) -> None:
    fn = nic.nic.vfs[1]
    for bad in ({"vlan": 4095}, {"qos": 8, "vlan": 3}, {"qos": 2}, {"spoofchk": "maybe"},
                {"max_tx_rate": -1}, {"max_tx_rate": 10, "min_tx_rate": 20},
                {"state": "sideways"}, {"colour": "red"}, {"mac": "01:00:00:00:00:01"}):
        with pytest.raises(PolicyError):
            nic.nic.set_vf(1, {"trust": "on", **bad})
        assert fn.policy.trust is False and fn.policy.vlan == 0


# -- port VLAN, on a real TAP ---------------------------------------------------------------


SOL_PACKET, PACKET_AUXDATA = 263, 8
TP_STATUS_VLAN_VALID = 1 << 4


def tap_socket(name: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    s.bind((name, 0))
    s.settimeout(0.2)
    return s


def wire_frames(s: socket.socket, ethertype: int = ETH_TEST, settle: float = 1.0
                ) -> list[tuple[int | None, bytes]]:
    """Frames the NIC sent on its uplink: (VLAN TCI or None, frame without the tag)."""
    out = []
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        try:
            data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(20))
        except TimeoutError:
            continue
        tci = None
        for level, kind, cdata in anc:
            if level == SOL_PACKET and kind == PACKET_AUXDATA:
                status, _l, _s, _m, _n, vtci = struct.unpack_from("<IIIHHH", cdata)
                if status & TP_STATUS_VLAN_VALID:
                    tci = vtci
        if data[12:14] == b"\x81\x00":  # the kernel left the tag in place
            tci, data = int.from_bytes(data[14:16], "big"), data[:12] + data[16:]
        if int.from_bytes(data[12:14], "big") == ethertype:
            out.append((tci, data))
    return out


def test_port_vlan_tags_on_the_wire_and_isolates_the_vf(nic: NicServer, make: MakeDriver) -> None:
    uplink = nic.nic.switch.uplink
    assert uplink is not None
    nic.nic.set_vf(0, {"vlan": 10, "qos": 3})
    nic.nic.set_vf(1, {"vlan": 10})
    d0, d1, d2 = make(0), make(1), make(2)
    s = tap_socket(uplink.name)
    try:
        bcast = b"\xff" * 6
        assert d0.tx(frame(bcast, d0.mac, b"vlan10"))
        sent = wire_frames(s)
        assert [(tci, f[14:20]) for tci, f in sent] == [(3 << 13 | 10, b"vlan10")]
        got = receive(d1, 1)  # same port VLAN: untagged in the VF
        assert len(got) == 1 and got[0][12:14] == ETH_TEST.to_bytes(2, "big")
        assert quiet(d2) == []  # a VF without that VLAN sees nothing of it
        # A VF with a port VLAN may not send tagged frames itself.
        tagged = bcast + d0.mac + b"\x81\x00" + (20).to_bytes(2, "big") + \
            ETH_TEST.to_bytes(2, "big") + bytes(46)
        assert d0.tx(tagged)
        assert quiet(d1) == [] and quiet(d2) == []
        # An untrusted VF without a port VLAN may not hop into VLAN 10.
        hop = bcast + d2.mac + b"\x81\x00" + (10).to_bytes(2, "big") + \
            ETH_TEST.to_bytes(2, "big") + bytes(46)
        assert d2.tx(hop)
        assert quiet(d0) == [] and quiet(d1) == []
        assert nic.nic.vfs[2].policy.vlan_dropped == 1
        # From the wire: VLAN 10 reaches vf0/vf1 untagged; untagged reaches vf2 only.
        s.send(d0.mac + bytes.fromhex("02aaaaaaaa01") + b"\x81\x00" + (10).to_bytes(2, "big")
               + ETH_TEST.to_bytes(2, "big") + b"from-wire".ljust(46, b"\0"))
        got = receive(d0, 1)
        assert len(got) == 1 and got[0][12:14] == ETH_TEST.to_bytes(2, "big")
        s.send(d0.mac + bytes.fromhex("02aaaaaaaa01") + ETH_TEST.to_bytes(2, "big") + bytes(46))
        assert quiet(d0) == []
        s.send(d2.mac + bytes.fromhex("02aaaaaaaa01") + ETH_TEST.to_bytes(2, "big") + bytes(46))
        assert len(receive(d2, 1)) == 1
    finally:
        s.close()


# -- rate limit -------------------------------------------------------------------------------


def test_max_tx_rate_paces_the_vf(nic: NicServer, make: MakeDriver) -> None:
    d0, d1 = make(0), make(1)
    payload = bytes(986)  # 1000-byte frames

    def send_all(n: int) -> float:
        t = time.monotonic()
        left = n
        got = 0
        while got < n:
            if left and d0.tx(frame(d1.mac, d0.mac, payload)):
                left -= 1
            got += len([f for f in d1.rx_poll() if ours(f)])
            d0.rx_poll()
            if time.monotonic() - t > 20:
                raise AssertionError(f"only {got} of {n} frames arrived")
        return time.monotonic() - t

    fast = send_all(20)
    nic.nic.set_vf(0, {"max_tx_rate": 1})  # 1 Mbit/s: 20 kB take >= 0.16 s minus the burst
    paced = send_all(20)
    assert paced >= 0.12 and paced > 2 * fast, (fast, paced)
    assert control_call(nic.dir, {"op": "link-show"})["vfs"][0]["max_tx_rate"] == 1


# -- the settings are the host's: resets, reboots, migrations ---------------------------------


def test_settings_survive_vf_reset_and_a_new_client(nic: NicServer, make: MakeDriver) -> None:
    nic.nic.set_vf(0, {"mac": "02:00:00:00:bb:01", "vlan": 7, "trust": "on", "spoofchk": "off",
                       "max_tx_rate": 50, "state": "enable"})
    d0 = make(0)
    d0.bus.close()  # guest reboot: the client goes, a new one comes and resets the VF
    d0 = make(0)
    pol = nic.nic.vfs[0].policy
    assert (pol.vlan, pol.trust, pol.spoofchk, pol.max_tx_rate) == (7, True, False, 50)
    assert d0.mac == bytes.fromhex("02000000bb01")
    info = control_call(nic.dir, {"op": "link-show"})["vfs"][0]
    assert info["state"] == "enable" and info["mac"] == "02:00:00:00:bb:01"


def test_the_destinations_settings_apply_after_a_migration() -> None:
    src_nic, dst_nic = Nic(1, nic_id=1), Nic(2, nic_id=2)
    dst_nic.set_vf(0, {"mac": "02:00:00:00:cc:01", "vlan": 30, "state": "disable"})
    src_nic.set_vf(0, {"spoofchk": "off", "state": "enable"})
    src, dst = src_nic.vfs[0], dst_nic.vfs[0]
    vfstate.load(dst, vfstate.save(src))  # as dbus-vmstate's Save and Load do
    assert dst.rx_mac == dst.perm_mac == bytes.fromhex("02000000cc01")
    assert dst.policy.vlan == 30 and dst.policy.spoofchk is True
    assert dst.link_state == 2  # disable, the destination's


def test_a_restore_whose_mac_is_taken_on_the_destination_is_refused() -> None:
    src_nic, dst_nic = Nic(1, nic_id=1), Nic(2, nic_id=2)
    src = src_nic.vfs[0]
    dst_nic.set_vf(1, {"mac": src.perm_mac.hex(":")})
    dst = dst_nic.vfs[0]
    before = bytes(dst.config.data), dict(dst.bank.values)
    src.migration.set_state(State.STOP_COPY)
    data = src.migration.read(1 << 20)
    dst.migration.set_state(State.RESUMING)
    dst.migration.write(data)
    with pytest.raises(SnapshotError, match="in use by vf1"):
        dst.migration.set_state(State.STOP)
    assert (bytes(dst.config.data), dict(dst.bank.values)) == before
    assert dst.migration.state == State.RESUMING


# -- the command line -------------------------------------------------------------------------


def test_link_set_grammar() -> None:
    assert parse_vf_settings("vf 2 mac 02:00:00:00:00:01 vlan 5 qos 1 spoofchk off".split()) == (
        2, {"mac": "02:00:00:00:00:01", "vlan": "5", "qos": "1", "spoofchk": "off"})
    assert parse_vf_settings("vf 0 state migrate".split()) == (0, {"state": "migrate"})
    for bad in ("vf x mac 1", "vf 0 qos 1 vlan 2", "vf 0 mac", "vf 0 colour red",
                "vf 0 trust on trust off", "vf 0 state suspend trust on", "pf 0 mac 1"):
        with pytest.raises(UsageError):
            parse_vf_settings(bad.split())


def test_link_show_prints_like_ip_link() -> None:
    vf = {"vf": 3, "mac": "02:00:00:00:00:03", "vlan": 5, "qos": 2, "max_tx_rate": 100,
          "min_tx_rate": 0, "spoofchk": True, "state": "auto", "trust": False, "link": "up",
          "attached": True}
    assert format_vf(vf) == (
        "    vf 3     link/ether 02:00:00:00:00:03 brd ff:ff:ff:ff:ff:ff, vlan 5, qos 2, "
        "max_tx_rate 100Mbps, spoof checking on, link-state auto, trust off, link up, attached")


def test_an_out_of_range_link_state_does_not_break_link_show(nic: NicServer) -> None:
    nic.nic.vfs[0].link_state = 9  # e.g. left by an old server; a restore now refuses it
    info = control_call(nic.dir, {"op": "link-show"})
    assert info["vfs"][0]["state"] == "unknown(9)"
