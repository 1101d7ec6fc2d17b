"""The bus under the VF driver: BAR0 registers, PCI config space and DMA memory.

``GuestBus`` is the real thing inside a Linux guest: BAR0 through an mmap of
sysfs ``resource0``, config space through the sysfs ``config`` file, DMA
memory from hugetlbfs with bus (guest-physical) addresses from
/proc/self/pagemap, as ixy does. ``HostBus`` stands in for it on the host:
our vfio-user client, with "guest RAM" either a memfd the server mmaps
(DMA_MAP with an fd) or client memory it reaches through DMA_READ/DMA_WRITE.

Stdlib only: this runs on the guest's bare python3 (no construct), so the
vfio-user client is imported by HostBus alone.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import mmap
import os
import struct
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from vfnic.errors import TransportError
from vfnic.regs.ids import PF_DEVICE_ID, VENDOR_ID, VF_DEVICE_ID

if TYPE_CHECKING:
    from vfnic.vfiouser.client import VfioUserClient

PAGE_SIZE = 4096


# PCI config header (PCI 3.0, 6.2.2)
PCI_COMMAND = 0x04
COMMAND_MEMORY = 1 << 1  # memory space enable
COMMAND_MASTER = 1 << 2  # bus master enable: the device may DMA

SYSFS_PCI = "/sys/bus/pci/devices"
HUGETLBFS_MOUNT = "/dev/hugepages"


class BusError(TransportError):
    """The function or its DMA memory cannot be reached."""

    errno = errno.ENODEV


class DmaMemory:
    """Memory the device can reach: ``phys`` is its bus address, ``view`` its bytes."""

    def __init__(self, phys: int, view: memoryview) -> None:
        self.phys = phys
        self.view = view

    @property
    def size(self) -> int:
        return len(self.view)

    def touch(self, offset: int = 0, length: int = 1) -> int:
        """Dirty every page of [offset, offset+length) with a CPU read-and-write of
        one byte, so that a running live migration sends the page again (the
        device's DMA escapes the CPU's dirty tracking). Returns the page count."""
        start = self.phys + offset
        page = start - start % PAGE_SIZE
        touched = 0
        while page < start + length:
            i = max(page - self.phys, offset)
            self.view[i] = self.view[i]
            touched += 1
            page += PAGE_SIZE
        return touched


class _Arena:
    """A physically contiguous chunk, handed out front to back."""

    def __init__(self, phys: int, view: memoryview) -> None:
        self.phys = phys
        self.view = view
        self.used = 0

    def alloc(self, size: int, align: int) -> DmaMemory | None:
        addr = -(-(self.phys + self.used) // align) * align
        off = addr - self.phys
        if off + size > len(self.view):
            return None
        self.used = off + size
        return DmaMemory(addr, self.view[off : off + size])


class Bus(abc.ABC):
    """What the driver needs from the PCI function under it."""

    name: str

    @abc.abstractmethod
    def read32(self, offset: int) -> int:
        """One 32-bit read of BAR0."""

    @abc.abstractmethod
    def write32(self, offset: int, value: int) -> None:
        """One 32-bit write of BAR0."""

    @abc.abstractmethod
    def config_read(self, offset: int, size: int) -> int: ...

    @abc.abstractmethod
    def config_write(self, offset: int, size: int, value: int) -> None: ...

    @abc.abstractmethod
    def alloc_dma(self, size: int, align: int = 128) -> DmaMemory:
        """Zeroed, physically contiguous memory the device can DMA to and from."""

    def poll(self) -> None:
        """Serve requests the device made to us (nothing to do on a real bus)."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release the function and the DMA memory."""

    def enable_bus_master(self) -> None:
        """PCI COMMAND: memory space and bus master on, else the device may not DMA."""
        cmd = self.config_read(PCI_COMMAND, 2)
        want = cmd | COMMAND_MEMORY | COMMAND_MASTER
        if want != cmd:
            self.config_write(PCI_COMMAND, 2, want)


# -- inside the guest ------------------------------------------------------------------


def _read_hex(path: Path) -> int:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return -1


def normalize_bdf(bdf: str) -> str:
    """'00:04.0' -> '0000:00:04.0' (sysfs names carry the PCI domain)."""
    return bdf if bdf.count(":") == 2 else f"0000:{bdf}"


def find_functions(sysfs: str = SYSFS_PCI,
                   device_ids: tuple[int, ...] = (VF_DEVICE_ID, PF_DEVICE_ID)) -> list[str]:
    """BDFs of vfnic functions, VFs before the PF (``device_ids`` order), each sorted."""
    found = []
    devices = sorted(Path(sysfs).iterdir()) if Path(sysfs).is_dir() else []
    for dev_id in device_ids:
        for dev in devices:
            if _read_hex(dev / "vendor") == VENDOR_ID and _read_hex(dev / "device") == dev_id:
                found.append(dev.name)
    return found


