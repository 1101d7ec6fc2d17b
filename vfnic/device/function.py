"""One PCI function of the NIC as a vfio-user device: config space, BARs, IRQs.

BAR0 is the register bank (vfnic.regs); BAR3 holds the MSI-X table and PBA.
VFs are presented the way the kernel's vfio-pci presents a VF: vendor and
device ID filled in from the PF's SR-IOV capability, BARs sized from the PF's
VF BAR registers, no INTx (SR-IOV 1.1, 3.4.1).
"""

from __future__ import annotations

import collections
import errno
import os
import struct
import threading
from typing import TYPE_CHECKING

from vfnic.device import pci, snapshot
from vfnic.device.pci import (
    MSIX_BAR,
    MSIX_BAR_SIZE,
    MSIX_ENTRY,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    MSIX_VECTORS,
)
from vfnic.device.policy import (
    LINK_AUTO,
    MIGRATION_TRANSPARENT,
    VfPolicy,
)
from vfnic.dma.controller import PAGE_SIZE as DMA_PAGE_SIZE
from vfnic.dma.controller import DmaController
from vfnic.errors import DmaError, ProtocolError, SnapshotError, VfnicError
from vfnic.regs import table as T
from vfnic.regs.bank import RegisterBank
from vfnic.regs.ids import (
    CLASS_ETHERNET,
    PF_DEVICE_ID,
    SUBSYS_ID,
    SUBSYS_VENDOR,
    VENDOR_ID,
    VF_DEVICE_ID,
)
from vfnic.regs.table import BAR0_SIZE, PF_TABLE, VF_TABLE, Register
from vfnic.savevm.migration import Migration
from vfnic.vfiouser import wire

if TYPE_CHECKING:
    from vfnic.device.nic import Nic
    from vfnic.vfiouser.server import Session

CAP_PM = 0x40
CAP_MSIX = 0x50
CAP_EXP = 0x70
CAP_EXP_SIZE = 0x3C
EXT_SRIOV = 0x100

BAR_SIZES = {0: BAR0_SIZE, MSIX_BAR: MSIX_BAR_SIZE}
REG_AT = {r.offset: r.name for r in PF_TABLE}  # BAR0 offset -> register name (counters)
TX_TAILS = frozenset(T.TDT(q).offset for q in range(T.NUM_QUEUES))
MSIX_TABLE_SIZE = MSIX_VECTORS * MSIX_ENTRY
MSIX_TABLE = slice(MSIX_TABLE_OFFSET, MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE)  # in BAR3


