"""The NIC's internal L2 switch and its uplink, as on SR-IOV hardware.

Frames are switched by destination MAC: to the function whose receive address
(RAL/RAH with AV) matches, broadcast and multicast to every function and the
uplink, anything else out of the uplink. A function whose link is down neither
sends nor receives.

Isolation (the host's VF settings, vfnic.device.policy): a VF's receive address
is the one the PF approved (rx_mac: set by the host, or asked for through the
mailbox or RAL/RAH and not in use elsewhere); with spoofchk on, a frame whose
source MAC is not that address is dropped and counted. Frames belong to a VLAN
domain: a VF with a port VLAN has its frames tagged on the wire and receives
only that VLAN's frames, untagged; a VF without one sends and receives untagged
frames only, unless trusted. The PF (the host) sees every domain.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import socket
import struct
import threading
from typing import TYPE_CHECKING

from vfnic.errors import UsageError
from vfnic.regs import table as T

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction
    from vfnic.device.nic import Nic

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# A switch port: a function, its receive address (None: none valid), its link state.
Port = tuple["PciFunction", bytes | None, bool]
TPID = b"\x81\x00"  # 802.1Q tag protocol identifier
UPLINK_BURST = 32  # frames read from the TAP and switched under one interrupt
# A burst with frames that found no free RX descriptor: the reader waits this long (at
# most) for a function to post some (RDT) before reading on, instead of reading and
# dropping frames as fast as the peer sends them (CPU the guest needs). Meanwhile
# frames wait in the TAP's queue, or the host kernel drops them there, cheaply. Only a
# burst whose every receiver starved waits; frames for other functions queued behind it
# wait too, at most this long (QEMU's virtio-net stops reading its TAP the same way
# when the guest has no buffers).
UPLINK_STARVED_WAIT = 0.005
UPLINK_POLL_MS = 500  # the reader's wait for frames between checks of close()


class TapUplink:
    """The PF's uplink port: a host TAP device (created if it does not exist)."""

    def __init__(self, name: str) -> None:
        if not name or len(name) > 15:
            raise UsageError(f"bad uplink name {name!r}")
        self.name = name
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open /dev/net/tun: {exc.strerror}") from exc
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            self._set_up()
        except OSError as exc:
            os.close(self.fd)
            raise UsageError(f"cannot attach to TAP {name}: {exc.strerror}") from exc
        self.rx_frames = 0
        self.tx_frames = 0
        self._stop = False

    def _set_up(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifr = struct.pack("16sH", self.name.encode(), 0)
            flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, ifr + b"\0" * 22)[:18])[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", self.name.encode(), flags | IFF_UP)
                        + b"\0" * 22)

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
            self.tx_frames += 1
        except OSError as exc:  # e.g. the TAP is down: the frame is lost, as on a wire
            log.debug("uplink %s: %s", self.name, exc)

    def run(self, switch: Switch) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        os.set_blocking(self.fd, False)  # one read per frame, until the queue is empty
        burst = UPLINK_BURST
        while not self._stop:
            frames: list[bytes] = []
            try:
                if not poller.poll(UPLINK_POLL_MS):
                    continue
                # Whatever is queued already: switched as one burst (one interrupt).
                while len(frames) < burst:
                    frames.append(os.read(self.fd, 65536))
            except BlockingIOError:
                pass
            except OSError:
                return
            if not frames:
                continue
            if not all(frames):
                return
            self.rx_frames += len(frames)
            posted = switch.nic.rx_posted
            if posted.is_set():  # (a lock and a call less per burst when it is not)
                posted.clear()
            burst = UPLINK_BURST
            if switch.from_uplink_burst(frames) and not posted.wait(UPLINK_STARVED_WAIT):
                burst = 1  # still no descriptors: probe with one frame, not a burst to drop

    def start(self, switch: Switch) -> None:
        threading.Thread(target=self.run, args=(switch,), name=f"uplink-{self.name}",
                         daemon=True).start()

    def close(self) -> None:
        self._stop = True
        try:
            os.close(self.fd)
        except OSError:
            pass