def meminfo(key: str) -> int:
    """A number from /proc/meminfo (kB values in bytes)."""
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == key:
                words = rest.split()
                return int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    raise BusError(f"no {key} in /proc/meminfo")


def virt_to_phys(addr: int) -> int:
    """Physical address of a (locked) virtual address: /proc/self/pagemap, one u64 per
    page, bits 0-54 PFN, bit 63 present (Documentation/admin-guide/mm/pagemap.rst).
    Without CAP_SYS_ADMIN the kernel reports PFN 0."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        (entry,) = struct.unpack("<Q", os.pread(fd, 8, addr // PAGE_SIZE * 8))
    finally:
        os.close(fd)
    pfn = entry & ((1 << 55) - 1)
    if not entry >> 63 & 1:
        raise BusError(f"page at {addr:#x} is not present")
    if pfn == 0:
        raise BusError("pagemap hides physical addresses: run as root", errno.EPERM)
    return pfn * PAGE_SIZE + addr % PAGE_SIZE


def buffer_address(mm: mmap.mmap) -> int:
    """Virtual address of an mmap's first byte."""
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so mm can be closed


def mlock(addr: int, size: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) != 0:
        err = ctypes.get_errno()
        raise BusError(f"mlock of DMA memory failed: {os.strerror(err)}", err)


