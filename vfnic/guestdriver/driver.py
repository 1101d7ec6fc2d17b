"""The VF driver model: what a guest's driver does with a vfnic VF, over a Bus.

Written to read like ixy (emmericp/ixy): register names from the BAR0 table
(vfnic/regs/table.py, 82599 section 8.2 style), rings as in 82599 sections
7.1 (RX) and 7.2 (TX), the PF-VF mailbox of vfnic/regs/mailbox.py. No
interrupts: the driver polls its RX descriptors in memory, and VFMAILBOX and
QERR (each an MMIO round trip) every few milliseconds in ``watchdog``.

Stdlib only (the guest has no construct): the descriptor layouts of
vfnic/regs/descriptors.py are restated here with ``struct``; the host tests
check that both agree.
"""

from __future__ import annotations

import logging
import secrets
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from vfnic.errors import TransportError
from vfnic.guestdriver.bus import Bus, DmaMemory
from vfnic.regs import mailbox as M
from vfnic.regs import table as T
from vfnic.regs.descriptors import (
    CMD_EOP,
    CMD_RS,
    DESC_SIZE,
    MAX_FRAME,
    MIN_FRAME,
    RX_BUFFER_SIZE,
    RX_DESC,
    STAT_DD,
    STAT_EOP,
    STATUS_OFFSET,
    TX_DESC,
)
from vfnic.regs.table import Register

log = logging.getLogger("vfnic.guestdriver")

QCTL_ENABLE, QERR_NAMES = T.QCTL_ENABLE, T.QERR_NAMES
REG = {r.name: r for r in T.VF_TABLE}

DEFAULT_RING_SIZE = 128  # descriptors per ring; RDLEN must be a multiple of 128 bytes
MAILBOX_TIMEOUT = 1.0
WATCHDOG_INTERVAL = 0.005  # VFMAILBOX and QERR are polled this often
PF_MSG_ARGS: dict[int, int] = {M.MsgType.LINK_CHANGE: 1, M.MsgType.RESUME: 1}  # words per message
# The config a driver restores after its function lost it (Linux's pci_restore_state,
# reduced to what this driver uses): BAR0-5, then COMMAND (memory space, bus master).
SAVED_CONFIG = (*((0x10 + 4 * i, 4) for i in range(6)), (0x04, 2))


class DriverError(TransportError):
    """The VF does not behave as the driver expects."""


class MailboxError(DriverError):
    """The PF refused (NACK) or did not answer a mailbox request."""


@dataclass
class Ring:
    """One descriptor ring and its buffers; ``regs`` is T.RX or T.TX (RDBAL(q) or TDBAL(q))."""

    regs: T.Ring
    queue: int
    count: int
    desc: DmaMemory
    buffers: DmaMemory
    index: int = 0  # RX: next descriptor to clean; TX: next free descriptor (our TDT)
    clean: int = 0  # TX: oldest descriptor the device has not reported done

    @property
    def is_rx(self) -> bool:
        return self.regs is T.RX

    @property
    def tail(self) -> Register:  # RDT(q) / TDT(q)
        return self.regs.DT(self.queue)

    @property
    def ctl(self) -> Register:  # RXDCTL(q) / TXDCTL(q)
        return self.regs.XDCTL(self.queue)

    def buffer_phys(self, i: int) -> int:
        return self.buffers.phys + i * RX_BUFFER_SIZE

    def buffer(self, i: int) -> memoryview:
        return self.buffers.view[i * RX_BUFFER_SIZE : (i + 1) * RX_BUFFER_SIZE]


@dataclass
class Counters:
    """Driver-side (software) counters; the device's are in ``stats()``."""

    rx_frames: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # ring full, suspended, or a frame of a bad length
    queue_resets: int = 0
    pf_messages: int = 0
    pages_touched: int = 0
    moves: int = 0  # suspended on one VF, found a different one (another host's)


@dataclass
class SavedState:
    """What SUSPEND keeps for RESUME (the device may be a fresh VF by then)."""

    mac: bytes
    ipv4: bytes | None
    link_up: bool
    rx_index: int
    tx_index: int
    tx_clean: int
    counters: dict[str, int] = field(default_factory=dict)
    # The PCI config the guest programmed (BARs, then COMMAND): QEMU does not carry a
    # vfio-user function's config across a migration, so after a move we put it back.
    config: list[tuple[int, int, int]] = field(default_factory=list)


