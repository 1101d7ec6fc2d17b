"""The PF side of the PF-VF mailbox: what the host's PF driver does for its VFs.

VF requests (RESET, SET_MAC, SET_MULTICAST, GET_LINK) are answered at once,
inside the VF's doorbell write. PF messages (LINK_CHANGE and the migration
commands) are posted to the VF and, when asked, waited for: the caller gets
the VF driver's acknowledgement or a timeout. See vfnic/regs/mailbox.py.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vfnic.errors import TransportError
from vfnic.regs import mailbox as M
from vfnic.regs import table as T

if TYPE_CHECKING:
    from vfnic.device.function import PciFunction
    from vfnic.device.nic import Nic

log = logging.getLogger(__name__)


class MailboxTimeout(TransportError):
    """The VF driver did not acknowledge a PF message in time."""


@dataclass
class PendingMessage:
    msg_type: int
    sent: float
    words: list[int] = field(default_factory=list)
    acked: threading.Event = field(default_factory=threading.Event)
    reply: list[int] = field(default_factory=list)
    rtt: float = 0.0
    abandoned: bool = False  # its sender stopped waiting


class PfAgent:
    def __init__(self, nic: Nic) -> None:
        self.nic = nic
        self.pending: dict[int, PendingMessage] = {}  # VF index -> message in the mailbox
        self.queued: dict[int, list[PendingMessage]] = {}  # behind it, in order

    # -- VF -> PF ----------------------------------------------------------------------

    def _words(self, fn: PciFunction, base: int, n: int = M.MSG_WORDS) -> list[int]:
        return [fn.bank.get(T.VFMBMEM(base + i)) for i in range(n)]

    def _write(self, fn: PciFunction, base: int, words: list[int]) -> None:
        for i, w in enumerate(words[: M.MSG_WORDS]):
            fn.bank.set(T.VFMBMEM(base + i), w & 0xFFFFFFFF)

    def _pf_view(self, fn: PciFunction, bits: int) -> None:
        """Mirror mailbox activity in the PF's registers (PFMAILBOXn, PFMBICR)."""
        pf = self.nic.pf
        if fn.index < T.MAX_VFS:
            pf.bank.set(T.PFMAILBOX(fn.index), bits & 0xFF)
            pf.bank.set_bits(T.PFMBICR, 1 << fn.index)

    def on_vf_doorbell(self, fn: PciFunction, value: int) -> None:
        if value & T.MBX_REQ:
            self._request(fn)
        if value & T.MBX_ACK:
            self._acknowledged(fn)

    def _request(self, fn: PciFunction) -> None:
        words = self._words(fn, M.REQ_BASE)
        msg_type = words[0] & M.TYPE_MASK
        reply = [msg_type | M.FLAG_ACK]
        link_up = 1 if fn.bank.get(T.STATUS) & T.STATUS_LU else 0
        if msg_type == M.MsgType.RESET:
            fn.datapath.backlog.clear()
            for q in range(T.NUM_QUEUES):
                fn.bank.set(T.RXDCTL(q), 0)
                fn.bank.set(T.TXDCTL(q), 0)
            reply += [*M.mac_to_words(fn.perm_mac), link_up, fn.link_state]
        elif msg_type == M.MsgType.SET_MAC:
            mac = M.words_to_mac(words[1], words[2])
            why = self.nic.mac_refusal(fn, mac)
            if why is not None:
                fn.policy.mac_refused += 1
                log.warning("%s: mailbox SET_MAC %s refused: %s", fn.name, mac.hex(":"), why)
                reply = [msg_type | M.FLAG_NACK]
            else:
                fn.perm_mac = mac
        elif msg_type == M.MsgType.SET_MULTICAST:
            fn.bank.set(T.MTA, words[2] if words[1] else 0)
        elif msg_type == M.MsgType.GET_LINK:
            reply += [link_up, fn.link_state]
        else:
            reply = [msg_type | M.FLAG_NACK]
        self._write(fn, M.REQ_BASE, reply + [0] * (M.MSG_WORDS - len(reply)))
        fn.bank.set_bits(T.VFMAILBOX, T.MBX_PFACK)
        self._pf_view(fn, T.MBX_REQ)
        self.nic.raise_cause(fn, T.EICR_MAILBOX)

    def _acknowledged(self, fn: PciFunction) -> None:
        self._pf_view(fn, T.MBX_ACK)
        pending = self.pending.get(fn.index)
        if pending is None:
            return
        reply = self._words(fn, M.REQ_BASE)
        if reply[0] & M.TYPE_MASK != pending.msg_type:
            return  # an ACK for something else: keep waiting
        pending.reply = reply
        pending.rtt = time.monotonic() - pending.sent
        pending.acked.set()
        del self.pending[fn.index]
        self._next(fn)

    def _next(self, fn: PciFunction) -> None:
        """Write the next queued message now that the mailbox is free."""
        queue = self.queued.get(fn.index, [])
        while queue:
            nxt = queue.pop(0)
            if not nxt.abandoned:
                self._write_message(fn, nxt)
                return

    # -- PF -> VF ----------------------------------------------------------------------

    def post(self, fn: PciFunction, msg_type: int,
             words: list[int] | None = None) -> PendingMessage:
        """Write a PF message into the VF's mailbox and interrupt it (NIC lock held)."""
        pending = PendingMessage(msg_type, time.monotonic(), list(words or []))
        current = self.pending.get(fn.index)
        # One message in the mailbox at a time: a message someone waits for is not
        # overwritten (the VF would never see it); a bare notification may be.
        if current is not None and not current.abandoned and \
                current.msg_type != M.MsgType.LINK_CHANGE:
            self.queued.setdefault(fn.index, []).append(pending)
        else:
            self._write_message(fn, pending)
        return pending

    def _write_message(self, fn: PciFunction, pending: PendingMessage) -> None:
        body = [pending.msg_type, *pending.words]
        self._write(fn, M.PF_BASE, body + [0] * (M.MSG_WORDS - len(body)))
        pending.sent = time.monotonic()
        self.pending[fn.index] = pending
        fn.bank.set_bits(T.VFMAILBOX, T.MBX_PFSTS)
        self.nic.raise_cause(fn, T.EICR_MAILBOX)

    def send_and_wait(self, vf: int, msg_type: int, timeout: float,
                      words: list[int] | None = None) -> PendingMessage:
        """Post a PF message and wait (without the NIC lock) for the VF driver's ACK."""
        with self.nic.lock:
            pending = self.post(self.nic.vfs[vf], msg_type, words)
        if not pending.acked.wait(timeout):
            with self.nic.lock:
                pending.abandoned = True
                if self.pending.get(vf) is pending:
                    del self.pending[vf]
                    self._next(self.nic.vfs[vf])
            name = M.MsgType(msg_type).name.lower()
            raise MailboxTimeout(f"vf {vf}: no acknowledgement of {name} within {timeout:g} s")
        return pending

    def notify_link(self, fn: PciFunction) -> None:
        up = 1 if fn.bank.get(T.STATUS) & T.STATUS_LU else 0
        self.post(fn, M.MsgType.LINK_CHANGE, [up])