class GuestBus(Bus):
    """A vfnic function seen by a Linux guest with no kernel driver bound to it."""

    def __init__(self, bdf: str | None = None, *, sysfs: str = SYSFS_PCI,
                 hugetlbfs: str = HUGETLBFS_MOUNT) -> None:
        if bdf is None:
            found = find_functions(sysfs)
            if not found:
                raise BusError(
                    f"no vfnic function ({VENDOR_ID:04x}:{VF_DEVICE_ID:04x} or "
                    f"{VENDOR_ID:04x}:{PF_DEVICE_ID:04x}) in {sysfs}"
                )
            bdf = found[0]
        self.name = normalize_bdf(bdf)
        self.path = Path(sysfs) / self.name
        if _read_hex(self.path / "vendor") != VENDOR_ID:
            raise BusError(f"{self.name}: no vfnic function at {self.path}")
        if (self.path / "driver").exists():
            driver = os.path.basename(os.readlink(self.path / "driver"))
            raise BusError(f"{self.name}: kernel driver {driver} is bound to it: unbind it first",
                           errno.EBUSY)
        self.device_id = _read_hex(self.path / "device")
        self.hugetlbfs = hugetlbfs
        self._arenas: list[_Arena] = []
        self._maps: list[mmap.mmap] = []
        try:
            self._config_fd = os.open(self.path / "config", os.O_RDWR)
            bar_fd = os.open(self.path / "resource0", os.O_RDWR | os.O_SYNC)
        except OSError as exc:
            raise BusError(f"{self.name}: {exc.filename}: {exc.strerror}", exc.errno) from exc
        try:
            size = os.fstat(bar_fd).st_size
            self._bar = mmap.mmap(bar_fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            os.close(self._config_fd)
            raise BusError(f"{self.name}: cannot mmap resource0: {exc}") from exc
        finally:
            os.close(bar_fd)
        # 32-bit items: each access is one aligned 32-bit load or store (one MMIO).
        self._regs = memoryview(self._bar).cast("I")

    @property
    def is_vf(self) -> bool:
        return self.device_id == VF_DEVICE_ID

    def read32(self, offset: int) -> int:
        return int(self._regs[offset >> 2])

    def write32(self, offset: int, value: int) -> None:
        self._regs[offset >> 2] = value & 0xFFFFFFFF

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(os.pread(self._config_fd, size, offset), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        os.pwrite(self._config_fd, value.to_bytes(size, "little"), offset)

    # -- DMA memory: hugetlbfs pages, physically contiguous, never moved -------------

    def alloc_dma(self, size: int, align: int = 128) -> DmaMemory:
        for arena in self._arenas:
            mem = arena.alloc(size, align)
            if mem is not None:
                return mem
        arena = self._new_hugepage()
        mem = arena.alloc(size, align)
        if mem is None:
            raise BusError(f"DMA allocation of {size} bytes exceeds a huge page", errno.ENOMEM)
        return mem

    def _ensure_hugetlbfs(self) -> None:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == self.hugetlbfs and fields[2] == "hugetlbfs":
                    return
        os.makedirs(self.hugetlbfs, exist_ok=True)
        res = subprocess.run(["mount", "-t", "hugetlbfs", "hugetlbfs", self.hugetlbfs],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BusError(f"cannot mount hugetlbfs at {self.hugetlbfs}: {res.stderr.strip()}")

    @staticmethod
    def _reserve_hugepages(count: int) -> None:
        """Grow /proc/sys/vm/nr_hugepages until ``count`` pages are free."""
        free = meminfo("HugePages_Free") - meminfo("HugePages_Rsvd")
        if free >= count:
            return
        with open("/proc/sys/vm/nr_hugepages", "r+") as f:
            total = int(f.read())
            f.seek(0)
            f.write(str(total + count - free))
        if meminfo("HugePages_Free") - meminfo("HugePages_Rsvd") < count:
            raise BusError("the kernel could not reserve a huge page (memory fragmented?)",
                           errno.ENOMEM)

    def _new_hugepage(self) -> _Arena:
        self._ensure_hugetlbfs()
        huge = meminfo("Hugepagesize")
        self._reserve_hugepages(1)
        path = os.path.join(self.hugetlbfs, f"vfnic-{os.getpid()}-{len(self._maps)}")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, huge)
            mm = mmap.mmap(fd, huge, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise BusError(f"cannot map a huge page from {path}: {exc.strerror}",
                           exc.errno) from exc
        finally:
            os.close(fd)
            os.unlink(path)  # the mapping keeps the page
        self._maps.append(mm)
        for off in range(0, huge, PAGE_SIZE):  # fault every page in
            mm[off] = 0
        addr = buffer_address(mm)
        mlock(addr, huge)
        phys = virt_to_phys(addr)
        if virt_to_phys(addr + huge - PAGE_SIZE) != phys + huge - PAGE_SIZE:
            raise BusError("huge page is not physically contiguous")
        arena = _Arena(phys, memoryview(mm))
        self._arenas.append(arena)
        return arena

    def close(self) -> None:
        for arena in self._arenas:
            arena.view.release()
        self._arenas.clear()
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a DmaMemory view is still alive
                pass
        self._maps.clear()
        self._regs.release()
        self._bar.close()
        os.close(self._config_fd)


# -- on the host, through our vfio-user client ---------------------------------------


class HostBus(Bus):
    """A function reached through VfioUserClient, for fast tests without QEMU.

    ``fd_backed``: "guest RAM" is a memfd the server mmaps (as QEMU with
    ``share=on`` memory); otherwise it is client memory mapped without an fd, which
    the server reaches with DMA_READ/DMA_WRITE messages. Those are answered by a
    service thread, as QEMU's main loop answers them while the vCPU runs the driver.
    """

    IOVA = 0x4000_0000  # where "guest RAM" sits in the device's DMA address space

    def __init__(self, socket_path: str, *, fd_backed: bool = True,
                 memory_size: int = 4 << 20, service_thread: bool = True) -> None:
        from vfnic.vfiouser.client import VfioUserClient

        self.name = os.path.basename(socket_path)
        self.fd_backed = fd_backed
        self.client: VfioUserClient = VfioUserClient(socket_path)
        self._mm: mmap.mmap | None = None
        if fd_backed:
            fd = os.memfd_create("vfnic-guest-ram", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, memory_size)
                self._mm = mmap.mmap(fd, memory_size, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
                self.client.dma_map(self.IOVA, memory_size, fd=fd)
            finally:
                os.close(fd)
            self.memory = memoryview(self._mm)
        else:
            self.memory = memoryview(self.client.add_memory(self.IOVA, memory_size).data)
        self._arena = _Arena(self.IOVA, self.memory)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not fd_backed and service_thread:
            self._thread = threading.Thread(target=self._serve, name=f"hostbus-{self.name}",
                                            daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        from vfnic.errors import ConnectionClosed

        while not self._stop.is_set():
            try:
                self.client.poll(0.02)
            except (ConnectionClosed, OSError, ValueError):
                return

    def read32(self, offset: int) -> int:
        return self.client.read32(0, offset)

    def write32(self, offset: int, value: int) -> None:
        self.client.write32(0, offset, value & 0xFFFFFFFF)

    def config_read(self, offset: int, size: int) -> int:
        return self.client.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.client.config_write(offset, size, value)

    def alloc_dma(self, size: int, align: int = 128) -> DmaMemory:
        mem = self._arena.alloc(size, align)
        if mem is None:
            raise BusError(f"HostBus memory exhausted ({size} bytes asked)", errno.ENOMEM)
        return mem

    def poll(self) -> None:
        if self._thread is None and not self.fd_backed:
            while self.client.poll(0):
                pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        self.client.close()
