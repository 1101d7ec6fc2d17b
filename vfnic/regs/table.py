"""The declarative register table: the single source of truth for BAR0.

Guest reads and writes, access semantics, reset values, save/restore and the
Hypothesis strategies are all derived from these rows. Adding a register is
one line. Names follow the style of Intel's 82599 datasheet (section 8.2),
which the 2015 prototype's ixgbevf-based VF used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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

    def __index__(self) -> int:
        """Where an integer offset is wanted (client.read32(0, T.RDT(q)), struct, slices),
        a register stands for its BAR0 offset."""
        return self.offset


# Geometry shared by the PF and VF banks.
BAR0_SIZE = 0x4000
NUM_QUEUES = 2
QUEUE_BASE = 0x1000
QUEUE_STRIDE = 0x40
MBX_WORDS = 16
NUM_VECTORS = 4  # MSI-X vectors: queue 0, queue 1, mailbox, link
EITR_MAX_US = 0xFFF  # EITRn interval field
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


# RXCSUM bits (82599 8.2.3.7.5 names the register; the bit is this device's own)
RXCSUM_PCSE = 1 << 12  # packet checksum enable: RX descriptors carry csum (descriptors.py)
# RXDCTL / TXDCTL bits
QCTL_ENABLE = 1 << 25  # queue enable
# QERRn cause bits (W1C); a queue with an error is disabled until the driver
# clears QERRn and sets ENABLE again.
QERR_DMA = 1 << 0  # a descriptor or buffer address outside the client's mappings
QERR_LEN = 1 << 1  # a TX length of 0 or above the largest frame
QERR_RING = 1 << 2  # ring base/length unusable (RDLEN/TDLEN 0 or not a multiple of 128)
QERR_TAIL = 1 << 3  # tail beyond the ring
QERR_NAMES = {QERR_DMA: "DMA", QERR_LEN: "LEN", QERR_RING: "RING", QERR_TAIL: "TAIL"}


def EICR_RTXQ(q: int) -> int:
    """EICR/EIMS cause bit of queue ``q`` (RX and TX)."""
    return 1 << q


def R(name: str, offset: int, access: Access, reset: int = 0, mask: int = 0xFFFFFFFF,
      doc: str = "") -> Register:
    return Register(name, offset, access, reset, mask, 4, doc)


@dataclass(frozen=True)
class RegisterArray:
    """A register repeated per queue, VF or word, as the datasheet writes RDT[n]:
    ``RDT(q)`` is the table's Register of queue q (named RDT0, RDT1, ...)."""

    name: str
    base: int
    stride: int
    count: int
    access: Access
    reset: int = 0
    mask: int = 0xFFFFFFFF
    doc: str = ""
    registers: tuple[Register, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regs = tuple(R(f"{self.name}{n}", self.base + n * self.stride, self.access, self.reset,
                       self.mask, self.doc.format(n=n)) for n in range(self.count))
        object.__setattr__(self, "registers", regs)

    def __call__(self, n: int) -> Register:
        if n < 0:
            raise IndexError(f"{self.name}({n}): there are {self.count}")
        return self.registers[n]  # IndexError past the last one


def _queue(name: str, off: int, access: Access, reset: int = 0, mask: int = 0xFFFFFFFF,
           doc: str = "") -> RegisterArray:
    return RegisterArray(name, QUEUE_BASE + off, QUEUE_STRIDE, NUM_QUEUES, access, reset,
                         mask, doc)


RO, RW, W1C, WO = Access.RO, Access.RW, Access.W1C, Access.WO

# Registers common to every function (PF and VF). Each row is an identifier the
# device, the guest driver model and the tests use: CTRL, RDT(q), VFMBMEM(i).
CTRL = R("CTRL", 0x0000, RW, 0, CTRL_RST | CTRL_SLU, "device control")
STATUS = R("STATUS", 0x0008, RO, 0, doc="device status (LU: link up)")
EICR = R("EICR", 0x0010, W1C, 0, doc="interrupt cause (write 1 to clear)")
EIMS = R("EIMS", 0x0014, RW, 0, doc="interrupt mask: 1 = cause enabled")
EICS = R("EICS", 0x0018, WO, 0, doc="interrupt cause set (software trigger)")
RAL = R("RAL", 0x0020, RW, 0, doc="receive address low (MAC bytes 0-3)")
RAH = R("RAH", 0x0024, RW, 0, 0x8000FFFF, doc="receive address high (MAC bytes 4-5, bit31 AV)")
MTA = R("MTA", 0x0028, RW, 0, doc="multicast filter enable bits")
FCTRL = R("FCTRL", 0x002C, RW, 0, 0x00000700, doc="filter control (MPE, UPE, BAM)")
SCRATCH = R("SCRATCH", 0x0030, RW, doc="software scratch: the device never changes it (the VF "
            "driver keeps a token there to recognise its VF)")
# Off at reset, unlike 82599's: a driver that does not use the packet checksum costs
# the device nothing.
RXCSUM = R("RXCSUM", 0x0034, RW, 0, RXCSUM_PCSE,
           doc="receive checksum control (PCSE: packet checksum in RX descriptors)")
# EITRn (82599 8.2.3.5.12 style, in microseconds): the minimum interval between two
# interrupts of MSI-X vector n. A cause that becomes pending once the interval since
# the vector's last interrupt has passed is signalled at once (a lone frame is not
# delayed); one pending earlier is signalled at the interval's end, if it is still
# pending and enabled (EICR & EIMS) then. 0: no throttling (the reset value).
EITR = RegisterArray("EITR", 0x0040, 4, NUM_VECTORS, RW, 0, EITR_MAX_US,
                     "interrupt throttle of vector {n}: minimum interval between its "
                     "interrupts (us)")
VFMAILBOX = R("VFMAILBOX", 0x0100, W1C, 0, 0xFF, doc="mailbox control/status")
VFMBDOORBELL = R("VFMBDOORBELL", 0x0104, WO, 0, doc="mailbox doorbell: REQ/ACK to the PF")
VFMBMEM = RegisterArray("VFMBMEM", 0x0140, 4, MBX_WORDS, RW, doc="mailbox word {n}")
RDBAL = _queue("RDBAL", 0x00, RW, 0, 0xFFFFFF80)
RDBAH = _queue("RDBAH", 0x04, RW)
RDLEN = _queue("RDLEN", 0x08, RW, 0, 0x000FFF80)
RDH = _queue("RDH", 0x0C, RO, doc="RX head (device)")
RDT = _queue("RDT", 0x10, RW, 0, 0xFFFF, "RX tail")
RXDCTL = _queue("RXDCTL", 0x14, RW, 0, QCTL_ENABLE)
TDBAL = _queue("TDBAL", 0x20, RW, 0, 0xFFFFFF80)
TDBAH = _queue("TDBAH", 0x24, RW)
TDLEN = _queue("TDLEN", 0x28, RW, 0, 0x000FFF80)
TDH = _queue("TDH", 0x2C, RO, doc="TX head (device)")
TDT = _queue("TDT", 0x30, RW, 0, 0xFFFF, "TX tail")
TXDCTL = _queue("TXDCTL", 0x34, RW, 0, QCTL_ENABLE)
QERR = _queue("QERR", 0x38, W1C, doc="queue error cause")
GPRC = R("GPRC", 0x2000, RO, doc="good packets received")
GPTC = R("GPTC", 0x2004, RO, doc="good packets transmitted")
GORCL = R("GORCL", 0x2008, RO, doc="good octets received (low)")
GORCH = R("GORCH", 0x200C, RO, doc="good octets received (high)")
GOTCL = R("GOTCL", 0x2010, RO, doc="good octets transmitted (low)")
GOTCH = R("GOTCH", 0x2014, RO, doc="good octets transmitted (high)")
RXERRC = R("RXERRC", 0x2018, RO, doc="receive errors")
TXERRC = R("TXERRC", 0x201C, RO, doc="transmit errors")
MPC = R("MPC", 0x2020, RO, doc="missed packets (dropped: no RX descriptor or device stopped)")

QUEUE_REGS = (RDBAL, RDBAH, RDLEN, RDH, RDT, RXDCTL,
              TDBAL, TDBAH, TDLEN, TDH, TDT, TXDCTL, QERR)
COMMON: list[Register] = [
    CTRL, STATUS, EICR, EIMS, EICS, EITR(0), RAL, RAH, MTA, FCTRL, SCRATCH,
    VFMAILBOX, VFMBDOORBELL, *VFMBMEM.registers,
    *[arr(q) for q in range(NUM_QUEUES) for arr in QUEUE_REGS],
    GPRC, GPTC, GORCL, GORCH, GOTCL, GOTCH, RXERRC, TXERRC, MPC,
    *EITR.registers[1:],  # after the rest: the register dump keeps its older order
    RXCSUM,
]

# PF-only registers: the PF side of each VF's mailbox, VF enables, uplink state.
PFVFRE = R("PFVFRE", 0x0400, RW, doc="VF receive enable, bit per VF")
PFVFTE = R("PFVFTE", 0x0404, RW, doc="VF transmit enable, bit per VF")
PFMBICR = R("PFMBICR", 0x0408, W1C, doc="mailbox interrupt cause, bit per VF (VF wrote)")
PFMBIMR = R("PFMBIMR", 0x040C, RW, doc="mailbox interrupt mask, bit per VF")
PFMAILBOX = RegisterArray("PFMAILBOX", 0x0500, 4, MAX_VFS, W1C, 0, 0xFF,
                          "VF{n} mailbox (PF side)")
PFMBDOORBELL = RegisterArray("PFMBDOORBELL", 0x0600, 4, MAX_VFS, WO,
                             doc="VF{n} mailbox doorbell (PF side)")
PF_ONLY: list[Register] = [
    PFVFRE, PFVFTE, PFMBICR, PFMBIMR, *PFMAILBOX.registers, *PFMBDOORBELL.registers,
]


@dataclass(frozen=True)
class Ring:
    """The registers of one kind of descriptor ring (RX or TX), queue by queue."""

    name: str  # "RX", "TX"
    DBAL: RegisterArray
    DBAH: RegisterArray
    DLEN: RegisterArray
    DH: RegisterArray
    DT: RegisterArray
    XDCTL: RegisterArray


RX = Ring("RX", RDBAL, RDBAH, RDLEN, RDH, RDT, RXDCTL)
TX = Ring("TX", TDBAL, TDBAH, TDLEN, TDH, TDT, TXDCTL)

VF_TABLE: tuple[Register, ...] = tuple(COMMON)
PF_TABLE: tuple[Register, ...] = tuple(COMMON + PF_ONLY)


def register(name: str) -> Register:
    """The Register called ``name`` (KeyError if there is none): for names that
    come from outside the code (the command line, a JSON request)."""
    return BY_NAME[name]


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
BY_NAME: dict[str, Register] = {r.name: r for r in PF_TABLE}
