"""Descriptor formats of the RX and TX rings (16 bytes each, 82599 legacy style).

RX descriptor (driver writes ``addr`` and clears ``status``; the device writes
``length`` and sets DD|EOP in ``status`` when a frame landed in the buffer):
  0 addr u64 | 8 length u16 | 10 csum u16 | 12 status u8 | 13 errors u8 | 14 vlan u16
TX descriptor (driver writes everything but ``status``; the device sets DD when
the frame was sent, if RS was asked for):
  0 addr u64 | 8 length u16 | 10 cso u8 | 11 cmd u8 | 12 status u8 | 13 css u8 | 14 vlan u16
"""

from __future__ import annotations

from construct import Int8ul, Int16ul, Int64ul, Struct

from vfnic.vfiouser.wire import packer

DESC_SIZE = 16
RX_BUFFER_SIZE = 2048  # every RX buffer holds one whole frame (no scatter)
MAX_FRAME = 1514 + 4  # Ethernet frame without FCS, plus a VLAN tag
MIN_FRAME = 14

RxDesc = Struct(
    "addr" / Int64ul,
    "length" / Int16ul,
    "csum" / Int16ul,
    "status" / Int8ul,
    "errors" / Int8ul,
    "vlan" / Int16ul,
)
TxDesc = Struct(
    "addr" / Int64ul,
    "length" / Int16ul,
    "cso" / Int8ul,
    "cmd" / Int8ul,
    "status" / Int8ul,
    "css" / Int8ul,
    "vlan" / Int16ul,
)
RX_DESC = packer(RxDesc)
TX_DESC = packer(TxDesc)

# status bits
STAT_DD = 1 << 0  # descriptor done
STAT_EOP = 1 << 1  # end of packet
# TX cmd bits
CMD_EOP = 1 << 0
CMD_RS = 1 << 3  # report status: set DD when done
# RX errors
RXERR_LEN = 1 << 0  # frame longer than the buffer (frame dropped, descriptor still used)

# RXDCTL / TXDCTL
QCTL_ENABLE = 1 << 25

# QERRn cause bits (W1C); a queue with an error is disabled until the driver
# clears QERRn and sets ENABLE again.
QERR_DMA = 1 << 0  # a descriptor or buffer address outside the client's mappings
QERR_LEN = 1 << 1  # a TX length of 0 or above MAX_FRAME
QERR_RING = 1 << 2  # ring base/length unusable (RDLEN/TDLEN 0 or not a multiple of 128)
QERR_TAIL = 1 << 3  # tail beyond the ring
