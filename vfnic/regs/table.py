"""The declarative register table: the single source of truth for BAR0.

Guest reads and writes, access semantics, reset values, save/restore and the
Hypothesis strategies are all derived from these rows. Adding a register is
one line. Names follow the style of Intel's 82599 datasheet (section 8.2),
which the 2015 prototype's ixgbevf-based VF used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Access(enum.Enum):
    RO = "RO"  # guest reads; only the device (and the save path) writes
    RW = "RW"  # guest reads and writes (bits outside ``mask`` read as 0)
    W1C = "W1C"  # guest writes 1 to clear a bit; the device sets bits
    WO = "WO"  # write-only doorbell: guest writes trigger an action, reads return 0


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: Access
    reset: int = 0
    mask: int = 0xFFFFFFFF  # implemented bits; others read 0 and ignore writes
    width: int = 4
    doc: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.width


# Geometry shared by the PF and VF banks.
BAR0_SIZE = 0x4000
NUM_QUEUES = 2
QUEUE_BASE = 0x1000
QUEUE_STRIDE = 0x40
MBX_WORDS = 16
MAX_VFS = 8  # TotalVFs: PF mailbox slots

# CTRL bits
CTRL_RST = 1 << 26  # device reset (self-clearing)
CTRL_SLU = 1 << 6  # set link up
# RAH bits
RAH_AV = 1 << 31  # address valid
# STATUS bits
STATUS_LU = 1 << 1  # link up
# EICR / EIMS cause bits: bit q = queue q RX/TX, bit 30 mailbox, bit 31 link
EICR_RTXQ_MASK = (1 << NUM_QUEUES) - 1
EICR_MAILBOX = 1 << 30
EICR_LSC = 1 << 31
# VFMAILBOX bits (82599 8.3.5.2.1 style)
MBX_REQ = 1 << 0  # VF -> PF request (doorbell bit)
MBX_ACK = 1 << 1  # VF -> PF acknowledge
MBX_VFU = 1 << 2  # VF owns the buffer
MBX_PFU = 1 << 3  # PF owns the buffer
MBX_PFSTS = 1 << 4  # PF wrote a message (W1C for the VF)
MBX_PFACK = 1 << 5  # PF acknowledged (W1C for the VF)
MBX_RSTI = 1 << 6  # PF reset in progress
MBX_RSTD = 1 << 7  # PF reset done


def R(name: str, offset: int, access: Access, reset: int = 0, mask: int = 0xFFFFFFFF,
      doc: str = "") -> Register:
    return Register(name, offset, access, reset, mask, 4, doc)


RO, RW, W1C, WO = Access.RO, Access.RW, Access.W1C, Access.WO

# Registers common to every function (PF and VF).
COMMON: list[Register] = [
    R("CTRL", 0x0000, RW, 0, CTRL_RST | CTRL_SLU, "device control"),
    R("STATUS", 0x0008, RO, 0, doc="device status (LU: link up)"),
    R("EICR", 0x0010, W1C, 0, doc="interrupt cause (write 1 to clear)"),
    R("EIMS", 0x0014, RW, 0, doc="interrupt mask: 1 = cause enabled"),
    R("EICS", 0x0018, WO, 0, doc="interrupt cause set (software trigger)"),
    R("EITR", 0x001C, RW, 0, 0xFFF, doc="interrupt throttle (us)"),
    R("RAL", 0x0020, RW, 0, doc="receive address low (MAC bytes 0-3)"),
    R("RAH", 0x0024, RW, 0, 0x8000FFFF, doc="receive address high (MAC bytes 4-5, bit31 AV)"),
    R("MTA", 0x0028, RW, 0, doc="multicast filter enable bits"),
    R("FCTRL", 0x002C, RW, 0, 0x00000700, doc="filter control (MPE, UPE, BAM)"),
    R("SCRATCH", 0x0030, RW, doc="software scratch: the device never changes it (the VF "
      "driver keeps a token there to recognise its VF)"),
    R("VFMAILBOX", 0x0100, W1C, 0, 0xFF, doc="mailbox control/status"),
    R("VFMBDOORBELL", 0x0104, WO, 0, doc="mailbox doorbell: REQ/ACK to the PF"),
    *[R(f"VFMBMEM{i}", 0x0140 + 4 * i, RW, doc=f"mailbox word {i}") for i in range(MBX_WORDS)],
    *[
        reg
        for q in range(NUM_QUEUES)
        for reg in (
            R(f"RDBAL{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x00, RW, 0, 0xFFFFFF80),
            R(f"RDBAH{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x04, RW),
            R(f"RDLEN{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x08, RW, 0, 0x000FFF80),
            R(f"RDH{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x0C, RO, doc="RX head (device)"),
            R(f"RDT{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x10, RW, 0, 0xFFFF, "RX tail"),
            R(f"RXDCTL{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x14, RW, 0, 0x02000000),
            R(f"TDBAL{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x20, RW, 0, 0xFFFFFF80),
            R(f"TDBAH{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x24, RW),
            R(f"TDLEN{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x28, RW, 0, 0x000FFF80),
            R(f"TDH{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x2C, RO, doc="TX head (device)"),
            R(f"TDT{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x30, RW, 0, 0xFFFF, "TX tail"),
            R(f"TXDCTL{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x34, RW, 0, 0x02000000),
            R(f"QERR{q}", QUEUE_BASE + q * QUEUE_STRIDE + 0x38, W1C, doc="queue error cause"),
        )
    ],
    R("GPRC", 0x2000, RO, doc="good packets received"),
    R("GPTC", 0x2004, RO, doc="good packets transmitted"),
    R("GORCL", 0x2008, RO, doc="good octets received (low)"),
    R("GORCH", 0x200C, RO, doc="good octets received (high)"),
    R("GOTCL", 0x2010, RO, doc="good octets transmitted (low)"),
    R("GOTCH", 0x2014, RO, doc="good octets transmitted (high)"),
    R("RXERRC", 0x2018, RO, doc="receive errors"),
    R("TXERRC", 0x201C, RO, doc="transmit errors"),
    R("MPC", 0x2020, RO, doc="missed packets (dropped: no RX descriptor or device stopped)"),
]

# PF-only registers: the PF side of each VF's mailbox, VF enables, uplink state.
PF_ONLY: list[Register] = [
    R("PFVFRE", 0x0400, RW, doc="VF receive enable, bit per VF"),
    R("PFVFTE", 0x0404, RW, doc="VF transmit enable, bit per VF"),
    R("PFMBICR", 0x0408, W1C, doc="mailbox interrupt cause, bit per VF (VF wrote)"),
    R("PFMBIMR", 0x040C, RW, doc="mailbox interrupt mask, bit per VF"),
    *[R(f"PFMAILBOX{v}", 0x0500 + 4 * v, W1C, 0, 0xFF, f"VF{v} mailbox (PF side)")
      for v in range(MAX_VFS)],
    *[R(f"PFMBDOORBELL{v}", 0x0600 + 4 * v, WO, doc=f"VF{v} mailbox doorbell (PF side)")
      for v in range(MAX_VFS)],
]

VF_TABLE: tuple[Register, ...] = tuple(COMMON)
PF_TABLE: tuple[Register, ...] = tuple(COMMON + PF_ONLY)


def check_table(table: tuple[Register, ...], size: int = BAR0_SIZE) -> None:
    """Registers must be aligned, inside the BAR and not overlap."""
    seen: dict[int, str] = {}
    for reg in table:
        assert reg.offset % reg.width == 0, reg.name
        assert reg.end <= size, reg.name
        assert reg.offset not in seen, (reg.name, seen.get(reg.offset))
        assert reg.reset & ~reg.mask == 0, reg.name
        seen[reg.offset] = reg.name


check_table(VF_TABLE)
check_table(PF_TABLE)