class Switch:
    def __init__(self, nic: Nic) -> None:
        self.nic = nic
        self.uplink: TapUplink | None = None
        self.forwarded = 0

    @staticmethod
    def _link_up(fn: PciFunction) -> bool:
        return bool(fn.bank.get(T.STATUS) & T.STATUS_LU)

    @staticmethod
    def _address(fn: PciFunction) -> bytes | None:
        if not fn.bank.get(T.RAH) & T.RAH_AV:
            return None
        return fn.mac if fn.is_pf else fn.rx_mac

    @staticmethod
    def _tagged(frame: bytes) -> bool:
        return len(frame) >= 18 and frame[12:14] == TPID

    def _ingress(self, src: PciFunction, frame: bytes) -> tuple[bytes, int | None] | None:
        """A VF's frame checked and tagged by its policy: (frame, VLAN domain), or None
        if it is dropped (spoofed source, or a VLAN it may not use)."""
        pol = src.policy
        if pol.spoofchk and frame[6:12] != src.rx_mac:
            pol.spoof_dropped += 1
            src.count_drop(T.TXERRC)
            if pol.spoof_dropped == 1:
                log.warning("%s: spoofchk: dropped a frame from %s (counting further drops)",
                            src.name, frame[6:12].hex(":"))
            return None
        tagged = self._tagged(frame)
        if pol.vlan:
            if tagged:  # the port VLAN is the VF's only VLAN
                self._vlan_drop(src, "a tagged frame from a VF with a port VLAN")
                return None
            return frame[:12] + TPID + pol.tci().to_bytes(2, "big") + frame[12:], pol.vlan
        if tagged:
            if not pol.trust:
                self._vlan_drop(src, "a tagged frame from an untrusted VF")
                return None
            return frame, int.from_bytes(frame[14:16], "big") & 0xFFF
        return frame, None

    @staticmethod
    def _vlan_drop(src: PciFunction, why: str) -> None:
        src.policy.vlan_dropped += 1
        src.count_drop(T.TXERRC)
        if src.policy.vlan_dropped == 1:
            log.warning("%s: dropped %s (counting further drops)", src.name, why)

    @staticmethod
    def _egress(fn: PciFunction, frame: bytes, vid: int | None) -> bytes | None:
        """The frame as ``fn`` receives it in VLAN domain ``vid``, or None."""
        if fn.is_pf:
            return frame
        pol = fn.policy
        if pol.vlan:
            return frame[:12] + frame[16:] if vid == pol.vlan else None
        if vid is None or pol.trust:
            return frame
        return None

    @staticmethod
    def _member(fn: PciFunction, vid: int | None) -> bool:
        """Whether ``fn`` receives frames of VLAN domain ``vid`` (as ``_egress``)."""
        if fn.is_pf:
            return True
        pol = fn.policy
        if pol.vlan:
            return vid == pol.vlan
        return vid is None or pol.trust

    def to_uplink(self, src: PciFunction, frame: bytes, ports: list[Port]) -> bool:
        """Whether ``forward`` sends ``src``'s frame out of the uplink port, where the
        egress scheduler meters it: broadcast and multicast, and unicast to no function
        of its VLAN domain. (A frame the switch drops counts as one for the uplink.)"""
        dst = frame[:6]
        if dst[0] & 1:
            return True
        pol = src.policy
        if not src.is_pf and pol.vlan:
            vid: int | None = pol.vlan
        elif self._tagged(frame):
            vid = int.from_bytes(frame[14:16], "big") & 0xFFF
        else:
            vid = None
        for fn, address, _up in ports:
            if fn is not src and address == dst and self._member(fn, vid):
                return False
        return True

    def ports(self) -> list[Port]:
        """Every function with its receive address and link state, as the switch sees
        them now (they change only under the NIC lock): looked up once for a burst of
        frames switched under the lock, not once per frame."""
        return [(fn, self._address(fn), self._link_up(fn)) for fn in self.nic.functions]

    def forward(self, src: PciFunction | None, frame: bytes,
                ports: list[Port] | None = None) -> None:
        """Switch a frame sent by ``src`` (None: it came from the uplink); ``ports``:
        from ``ports()`` under the lock held since."""
        with self.nic.lock:
            if ports is None:
                ports = self.ports()
            self.forwarded += 1
            if src is not None and not self._link_up(src):
                src.count_drop(T.TXERRC)
                return
            vid: int | None = None
            if src is not None and not src.is_pf:
                checked = self._ingress(src, frame)
                if checked is None:
                    return
                frame, vid = checked
            elif self._tagged(frame):
                vid = int.from_bytes(frame[14:16], "big") & 0xFFF
            dst = frame[:6]
            if dst[0] & 1:  # broadcast / multicast: flood within the VLAN domain
                for fn, _, up in ports:
                    if fn is not src and up:
                        rx = self._egress(fn, frame, vid)
                        if rx is not None:
                            fn.datapath.receive(rx)
                if src is not None and self.uplink is not None:
                    self.uplink.send(frame)
                return
            for fn, address, up in ports:
                if fn is not src and address == dst:
                    rx = self._egress(fn, frame, vid)
                    if rx is None:
                        continue  # not in this VLAN domain
                    if up:
                        fn.datapath.receive(rx)
                    else:
                        fn.count_drop()
                    return
            if src is not None and self.uplink is not None:
                self.uplink.send(frame)

    def announce(self, fn: PciFunction, count: int = 1) -> int:
        """Announce ``fn``'s MAC on the LAN after it moved (a RARP broadcast, as QEMU's
        announce-self does for virtio-net), so the switches learn its new port."""
        mac = fn.mac if fn.is_pf else fn.rx_mac
        rarp = (b"\xff" * 6 + mac + b"\x80\x35" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3)
                + mac + b"\0" * 4 + mac + b"\0" * 4)
        frame = rarp.ljust(60, b"\0")
        for _ in range(count):
            self.forward(fn, frame)
        return count

    def from_uplink_burst(self, frames: list[bytes]) -> bool:
        """Frames read from the uplink together: each receiving function is interrupted
        once for the burst. Returns whether the burst starved: frames were missed for
        lack of RX descriptors, and every function that got frames missed some too (the
        uplink reader then waits a little for descriptors; traffic for a function with
        room never waits)."""
        with self.nic.lock:
            burst = self.nic.one_interrupt()
            with burst:
                ports = self.ports()
                forward = self.forward
                for frame in frames:
                    forward(None, frame, ports)
            return burst.starved
