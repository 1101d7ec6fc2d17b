"""Checksum offload (issue 9): the device inserts a TX checksum (CMD_IC, css/cso of the
legacy TX descriptor) and reports the RX packet checksum (RXCSUM.PCSE, the RX
descriptor's csum), as a driver using CHECKSUM_PARTIAL / CHECKSUM_COMPLETE needs them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tapnic import tap_nic_server
from test_datapath_batch import BUFFERS, MEM, RX_RING, TX_RING, Vf, frames_to

from vfnic.device.nic import Nic
from vfnic.regs import descriptors as D
from vfnic.regs import table as T


def rfc1071(data: bytes) -> int:
    """The ones'-complement sum, word by word with the end-around carry (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_frame(payload: bytes, src: bytes, dst: bytes) -> tuple[bytes, int, int]:
    """An Ethernet/IPv4/UDP frame whose UDP checksum field holds the pseudo-header sum,
    as Linux hands a CHECKSUM_PARTIAL skb to a driver: (frame, css, cso)."""
    saddr, daddr = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    ulen = 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 1, 0, 64, 17, 0, saddr, daddr)
    ip = ip[:10] + (0xFFFF - rfc1071(ip)).to_bytes(2, "big") + ip[12:]
    pseudo = rfc1071(saddr + daddr + bytes([0, 17]) + ulen.to_bytes(2, "big"))
    udp = struct.pack("!HHHH", 4000, 5000, ulen, pseudo)
    return dst + src + b"\x08\x00" + ip + udp + payload, 34, 40


def udp_checksum_ok(frame: bytes) -> bool:
    ip, udp = frame[14:34], frame[34:]
    pseudo = ip[12:20] + bytes([0, 17]) + len(udp).to_bytes(2, "big")
    return rfc1071(pseudo + udp) == 0xFFFF


@given(st.binary(max_size=1600))
def test_ones_sum_is_rfc1071s(data: bytes) -> None:
    assert D.ones_sum(data) == rfc1071(data)


@given(st.binary(min_size=0, max_size=1472))
def test_an_inserted_udp_checksum_verifies(payload: bytes) -> None:
    frame, css, cso = udp_frame(payload, b"\x02" * 6, b"\x04" * 6)
    out = D.insert_checksum(frame, css, cso)
    assert len(out) == len(frame) and out[:cso] == frame[:cso] and out[cso + 2:] == frame[cso + 2:]
    assert udp_checksum_ok(out)
    assert out[cso:cso + 2] != b"\0\0"  # RFC 768: a computed 0 goes out as 0xFFFF


def test_an_insert_outside_the_frame_sends_it_unchanged() -> None:
    frame = bytes(range(60))
    assert D.insert_checksum(frame, 34, 59) is frame
    assert D.insert_checksum(frame, 41, 40) is frame  # css beyond cso
    assert D.insert_checksum(frame, 34, 58) != frame


@pytest.fixture
def pair() -> Iterator[tuple[Vf, Vf]]:
    nic = Nic(2)
    a, b = Vf(nic, nic.vfs[0]), Vf(nic, nic.vfs[1])
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("ic", [True, False])
def test_tx_with_ic_inserts_the_checksum_and_without_it_sends_the_frame_as_is(
        pair: tuple[Vf, Vf], ic: bool) -> None:
    tx, rx = pair
    frame, css, cso = udp_frame(os.urandom(101), tx.fn.rx_mac, rx.fn.rx_mac)
    os.pwrite(tx.mem, frame, BUFFERS + 0x800)
    cmd = D.CMD_EOP | D.CMD_RS | (D.CMD_IC if ic else 0)
    os.pwrite(tx.mem, D.TX_DESC.pack(MEM + BUFFERS + 0x800, len(frame), cso, cmd, 0, css, 0),
              TX_RING)
    rx.fn.bank.set(T.RDT(0), 7)
    with tx.fn.lock:
        tx.fn.bank.set(T.TDT(0), 1)
        tx.fn.datapath.on_tail_write(T.TX, 0)
    got = rx.buffer(0, len(frame))
    assert udp_checksum_ok(got) is ic
    assert got == (D.insert_checksum(frame, css, cso) if ic else frame)


