"""PF-VF mailbox messages (82599 section 8.3.5 in spirit, simplified).

Two buffers in each VF's BAR0:
  VFMBMEM0..7   VF -> PF request; the PF writes its reply over it.
  VFMBMEM8..15  PF -> VF message (notifications and migration commands).

VF request:  write VFMBMEM0.. (word 0 = message type), then VFMBDOORBELL = REQ.
             The PF answers at once: reply in VFMBMEM0.. with ACK or NACK set in
             word 0, VFMAILBOX.PFACK set, mailbox interrupt (EICR bit 30).
             The VF clears PFACK (W1C).
PF message:  the PF writes VFMBMEM8.., sets VFMAILBOX.PFSTS, raises the mailbox
             interrupt. The VF reads it, clears PFSTS (W1C), optionally writes a
             reply in VFMBMEM0.. (word 0 = type | ACK) and writes
             VFMBDOORBELL = ACK. The PF reports the acknowledgement (or a timeout)
             to whoever asked (`vfnic link set ... state ...`).
"""

from __future__ import annotations

import enum

MSG_WORDS = 8
REQ_BASE = 0  # VFMBMEM index of the VF -> PF area
PF_BASE = 8  # VFMBMEM index of the PF -> VF area

FLAG_ACK = 1 << 31
FLAG_NACK = 1 << 30
TYPE_MASK = 0xFFFF


class MsgType(enum.IntEnum):
    # VF -> PF requests
    RESET = 0x01  # reply: words 1-2 MAC, word 3 link (1 up), word 4 link state
    SET_MAC = 0x02  # words 1-2 MAC; NACK if the PF set another MAC administratively
    SET_MULTICAST = 0x03  # word 1 count, words 2.. hash bits (MTA)
    GET_LINK = 0x04  # reply: word 1 link (1 up), word 2 link state
    # PF -> VF messages
    LINK_CHANGE = 0x100  # word 1 link (1 up)
    MIGRATE = 0x200  # start dirtying DMA-written pages
    CANCEL_MIGRATION = 0x201  # stop dirtying
    SUSPEND = 0x202  # save state, stop queues, interface down; ack when done
    RESUME = 0x203  # restore state, interface up, gratuitous ARP; ack when done


RESUME_NO_GARP = 1 << 0  # RESUME word 1: do not send the gratuitous ARP (for measurements)


def mac_to_words(mac: bytes) -> tuple[int, int]:
    return int.from_bytes(mac[:4], "little"), int.from_bytes(mac[4:6], "little")


def words_to_mac(w1: int, w2: int) -> bytes:
    return w1.to_bytes(4, "little") + (w2 & 0xFFFF).to_bytes(2, "little")