def gratuitous_arp(mac: bytes, ipv4: bytes) -> bytes:
    """ARP announcement (RFC 5227 2.3): a broadcast request for our own address."""
    eth = b"\xff" * 6 + mac + b"\x08\x06"
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ipv4, bytes(6), ipv4)
    return (eth + arp).ljust(60, b"\0")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na(mac: bytes, ipv6: bytes) -> bytes:
    """Unsolicited neighbour advertisement (RFC 4861 7.2.6) to all nodes, Override set."""
    all_nodes = bytes.fromhex("ff020000000000000000000000000001")
    icmp = struct.pack("!BBHI16sBB6s", 136, 0, 0, 0x20000000, ipv6, 2, 1, mac)
    pseudo = ipv6 + all_nodes + struct.pack("!I3xB", len(icmp), 58)
    icmp = icmp[:2] + struct.pack("!H", _checksum(pseudo + icmp)) + icmp[4:]
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), 58, 255, ipv6, all_nodes)
    return b"\x33\x33\x00\x00\x00\x01" + mac + b"\x86\xdd" + ip6 + icmp


class VfDriver:
    """Queue 0 of a vfnic VF: reset, MAC from the PF, RX/TX rings, mailbox."""

    def __init__(self, bus: Bus, ring_size: int = DEFAULT_RING_SIZE, queue: int = 0,
                 watchdog_interval: float = WATCHDOG_INTERVAL) -> None:
        if ring_size < 8 or ring_size % 8:
            raise DriverError(f"ring size {ring_size}: must be a multiple of 8 (RDLEN % 128)")
        self.bus = bus
        self.queue = queue
        self.watchdog_interval = watchdog_interval
        self.mac = bytes(6)
        self.ipv4: bytes | None = None  # for the gratuitous ARP after RESUME
        # The interface's IPv6 addresses, for unsolicited neighbour advertisements.
        self.ipv6_addresses: Callable[[], list[bytes]] | None = None
        self.link_up = False
        self.dirtying = False  # between MIGRATE and CANCEL_MIGRATION
        self.suspended = False
        self.saved: SavedState | None = None
        self.token = 0  # ours, in SCRATCH (see _claim)
        self.last_suspend_us = 0
        self.last_resume_us = 0
        self.counters = Counters()
        self.link_listener: Callable[[bool], None] | None = None  # e.g. the TAP's carrier
        self._rx_backlog: list[bytes] = []  # frames collected while stopping the queue
        self._next_watchdog = 0.0
        self.last_poll = time.monotonic()  # the poll loop's last watchdog() call
        self.rx_ring = self._alloc_ring(T.RX, ring_size)
        self.tx_ring = self._alloc_ring(T.TX, ring_size)

    # -- registers --------------------------------------------------------------------

    def get_reg(self, reg: Register | str) -> int:
        """Read a register: T.RDT(q), or a name from the VF's table."""
        return self.bus.read32(reg.offset if isinstance(reg, Register) else REG[reg].offset)

    def set_reg(self, reg: Register | str, value: int) -> None:
        self.bus.write32(reg.offset if isinstance(reg, Register) else REG[reg].offset, value)

    def _alloc_ring(self, regs: T.Ring, count: int) -> Ring:
        desc = self.bus.alloc_dma(count * DESC_SIZE, 128)  # RDBAL/TDBAL: 128-byte aligned
        # One buffer per descriptor, 2 KiB aligned so that none crosses a page.
        buffers = self.bus.alloc_dma(count * RX_BUFFER_SIZE, RX_BUFFER_SIZE)
        return Ring(regs, self.queue, count, desc, buffers)

    # -- bring-up (ixy's reset_and_init) ------------------------------------------------

    def _reset_vf(self) -> tuple[bytes, bool]:
        """Reset the VF, mark it ours (SCRATCH) and ask the PF for our MAC and link."""
        self.set_reg(T.CTRL, T.CTRL_RST)  # function reset, self-clearing
        deadline = time.monotonic() + MAILBOX_TIMEOUT
        while self.get_reg(T.CTRL) & T.CTRL_RST:
            if time.monotonic() > deadline:
                raise DriverError("CTRL.RST did not clear")
            time.sleep(0.001)
        self.bus.enable_bus_master()  # after the reset, which may clear it
        self.set_reg(T.EIMS, 0)  # no interrupts: we poll
        self.set_reg(T.EICR, 0xFFFFFFFF)
        self.set_reg(T.VFMAILBOX, T.MBX_PFSTS | T.MBX_PFACK)  # drop stale mailbox events
        self._claim()
        return self.mailbox_reset()

    def init(self) -> None:
        """Reset the VF, get the MAC from the PF, program the rings, set link up."""
        self.mac, self.link_up = self._reset_vf()
        self._program_mac()
        self._start_ring(self.rx_ring)
        self._start_ring(self.tx_ring)
        self.set_reg(T.CTRL, T.CTRL_SLU)
        self.link_up = bool(self.get_reg(T.STATUS) & T.STATUS_LU)
        log.info("%s: mac %s, link %s", self.bus.name, self.mac_text,
                 "up" if self.link_up else "down")

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    def _program_mac(self) -> None:
        """RAL/RAH with AV: the NIC's switch delivers frames for this address to us."""
        ral, rah = M.mac_to_words(self.mac)
        self.set_reg(T.RAL, ral)
        self.set_reg(T.RAH, rah | T.RAH_AV)

    def _start_ring(self, ring: Ring) -> None:
        """Program and enable a ring (82599 4.6.7.1 RX / 4.6.8.1 TX init, simplified)."""
        self.set_reg(ring.ctl, 0)  # disabled while we program it
        for i in range(ring.count):
            if ring.is_rx:
                RX_DESC.pack_into(ring.desc.view, i * DESC_SIZE, ring.buffer_phys(i), 0, 0, 0, 0, 0)
            else:
                TX_DESC.pack_into(ring.desc.view, i * DESC_SIZE, 0, 0, 0, 0, 0, 0, 0)
        ring.index = ring.clean = 0
        self.set_reg(ring.regs.DBAL(ring.queue), ring.desc.phys & 0xFFFFFFFF)
        self.set_reg(ring.regs.DBAH(ring.queue), ring.desc.phys >> 32)
        self.set_reg(ring.regs.DLEN(ring.queue), ring.count * DESC_SIZE)
        self.set_reg(ring.tail, 0)  # the head (RO) is reset by the device on enable
        self.set_reg(ring.ctl, T.QCTL_ENABLE)
        if ring.is_rx:
            # All descriptors but one belong to the device: RDT never catches up with RDH.
            self.set_reg(ring.tail, ring.count - 1)

    def _stop_ring(self, ring: Ring) -> None:
        self.set_reg(ring.ctl, 0)

    def stop(self) -> None:
        """Stop both queues and drop the link (the driver goes away)."""
        self._stop_ring(self.rx_ring)
        self._stop_ring(self.tx_ring)
        self.set_reg(T.CTRL, 0)

    # -- receive (82599 7.1) ----------------------------------------------------------

    def rx_poll(self) -> list[bytes]:
        """Frames received since the last call; their descriptors go back to the device."""
        if self.suspended:  # the interface is down: keep what arrived for resume
            return []
        frames, self._rx_backlog = self._rx_backlog, []
        last = self._rx_collect(frames)
        if last is not None:
            self.set_reg(self.rx_ring.tail, last)  # hand the cleaned descriptors back
        return frames

    def _rx_collect(self, frames: list[bytes]) -> int | None:
        """Take every done descriptor from the next-to-clean one on; re-arm each.
        Returns the index of the last one taken (the new RDT), or None."""
        ring, view = self.rx_ring, self.rx_ring.desc.view
        last = None
        while True:
            off = ring.index * DESC_SIZE
            status = view[off + STATUS_OFFSET]
            if not status & STAT_DD:
                break
            _addr, length, _csum, _status, errors, _vlan = RX_DESC.unpack_from(view, off)
            if self.dirtying:  # the device wrote this buffer: make the migration resend it
                self.counters.pages_touched += ring.buffers.touch(
                    ring.index * RX_BUFFER_SIZE, max(length, 1))
            if status & STAT_EOP and not errors and length:
                frames.append(bytes(ring.buffer(ring.index)[:length]))
                self.counters.rx_frames += 1
                self.counters.rx_bytes += length
            else:
                self.counters.rx_errors += 1
            RX_DESC.pack_into(view, off, ring.buffer_phys(ring.index), 0, 0, 0, 0, 0)
            last = ring.index
            ring.index = (ring.index + 1) % ring.count
        return last

    # -- transmit (82599 7.2) ---------------------------------------------------------

    def tx(self, frame: bytes) -> bool:
        return self.tx_batch([frame]) == 1

    def tx_batch(self, frames: Iterable[bytes]) -> int:
        """Queue frames and ring the doorbell (TDT) once. Returns how many were sent;
        the rest are dropped (ring full, queue suspended, or a bad frame length)."""
        ring, view = self.tx_ring, self.tx_ring.desc.view
        self._clean_tx()
        sent = 0
        for frame in frames:
            n = len(frame)
            nxt = (ring.index + 1) % ring.count
            if self.suspended or nxt == ring.clean or not MIN_FRAME <= n <= MAX_FRAME:
                self.counters.tx_dropped += 1
                continue
            ring.buffer(ring.index)[:n] = frame
            TX_DESC.pack_into(view, ring.index * DESC_SIZE, ring.buffer_phys(ring.index), n,
                              0, CMD_EOP | CMD_RS, 0, 0, 0)
            ring.index = nxt
            sent += 1
            self.counters.tx_frames += 1
            self.counters.tx_bytes += n
        if sent:
            self.set_reg(ring.tail, ring.index)  # the device sends [TDH, TDT) now
            self._clean_tx()
        return sent

    def _clean_tx(self) -> None:
        """Advance past the descriptors the device marked done (DD, asked for by RS)."""
        ring, view = self.tx_ring, self.tx_ring.desc.view
        while ring.clean != ring.index:
            off = ring.clean * DESC_SIZE + STATUS_OFFSET
            if not view[off] & STAT_DD:
                break
            if self.dirtying:  # the device wrote DD here
                self.counters.pages_touched += ring.desc.touch(off)
            ring.clean = (ring.clean + 1) % ring.count

    # -- PF-VF mailbox (vfnic/regs/mailbox.py) ------------------------------------------

    def mailbox_request(self, msg_type: int, words: Iterable[int] = (),
                        reply_words: int = M.MSG_WORDS) -> list[int]:
        """VF -> PF: message in VFMBMEM0.., doorbell REQ; the PF writes its reply over
        it and sets VFMAILBOX.PFACK, which we clear (W1C)."""
        for i, w in enumerate([msg_type, *words]):
            self.set_reg(T.VFMBMEM(M.REQ_BASE + i), w)
        self.set_reg(T.VFMBDOORBELL, T.MBX_REQ)
        deadline = time.monotonic() + MAILBOX_TIMEOUT
        while not self.get_reg(T.VFMAILBOX) & T.MBX_PFACK:
            if time.monotonic() > deadline:
                raise MailboxError(f"no answer from the PF to mailbox request {msg_type:#x}")
            time.sleep(0.0005)
        reply = [self.get_reg(T.VFMBMEM(M.REQ_BASE + i)) for i in range(reply_words)]
        self.set_reg(T.VFMAILBOX, T.MBX_PFACK)
        if reply[0] & M.TYPE_MASK != msg_type or not reply[0] & M.FLAG_ACK:
            raise MailboxError(f"PF refused mailbox request {msg_type:#x} ({reply[0]:#x})")
        return reply

    def mailbox_reset(self) -> tuple[bytes, bool]:
        """RESET: the PF answers with our MAC (words 1-2) and link (word 3)."""
        reply = self.mailbox_request(M.MsgType.RESET, reply_words=4)
        return M.words_to_mac(reply[1], reply[2]), reply[3] == 1

    def check_mailbox(self) -> bool:
        """Handle a PF message if VFMAILBOX.PFSTS says one is waiting."""
        if not self.get_reg(T.VFMAILBOX) & T.MBX_PFSTS:
            return False
        self.set_reg(T.VFMAILBOX, T.MBX_PFSTS)  # W1C first: a later message sets it again
        msg_type = self.get_reg(T.VFMBMEM(M.PF_BASE)) & M.TYPE_MASK
        args = [self.get_reg(T.VFMBMEM(M.PF_BASE + 1 + i))
                for i in range(PF_MSG_ARGS.get(msg_type, 0))]
        self.counters.pf_messages += 1
        handlers: dict[int, Callable[[list[int]], list[int]]] = {
            M.MsgType.LINK_CHANGE: self.on_link_change,
            M.MsgType.MIGRATE: self.on_migrate,
            M.MsgType.CANCEL_MIGRATION: self.on_cancel_migration,
            M.MsgType.SUSPEND: self.on_suspend,
            M.MsgType.RESUME: self.on_resume,
        }
        handler = handlers.get(msg_type)
        if handler is None:
            log.warning("%s: unknown PF message %#x", self.bus.name, msg_type)
            self._ack_pf(msg_type | M.FLAG_NACK, [])
            return True
        try:
            words = handler(args)
        except Exception:  # refuse the request, keep the driver (and the guest's link)
            log.exception("%s: handling PF message %#x failed", self.bus.name, msg_type)
            self._ack_pf(msg_type | M.FLAG_NACK, [])
        else:
            self._ack_pf(msg_type | M.FLAG_ACK, words)
        return True

    def _ack_pf(self, word0: int, words: list[int]) -> None:
        """Reply in VFMBMEM0.. (type | ACK), then VFMBDOORBELL = ACK."""
        for i, w in enumerate([word0, *words]):
            self.set_reg(T.VFMBMEM(M.REQ_BASE + i), w & 0xFFFFFFFF)
        self.set_reg(T.VFMBDOORBELL, T.MBX_ACK)

    # -- PF message hooks: each returns the words of its acknowledgement ------------

    def on_link_change(self, args: list[int]) -> list[int]:
        self.link_up = bool(args and args[0] == 1)
        log.info("%s: link %s", self.bus.name, "up" if self.link_up else "down")
        if self.link_listener is not None and not self.suspended:
            self.link_listener(self.link_up)
        return []

    def on_migrate(self, args: list[int]) -> list[int]:
        self.dirtying = True
        return []

    def on_cancel_migration(self, args: list[int]) -> list[int]:
        self.dirtying = False
        return []

    def on_suspend(self, args: list[int]) -> list[int]:
        return [self.suspend()]

    def on_resume(self, args: list[int]) -> list[int]:
        self.dirtying = False  # RESUME ends the migration, completed or rolled back
        garp = not (args and args[0] & M.RESUME_NO_GARP)
        return [self.resume(garp)]

    # -- suspend / resume (the cooperative half of a VF live migration) -------------

    def suspend(self) -> int:
        """Stop both queues, keep the frames already received, save the driver state.
        Returns the microseconds it took (also the SUSPEND acknowledgement's word 1)."""
        t0 = time.perf_counter()
        if not self.suspended:
            self._stop_ring(self.rx_ring)  # clearing ENABLE stops the queue at once
            self._stop_ring(self.tx_ring)
            self._rx_collect(self._rx_backlog)  # delivered by the next rx_poll
            self._clean_tx()
            self.saved = SavedState(
                self.mac, self.ipv4, self.link_up, self.rx_ring.index, self.tx_ring.index,
                self.tx_ring.clean, asdict(self.counters),
                config=[(off, size, self.bus.config_read(off, size))
                        for off, size in SAVED_CONFIG])
            self.suspended = True
            if self.link_listener is not None:
                self.link_listener(False)
        self.last_suspend_us = int((time.perf_counter() - t0) * 1e6)
        return self.last_suspend_us

    def resume(self, garp: bool = True) -> int:
        """Restore what the driver programmed (the VF may be a fresh one on another
        host), re-enable the queues, announce our IPv4 address. Returns microseconds."""
        t0 = time.perf_counter()
        if self.saved is not None:
            self.mac, self.ipv4 = self.saved.mac, self.saved.ipv4
        self.bus.enable_bus_master()
        self._program_mac()
        # The device resets RDH/TDH on enable, so the rings restart at 0 (all frames that
        # had arrived were taken by suspend()).
        self._start_ring(self.rx_ring)
        self._start_ring(self.tx_ring)
        self.set_reg(T.CTRL, T.CTRL_SLU)
        self.link_up = bool(self.get_reg(T.STATUS) & T.STATUS_LU)
        self.suspended = False
        # The gratuitous ARP first: it is what moves the peers' traffic to us. Then the
        # carrier (the guest kernel's link-up work costs ~30 ms under TCG), then IPv6.
        if garp and self.ipv4 is not None and self.link_up:
            self.tx(gratuitous_arp(self.mac, self.ipv4))
        if self.link_listener is not None:
            self.link_listener(self.link_up)
        if garp and self.link_up and self.ipv6_addresses is not None:
            for addr in self.ipv6_addresses():
                self.tx(unsolicited_na(self.mac, addr))
        self.last_resume_us = int((time.perf_counter() - t0) * 1e6)
        return self.last_resume_us

    # -- errors and housekeeping --------------------------------------------------------

    def check_queue(self) -> int:
        """QERRq set: the device disabled a ring. Clear the cause (W1C), keep what was
        received, reprogram and re-enable the disabled ring(s). Returns the QERR bits."""
        qerr = self.get_reg(T.QERR(self.queue))
        if not qerr:
            return 0
        names = "|".join(n for bit, n in QERR_NAMES.items() if qerr & bit) or hex(qerr)
        log.warning("%s: queue %d error %s: resetting the queue", self.bus.name, self.queue,
                    names)
        self.set_reg(T.QERR(self.queue), qerr)
        for ring in (self.rx_ring, self.tx_ring):
            if not self.get_reg(ring.ctl) & T.QCTL_ENABLE:
                if ring.is_rx:
                    self._rx_collect(self._rx_backlog)
                else:
                    self.counters.tx_dropped += (ring.index - ring.clean) % ring.count
                self._start_ring(ring)
        self.counters.queue_resets += 1
        return qerr

    # -- after a migration that moved no device state ---------------------------------

    def _claim(self) -> None:
        """Keep a token of ours in SCRATCH, which the device never changes: a VF whose
        state was restored keeps it, a fresh one (or an unmapped BAR) does not."""
        self.token = secrets.randbelow(0xFFFFFFFE) + 1  # never 0 nor all ones
        self.set_reg(T.SCRATCH, self.token)

    def moved(self) -> bool:
        """While suspended: is the VF under us still the one we suspended on? A VF on
        another host that nobody restored answers SCRATCH with its reset value (or
        nothing at all: its BAR is not even mapped), never with our token."""
        return self.suspended and self.token != 0 and self.get_reg(T.SCRATCH) != self.token

    def reattach(self) -> int:
        """Take over the fresh VF we were migrated onto (``virsh migrate``: libvirt moves
        the guest, the source host only suspended us): restore the PCI config the guest
        programmed, reset the VF, ask its PF for our MAC, then resume as usual, gratuitous
        ARP included. Returns microseconds."""
        assert self.saved is not None
        t0 = time.perf_counter()
        for off, size, value in self.saved.config:  # BARs first, COMMAND (decode on) last
            if value:  # a fresh function's config is zero there already
                self.bus.config_write(off, size, value)
        t_config = time.perf_counter()
        pf_mac, _link = self._reset_vf()
        if pf_mac != self.saved.mac:
            # Keep the guest's address (its peers know it) unless this PF forbids it.
            try:
                self.mailbox_request(M.MsgType.SET_MAC, M.mac_to_words(self.saved.mac))
            except MailboxError:
                log.warning("%s: the new PF refuses %s, using %s", self.bus.name,
                            self.saved.mac.hex(":"), pf_mac.hex(":"))
                self.saved.mac = pf_mac
        self.dirtying = False  # the migration is over
        self.counters.moves += 1
        t_reset = time.perf_counter()
        self.resume(garp=True)
        t1 = time.perf_counter()
        took = int((t1 - t0) * 1e6)
        log.warning("%s: migrated onto a new VF, mac %s, link %s, taken over in %.1f ms "
                    "(PCI config %.1f, reset and mailbox %.1f, rings and GARP %.1f)",
                    self.bus.name, self.mac_text, "up" if self.link_up else "down", took / 1000,
                    (t_config - t0) * 1e3, (t_reset - t_config) * 1e3, (t1 - t_reset) * 1e3)
        return took

    def watchdog(self, force: bool = False) -> None:
        """Call from the poll loop: serves the bus, and every ``watchdog_interval``
        handles PF messages and queue errors (each check is an MMIO round trip).
        While suspended it also notices a move onto a VF that nobody restored."""
        self.bus.poll()
        now = self.last_poll = time.monotonic()
        if not force and now < self._next_watchdog:
            return
        self._next_watchdog = now + self.watchdog_interval
        if self.moved():
            try:
                self.reattach()
            except Exception:  # stay suspended; try again in a second
                log.exception("%s: taking over the new VF failed", self.bus.name)
                self._next_watchdog = time.monotonic() + 1.0
            return
        self.check_mailbox()
        if not self.suspended:
            self.check_queue()

    def stats(self) -> dict[str, int]:
        """The device's statistics registers (0x2000 block); octet counts are 64-bit."""
        def wide(low: Register, high: Register) -> int:
            return self.get_reg(high) << 32 | self.get_reg(low)

        return {
            "GPRC": self.get_reg(T.GPRC),
            "GPTC": self.get_reg(T.GPTC),
            "GORC": wide(T.GORCL, T.GORCH),
            "GOTC": wide(T.GOTCL, T.GOTCH),
            "RXERRC": self.get_reg(T.RXERRC),
            "TXERRC": self.get_reg(T.TXERRC),
            "MPC": self.get_reg(T.MPC),
        }