def test_rx_reports_the_packet_checksum_only_with_pcse(pair: tuple[Vf, Vf]) -> None:
    nic = pair[0].nic
    vf = pair[1]
    vf.fn.bank.set(T.RDT(0), 7)
    frames = frames_to(vf, 2, 60) + frames_to(vf, 1, 61)
    nic.switch.from_uplink_burst(frames[:1])
    assert vf.rx_desc(0)[2] == 0  # RXCSUM reset value: PCSE clear
    vf.fn.bank.set(T.RXCSUM, T.RXCSUM_PCSE)
    nic.switch.from_uplink_burst(frames[1:])
    for slot, frame in ((1, frames[1]), (2, frames[2])):
        raw = os.pread(vf.mem, 2, RX_RING + slot * D.DESC_SIZE + 10)  # csum, as it lies in memory
        assert raw == rfc1071(frame[D.PACKET_CSUM_START:]).to_bytes(2, "big")  # network order


RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.0.0.2", 5000))
s.settimeout(2.0)
print("ready", flush=True)
try:
    while True:
        print(s.recv(2048).decode(), flush=True)
except OSError:
    pass
"""


def test_a_frame_sent_with_ic_leaves_the_uplink_with_its_checksum() -> None:
    """A frame sent with CMD_IC goes out of the TAP with the checksum the device
    inserted: the peer's kernel takes it, as it takes a whole one, and drops one whose
    checksum is wrong (so it checks)."""
    ns = f"vfck{os.getpid() % 100000}"
    with tap_nic_server("vfck", num_vfs=1) as server:
        uplink = server.nic.switch.uplink
        assert uplink is not None
        tx = Vf(server.nic, server.nic.vfs[0])
        receiver = None
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            for cmd in (["link", "set", uplink.name, "netns", ns],
                        ["-n", ns, "addr", "add", "10.0.0.2/24", "dev", uplink.name],
                        ["-n", ns, "link", "set", uplink.name, "up"]):
                subprocess.run(["ip", *cmd], check=True)
            link = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", uplink.name],
                                             check=True, capture_output=True, text=True).stdout)
            peer_mac = bytes.fromhex(link[0]["address"].replace(":", ""))
            receiver = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                         RECEIVER], stdout=subprocess.PIPE, text=True)
            assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
            sends = []
            for name, ic in (("partial", True), ("whole", False), ("wrong", False)):
                frame, css, cso = udp_frame(name.encode(), tx.fn.rx_mac, peer_mac)
                if name == "whole":
                    frame = D.insert_checksum(frame, css, cso)
                sends.append((frame, css, cso, D.CMD_EOP | (D.CMD_IC if ic else 0)))
            for i, (frame, css, cso, cmd) in enumerate(sends):
                os.pwrite(tx.mem, frame, BUFFERS + 0x800 + i * 0x100)
                os.pwrite(tx.mem, D.TX_DESC.pack(MEM + BUFFERS + 0x800 + i * 0x100, len(frame),
                                                 cso, cmd, 0, css, 0),
                          TX_RING + i * D.DESC_SIZE)
            with tx.fn.lock:
                tx.fn.bank.set(T.TDT(0), len(sends))
                tx.fn.datapath.on_tail_write(T.TX, 0)
            out, _ = receiver.communicate(timeout=10)
            assert out.split() == ["partial", "whole"], out
            assert uplink.tx_frames == 3
        finally:
            if receiver is not None and receiver.poll() is None:
                receiver.kill()
                receiver.wait()
            tx.close()
            subprocess.run(["ip", "netns", "del", ns], check=False)