class PciFunction:
    """A PF or VF: everything the vfio-user dispatcher needs (``server.Device``)."""

    def __init__(self, nic_lock: threading.RLock, is_pf: bool, index: int, mac: bytes,
                 total_vfs: int = 8, num_vfs: int = 0) -> None:
        self.lock = nic_lock
        self.is_pf = is_pf
        self.index = index  # VF number; 0 for the PF
        self.name = "pf" if is_pf else f"vf{index}"
        self.perm_mac = mac
        self.rx_mac = mac  # the address the switch filters on (PF-approved RAL/RAH)
        self.total_vfs = total_vfs
        self.num_vfs = num_vfs
        self.link_state = LINK_AUTO
        # Host-side VF setting (`vfnic link set DIR vf N migration ...`): whether the VF
        # driver is told of a migration (the 2015 protocol) or not. Travels in snapshots.
        self.migration_mode = MIGRATION_TRANSPARENT
        self.nic: Nic | None = None
        self.running = True  # False in the migration STOP states: no DMA, no interrupts
        self.stopped_drops = 0  # frames that arrived while stopped (host-side counter)
        self.serving_thread: int | None = None
        self.dma = DmaController()
        self.bank = RegisterBank(PF_TABLE if is_pf else VF_TABLE, BAR0_SIZE)
        self.config = pci.ConfigSpace()
        self.msix = bytearray(MSIX_BAR_SIZE)
        self.irq_fds: dict[tuple[int, int], int] = {}  # (irq index, sub-index) -> eventfd
        self.irq_masked: set[tuple[int, int]] = set()
        self.session: Session | None = None
        self.policy = VfPolicy()  # the host's VF settings (`vfnic link set DIR vf N ...`)
        self.tx_kick_pending = False  # a paced TX queue waits for its timer
        # Host-side event counts (`{"op": "counters"}` on control.sock): BAR0 accesses by
        # register, MSI-X signals by vector, RX/TX batches and their frames.
        self.counters: collections.Counter[str] = collections.Counter()
        self._build_config()
        from vfnic.device.datapath import DataPath

        self.datapath = DataPath(self)
        self.migration = Migration(self, self.dma)  # sees this function as a savevm.Device
        self.function_reset()

    # -- configuration space ----------------------------------------------------------

    def _build_config(self) -> None:
        c = self.config
        c.set(pci.VENDOR_ID, 2, VENDOR_ID)
        c.set(pci.DEVICE_ID, 2, PF_DEVICE_ID if self.is_pf else VF_DEVICE_ID)
        c.set(pci.REVISION_ID, 1, 1)
        c.set(pci.CLASS_PROG, 3, CLASS_ETHERNET)
        c.set(pci.HEADER_TYPE, 1, 0)
        c.set(pci.SUBSYSTEM_VENDOR_ID, 2, SUBSYS_VENDOR)
        c.set(pci.SUBSYSTEM_ID, 2, SUBSYS_ID)
        cmd_mask = pci.COMMAND_MEMORY | pci.COMMAND_MASTER | pci.COMMAND_PARITY | pci.COMMAND_SERR
        if self.is_pf:
            cmd_mask |= pci.COMMAND_INTX_DISABLE
        c.set_wmask(pci.COMMAND, 2, cmd_mask)
        c.set_w1cmask(pci.STATUS, 2, pci.STATUS_W1C)
        c.set_wmask(pci.CACHE_LINE_SIZE, 1, 0xFF)
        c.set_wmask(pci.INTERRUPT_LINE, 1, 0xFF)
        c.set(pci.INTERRUPT_PIN, 1, 1 if self.is_pf else 0)  # VFs have no INTx
        for bar, size in BAR_SIZES.items():
            c.set_wmask(pci.BAR0 + 4 * bar, 4, pci.bar_wmask(size))
        # Power management (PCI PM 1.2): PMC version 3, PMCSR power state RW, NoSoftReset.
        c.add_capability(pci.CAP_ID_PM, CAP_PM, 8)
        c.set(CAP_PM + 2, 2, 0x0003)
        c.set(CAP_PM + 4, 2, 0x0008)
        c.set_wmask(CAP_PM + 4, 2, 0x0003)
        # MSI-X: table and PBA in BAR3.
        c.add_capability(pci.CAP_ID_MSIX, CAP_MSIX, 12)
        c.set(CAP_MSIX + pci.MSIX_FLAGS, 2, MSIX_VECTORS - 1)
        c.set_wmask(CAP_MSIX + pci.MSIX_FLAGS, 2, pci.MSIX_FLAGS_ENABLE | pci.MSIX_FLAGS_MASKALL)
        c.set(CAP_MSIX + pci.MSIX_TABLE, 4, MSIX_TABLE_OFFSET | MSIX_BAR)
        c.set(CAP_MSIX + pci.MSIX_PBA, 4, MSIX_PBA_OFFSET | MSIX_BAR)
        # PCI Express capability v2, endpoint; FLR capable; 8 GT/s x8 link.
        c.add_capability(pci.CAP_ID_EXP, CAP_EXP, CAP_EXP_SIZE)
        c.set(CAP_EXP + 2, 2, 0x0002)  # version 2, device/port type 0 (endpoint)
        c.set(CAP_EXP + 4, 4, (1 << 28) | (1 << 15))  # DevCap: FLR, role-based error
        c.set_wmask(CAP_EXP + 8, 2, 0x7FFF)  # DevCtl (bit 15 initiates FLR: write-only)
        c.set_w1cmask(CAP_EXP + 10, 2, 0x000F)  # DevSta error bits
        c.set(CAP_EXP + 12, 4, 0x83)  # LinkCap: 8 GT/s, x8
        c.set_wmask(CAP_EXP + 16, 2, 0x01C3)  # LinkCtl
        c.set(CAP_EXP + 18, 2, 0x83)  # LinkSta: 8 GT/s, x8
        c.set(CAP_EXP + 0x24, 4, 0)  # DevCap2
        if self.is_pf:
            self._build_sriov()

    def _build_sriov(self) -> None:
        c, base = self.config, EXT_SRIOV
        c.add_ext_capability(pci.EXT_CAP_ID_SRIOV, 1, base, pci.SRIOV_SIZE)
        c.set(base + pci.SRIOV_CAP, 4, 0)
        c.set_wmask(base + pci.SRIOV_CTRL, 2, pci.SRIOV_CTRL_VFE | pci.SRIOV_CTRL_MSE)
        c.set(base + pci.SRIOV_INITIAL_VF, 2, self.total_vfs)
        c.set(base + pci.SRIOV_TOTAL_VF, 2, self.total_vfs)
        c.set_wmask(base + pci.SRIOV_NUM_VF, 2, 0xFFFF)
        c.set(base + pci.SRIOV_VF_OFFSET, 2, 1)
        c.set(base + pci.SRIOV_VF_STRIDE, 2, 1)
        c.set(base + pci.SRIOV_VF_DID, 2, VF_DEVICE_ID)
        c.set(base + pci.SRIOV_SUP_PGSIZE, 4, 0x553)  # 4K, 8K, 64K, 256K, 1M, 4M
        c.set_wmask(base + pci.SRIOV_SYS_PGSIZE, 4, 0x553)
        for bar, size in BAR_SIZES.items():
            c.set_wmask(base + pci.SRIOV_BAR + 4 * bar, 4, pci.bar_wmask(size))

    def _reset_config(self) -> None:
        c = self.config
        c.set(pci.COMMAND, 2, 0)
        c.set(pci.STATUS, 2, pci.STATUS_CAP_LIST)
        c.set(CAP_MSIX + pci.MSIX_FLAGS, 2, MSIX_VECTORS - 1)
        c.set(CAP_PM + 4, 2, 0x0008)
        c.set(CAP_EXP + 8, 2, 0x2810)  # DevCtl defaults (max read 512B, relaxed ordering)
        if self.is_pf:
            base = EXT_SRIOV
            # The host enabled the VFs it serves (like `echo N > sriov_numvfs`).
            enabled = pci.SRIOV_CTRL_VFE | pci.SRIOV_CTRL_MSE if self.num_vfs else 0
            c.set(base + pci.SRIOV_CTRL, 2, enabled)
            c.set(base + pci.SRIOV_NUM_VF, 2, self.num_vfs)
            c.set(base + pci.SRIOV_SYS_PGSIZE, 4, 0x1)

    # -- vfio-user Device interface ----------------------------------------------------

    def device_info(self) -> tuple[int, int, int]:
        flags = wire.VFIO_DEVICE_FLAGS_RESET | wire.VFIO_DEVICE_FLAGS_PCI
        return flags, wire.NUM_PCI_REGIONS, wire.NUM_PCI_IRQS

    def region_info(self, index: int) -> tuple[int, int]:
        rw = wire.VFIO_REGION_INFO_FLAG_READ | wire.VFIO_REGION_INFO_FLAG_WRITE
        if index == wire.PciRegion.CONFIG:
            return rw, pci.CONFIG_SIZE
        if index in BAR_SIZES:
            return rw, BAR_SIZES[index]
        if 0 <= index < wire.NUM_PCI_REGIONS:
            return 0, 0
        raise ProtocolError(f"no region {index}")

    def irq_info(self, index: int) -> tuple[int, int]:
        ev = wire.VFIO_IRQ_INFO_EVENTFD
        counts = {
            wire.PciIrq.INTX: (ev | wire.VFIO_IRQ_INFO_MASKABLE | wire.VFIO_IRQ_INFO_AUTOMASKED,
                               1 if self.is_pf else 0),
            wire.PciIrq.MSI: (ev | wire.VFIO_IRQ_INFO_NORESIZE, 1),
            # Vectors are armed one at a time (SET_IRQS start/count below), so NORESIZE
            # is clear, as for vfio-pci's dynamic MSI-X: QEMU then arms each vector the
            # guest unmasks with one SET_IRQS instead of re-arming them all.
            wire.PciIrq.MSIX: (ev, MSIX_VECTORS),
            wire.PciIrq.ERR: (ev, 0),
            wire.PciIrq.REQ: (ev, 0),
        }
        if index not in counts:
            raise ProtocolError(f"no IRQ index {index}")
        return counts[wire.PciIrq(index)]

    def _check_access(self, index: int, offset: int, count: int) -> None:
        _, size = self.region_info(index)
        if size == 0 or offset >= size or offset + count > size:
            raise ProtocolError(
                f"{self.name}: access {offset:#x}+{count} outside region {index} ({size:#x})"
            )

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check_access(index, offset, count)
        if self.datapath.tx_due:  # a read sees every write before it done
            self.datapath.flush_tx()
        if index == wire.PciRegion.CONFIG:
            return self.config.read(offset, count)
        if index == 0:
            self.counters["read." + REG_AT.get(offset, hex(offset))] += 1
            return self.bank.guest_read(offset, count)
        return bytes(self.msix[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check_access(index, offset, len(data))
        if self.datapath.tx_due and not (index == 0 and offset in TX_TAILS):
            self.datapath.flush_tx()  # only doorbells merge; anything else comes after
        if index == wire.PciRegion.CONFIG:
            self.config_write(offset, data)
        elif index == 0:
            self.counters["write." + REG_AT.get(offset, hex(offset))] += 1
            self.bank.guest_write(offset, data)
        else:
            self._msix_write(offset, data)

    def config_write(self, offset: int, data: bytes) -> None:
        flr_word = CAP_EXP + 8
        flr = offset <= flr_word + 1 < offset + len(data) and data[flr_word + 1 - offset] & 0x80
        self.config.write(offset, data)
        if flr:  # Initiate Function Level Reset (PCIe DevCtl bit 15)
            self.function_reset()

    def _msix_write(self, offset: int, data: bytes) -> None:
        for i, b in enumerate(data):
            pos = offset + i
            if MSIX_TABLE.start <= pos < MSIX_TABLE.stop:  # table: writable; PBA read-only
                self.msix[pos] = b

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes,
                 fds: list[int]) -> None:
        dtype = flags & wire.VFIO_IRQ_SET_DATA_TYPE_MASK
        action = flags & wire.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if flags & ~0x3F or dtype not in (1, 2, 4) or action not in (8, 16, 32):
            raise ProtocolError(f"SET_IRQS flags {flags:#x}")
        _, total = self.irq_info(index)
        if fds and dtype != wire.VFIO_IRQ_SET_DATA_EVENTFD:
            raise ProtocolError("SET_IRQS: fds without DATA_EVENTFD")
        if dtype == wire.VFIO_IRQ_SET_DATA_NONE and count == 0:
            if start != 0:
                raise ProtocolError("SET_IRQS: count 0 needs start 0")
            if action == wire.VFIO_IRQ_SET_ACTION_TRIGGER:
                self._drop_irqs(index)  # disable every interrupt of this index
            return
        if count == 0 or start >= total or start + count > total:
            raise ProtocolError(f"SET_IRQS {start}+{count} outside {total} vectors")
        if dtype == wire.VFIO_IRQ_SET_DATA_BOOL and len(data) < count:
            raise ProtocolError("SET_IRQS: fewer bools than count")
        if dtype == wire.VFIO_IRQ_SET_DATA_EVENTFD:
            if action != wire.VFIO_IRQ_SET_ACTION_TRIGGER:
                raise ProtocolError("SET_IRQS: mask/unmask eventfds are not supported",
                                    errno.ENOTSUP)
            if fds and len(fds) != count:
                raise ProtocolError(f"SET_IRQS: {len(fds)} fds for {count} vectors")
            for i in range(count):
                key = (index, start + i)
                old = self.irq_fds.pop(key, None)
                if old is not None:
                    os.close(old)
                if fds:
                    self.irq_fds[key] = fds[i]
            fds.clear()
            return
        for i in range(count):
            if dtype == wire.VFIO_IRQ_SET_DATA_BOOL and not data[i]:
                continue
            key = (index, start + i)
            if action == wire.VFIO_IRQ_SET_ACTION_MASK:
                self.irq_masked.add(key)
            elif action == wire.VFIO_IRQ_SET_ACTION_UNMASK:
                self.irq_masked.discard(key)
            else:
                self.signal(index, start + i)

    def _drop_irqs(self, index: int | None = None) -> None:
        for key in [k for k in self.irq_fds if index is None or k[0] == index]:
            os.close(self.irq_fds.pop(key))

    def signal(self, index: int, vector: int) -> bool:
        """Raise interrupt ``vector`` of IRQ ``index`` through its eventfd."""
        fd = self.irq_fds.get((index, vector))
        if fd is None or (index, vector) in self.irq_masked or not self.running:
            return False
        os.write(fd, struct.pack("<Q", 1))
        self.counters[f"signal.{index}.{vector}"] += 1
        return True

    def reset(self) -> None:
        """VFIO_USER_DEVICE_RESET: the function and its migration state machine."""
        self.function_reset()
        self.migration.reset()

    def software_reset(self) -> None:
        """CTRL.RST: the NIC's registers and queues, not PCI config (only FLR does that)."""
        self.bank.reset()
        self.datapath.backlog.clear()
        self.datapath.tx_due.clear()
        self.load_mac(self.perm_mac)

    def function_reset(self) -> None:
        """Function level reset (PCIe FLR): registers, then config space and MSI-X."""
        self.software_reset()
        self._reset_config()
        self.msix[:] = bytes(MSIX_BAR_SIZE)
        for v in range(MSIX_VECTORS):  # vector control: masked after reset
            self.msix[MSIX_TABLE.start + v * MSIX_ENTRY + 12] = 1
        self.irq_masked.clear()

    def feature(self, flags: int, data: bytes, argsz: int) -> bytes:
        return self.migration.feature(flags, data, argsz)

    def mig_data_read(self, size: int) -> bytes:
        return self.migration.read(size)

    def mig_data_write(self, data: bytes) -> None:
        self.migration.write(data)

    # -- savevm.migration.Device: what the migration state machine may ask ---------------

    def save_state(self) -> bytes:
        return snapshot.save(self)

    def load_state(self, image: bytes, extents: list[tuple[int, bytes]]) -> None:
        # Everything is checked before anything is applied: the snapshot's every
        # field, every extent inside this function's writable mappings, the MAC
        # against the NIC's other functions.
        snapshot.check(self, image)
        for iova, data in extents:
            if iova % DMA_PAGE_SIZE + len(data) > DMA_PAGE_SIZE:
                raise SnapshotError(f"migration stream: extent at {iova:#x} crosses a page")
            try:
                region = self.dma.find(iova, len(data))
            except VfnicError as exc:
                raise SnapshotError(f"migration stream: extent at {iova:#x} is outside "
                                    "the destination's DMA mappings") from exc
            if not region.writable:
                raise SnapshotError(f"migration stream: extent at {iova:#x} is in a "
                                    "read-only mapping")
        if self.nic is not None:
            self.nic.check_restore(self, snapshot.stored_mac(image))
        try:
            with self.dma.batch():  # the client's file sizes read once
                for iova, data in extents:  # what the device wrote, which QEMU did not see
                    self.dma.write(iova, data)
        except VfnicError as exc:  # the client's memory went away meanwhile
            raise SnapshotError(f"migration stream: writing DMA extents failed: {exc}") \
                from exc
        host_link_state = self.link_state
        snapshot.apply(self, image)  # checked above, with the pages and the MAC
        if self.nic is not None:  # the destination host's VF settings apply
            self.nic.after_restore(self, host_link_state)
        self.running = False  # a restored function waits, stopped, for RUNNING

    def set_running(self, running: bool) -> None:
        self.running = running

    def dma_extents(self) -> list[tuple[int, bytes]]:
        return self.dma.logged_extents()

    def count_drop(self, stat: Register = T.MPC, n: int = 1) -> None:
        """``n`` frames lost: in a statistics register, or, while stopped for migration
        (when the device state must not change, vfio STOP), in a host-side counter."""
        if self.running:
            self.bank.add(stat, n)
        else:
            self.stopped_drops += n

    def load_mac(self, mac: bytes) -> None:
        """Program the receive address (RAL/RAH, address valid) with ``mac``."""
        self.bank.set(T.RAL, int.from_bytes(mac[:4], "little"))
        self.bank.set(T.RAH, int.from_bytes(mac[4:6], "little") | T.RAH_AV)
        self.rx_mac = mac

    def in_serving_thread(self) -> bool:
        return self.serving_thread == threading.get_ident()

    def flush_doorbells(self) -> None:
        """The serving thread has no message waiting: send what TX doorbells deferred."""
        self.datapath.flush_tx()

    def on_wake(self) -> None:
        """Run in the serving thread: deliver frames queued for fd-less DMA, resume
        paced transmission."""
        self.datapath.drain_backlog()
        self.datapath.resume_tx()

    def client_attached(self, session: Session) -> None:
        self.session = session
        self.dma.message_read = session.dma_read
        self.dma.message_write = session.dma_write

    def client_detached(self) -> None:
        self.dma.unmap_all()
        self._drop_irqs()
        self.dma.message_read = None
        self.dma.message_write = None
        self.datapath.backlog.clear()
        self.datapath.tx_due.clear()  # its doorbells: nobody to send for any more
        self.session = None
        self.serving_thread = None

    # -- device-side DMA (bus mastering required, as on real hardware) -----------------

    def bus_master(self) -> bool:
        return bool(self.config.get(pci.COMMAND, 2) & pci.COMMAND_MASTER)

    def check_dma(self) -> DmaController:
        """The DMA controller, if this function may master the bus (else DmaError); a
        batch of accesses checks once, then uses the controller directly."""
        if not self.bus_master():
            raise DmaError(f"{self.name}: DMA with bus mastering disabled", errno.ENODEV)
        return self.dma

    def dma_read(self, address: int, length: int) -> bytes:
        return self.check_dma().read(address, length)

    def dma_write(self, address: int, data: bytes) -> None:
        self.check_dma().write(address, data)

    # -- the MSI-X table its client emulates ---------------------------------------------
    # QEMU keeps a vfio-user function's MSI-X table itself (only PBA reads are forwarded,
    # hw/vfio-user/pci.c) and migrates none of it: this function's own copy (self.msix)
    # is brought in line from the client before a migration and written back into the
    # destination's client, both as DMA to this function's own BAR3 (peer to peer
    # through the client's bus master address space, so bus mastering must be on).

    def msix_table_address(self) -> int:
        """Bus address of the MSI-X table as the guest mapped BAR3 (DmaError if the
        BAR is unassigned or memory decoding is off)."""
        cmd = self.config.get(pci.COMMAND, 2)
        base = self.config.get(pci.BAR0 + 4 * MSIX_BAR, 4) & 0xFFFFFFF0
        if not cmd & pci.COMMAND_MEMORY or not base:
            raise DmaError(f"{self.name}: BAR{MSIX_BAR} is not mapped", errno.ENODEV)
        return base + MSIX_TABLE_OFFSET

    def pull_msix(self, ecam: int) -> None:
        """Copy the client's MSI-X table into this function's MSI-X BAR, and the MSI-X
        Message Control bits it emulates into this function's config space, read
        through the enhanced configuration mechanism at ``ecam`` (PCIe 4.0 section
        7.2.2: this function's 4 KiB of config in the client's memory space). DmaError
        if the client cannot be read there."""
        read = self.check_dma().read_by_message
        table = read(self.msix_table_address(), MSIX_TABLE_SIZE)
        (control,) = struct.unpack("<H", read(ecam + CAP_MSIX + pci.MSIX_FLAGS, 2))
        if control == 0xFFFF:
            raise DmaError(f"{self.name}: no config space at {ecam:#x}", errno.ENODEV)
        bits = pci.MSIX_FLAGS_ENABLE | pci.MSIX_FLAGS_MASKALL
        with self.lock:
            self.msix[MSIX_TABLE] = table
            flags = self.config.get(CAP_MSIX + pci.MSIX_FLAGS, 2) & ~bits
            self.config.set(CAP_MSIX + pci.MSIX_FLAGS, 2, flags | control & bits)

    def msix_programmed(self) -> bool:
        """Whether this function's MSI-X table holds a message address (one read from
        the client, or written by a client that forwards table writes)."""
        with self.lock:
            table = self.msix[MSIX_TABLE]
        return any(table[v * MSIX_ENTRY : v * MSIX_ENTRY + 4] != bytes(4)
                   for v in range(MSIX_VECTORS))

    def push_msix_table(self) -> None:
        """Write this function's MSI-X table into its client's (DmaError if refused)."""
        with self.lock:
            table = bytes(self.msix[MSIX_TABLE])
        self.check_dma().write_by_message(self.msix_table_address(), table)

    @property
    def mac(self) -> bytes:
        ral, rah = self.bank.get(T.RAL), self.bank.get(T.RAH)
        return ral.to_bytes(4, "little") + (rah & 0xFFFF).to_bytes(2, "little")
