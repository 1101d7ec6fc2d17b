"""Descriptor formats of the RX and TX rings (16 bytes each, 82599 legacy style).

RX descriptor (driver writes ``addr`` and clears ``status``; the device writes
``length`` and sets DD|EOP in ``status`` when a frame landed in the buffer):
  0 addr u64 | 8 length u16 | 10 csum u16 | 12 status u8 | 13 errors u8 | 14 vlan u16
TX descriptor (driver writes everything but ``status``; the device sets DD when
the frame was sent, if RS was asked for):
  0 addr u64 | 8 length u16 | 10 cso u8 | 11 cmd u8 | 12 status u8 | 13 css u8 | 14 vlan u16
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
CMD_RS = 1 << 3  # report status: set DD when done
# RX errors
RXERR_LEN = 1 << 0  # frame longer than the buffer (frame dropped, descriptor still used)
