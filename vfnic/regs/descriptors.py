"""Descriptor formats of the RX and TX rings (16 bytes each, 82599 legacy style).

RX descriptor (driver writes ``addr`` and clears ``status``; the device writes
``length`` and sets DD|EOP in ``status`` when a frame landed in the buffer):
  0 addr u64 | 8 length u16 | 10 csum u16 | 12 status u8 | 13 errors u8 | 14 vlan u16
  csum, with RXCSUM.PCSE set: the packet checksum (82599 7.1.6 legacy descriptor), the
  16-bit ones'-complement sum of the frame from byte PACKET_CSUM_START (after the MAC
  header) to its end, not complemented, in network byte order (0 when PCSE is clear).
TX descriptor (driver writes everything but ``status``; the device sets DD when
the frame was sent, if RS was asked for):
  0 addr u64 | 8 length u16 | 10 cso u8 | 11 cmd u8 | 12 status u8 | 13 css u8 | 14 vlan u16
  With CMD_IC (82599 7.2.3.2.2, legacy): the device sums the frame from byte css to its
  end (the 16 bits at cso included, e.g. a pseudo-header sum the driver put there) and
  writes the complement at cso; css beyond cso, or cso outside the frame: sent
  unchanged.
"""

from __future__ import annotations

import struct

DESC_SIZE = 16
RX_BUFFER_SIZE = 2048  # every RX buffer holds one whole frame (no scatter)
MAX_FRAME = 1514 + 4  # Ethernet frame without FCS, plus a VLAN tag
MIN_FRAME = 14

# Standard library only: the guest driver model (vfnic.guestdriver) uses these too.
RX_DESC = struct.Struct("<QHHBBH")  # addr, length, csum, status, errors, vlan
TX_DESC = struct.Struct("<QHBBBBH")  # addr, length, cso, cmd, status, css, vlan
RX_FIELDS = ("addr", "length", "csum", "status", "errors", "vlan")
TX_FIELDS = ("addr", "length", "cso", "cmd", "status", "css", "vlan")
STATUS_OFFSET = 12  # the status byte, in both formats
assert RX_DESC.size == TX_DESC.size == DESC_SIZE

# status bits
STAT_DD = 1 << 0  # descriptor done
STAT_EOP = 1 << 1  # end of packet
# TX cmd bits
CMD_EOP = 1 << 0
CMD_IC = 1 << 2  # insert checksum at cso, computed from css on
CMD_RS = 1 << 3  # report status: set DD when done
PACKET_CSUM_START = 14  # the RX packet checksum starts after the MAC header

# RX errors
RXERR_LEN = 1 << 0  # frame longer than the buffer (frame dropped, descriptor still used)


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones'-complement sum of ``data`` as big-endian words, an odd last
    byte padded with zero (RFC 1071); 0xFFFF stands for a nonzero sum of 0."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF  # 2**16 == 1 (mod 0xFFFF)
    return total if total or not any(data) else 0xFFFF


def packet_checksum(frame: bytes) -> int:
    """The RX descriptor's csum of ``frame`` (RXCSUM.PCSE), as RX_DESC packs it: its
    bytes in memory are the sum from PACKET_CSUM_START on, in network byte order."""
    total = ones_sum(memoryview(frame)[PACKET_CSUM_START:])
    return total >> 8 | (total & 0xFF) << 8


def insert_checksum(frame: bytes, css: int, cso: int) -> bytes:
    """``frame`` with the checksum of CMD_IC written at ``cso`` (from ``css`` on), or
    ``frame`` itself when css is beyond cso or cso not inside it."""
    if not css <= cso <= len(frame) - 2:
        return frame
    csum = 0xFFFF - ones_sum(memoryview(frame)[css:]) or 0xFFFF  # never 0 (RFC 768)
    return frame[:cso] + csum.to_bytes(2, "big") + frame[cso + 2:]
