"""DMA controller: the regions a client made available (VFIO_USER_DMA_MAP).

Regions with a file descriptor are accessed with pread/pwrite on that fd, not
through an mmap: a client that shrinks its file (ftruncate) under the server
would turn an mmap access into SIGBUS for the whole process; pread/pwrite
return short or fail instead, and the access becomes a DmaError for that
function only. A memfd sealed against shrinking (F_SEAL_SHRINK, memfd_create(2):
QEMU's memory-backend-memfd seals its RAM so by default) cannot do that: it is
mapped and accessed directly, without a system call per access. Files that
cannot be written with pwrite (hugetlbfs) fall back to an mmap guarded by a
size check before each access (a shrink racing with that check can still
SIGBUS: see README, known limits). Regions without an fd
are reached through server-to-client VFIO_USER_DMA_READ/WRITE messages. Every
access is checked against the mappings. The controller owns dirty logging
(start, stop, report: VFIO_DEVICE_FEATURE_DMA_LOGGING_*, linux/vfio.h) and the
pages logged since it started, which the migration stream carries.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from vfnic.errors import DmaError, ProtocolError, VfnicError

PAGE_SIZE = 4096  # dirty logging granularity, whatever page size the client asks for

# Callbacks used for regions without an fd: read(addr, n) -> bytes, write(addr, data).
MessageRead = Callable[[int, int], bytes]
MessageWrite = Callable[[int, bytes], None]


@dataclass
class DmaRegion:
    address: int
    size: int
    flags: int
    offset: int = 0
    fd: int | None = None  # the client's file (pread/pwrite at offset + iova - address)
    view: mmap.mmap | None = None  # a sealed memfd, or a file pwrite cannot write
    view_skew: int = 0  # offset rounded down to a page: bytes to skip in view
    sealed: bool = False  # the file cannot shrink: its view is used without a guard

    def close(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & 1)

    @property
    def writable(self) -> bool:
        return bool(self.flags & 2)


class _Batch:
    """``DmaController.batch()``: a plain context manager (entered once per burst, so
    not a generator); nested batches share the outer one's file sizes."""

    __slots__ = ("_dma", "_depth")

    def __init__(self, dma: DmaController) -> None:
        self._dma = dma
        self._depth = 0

    def __enter__(self) -> None:
        if not self._depth:
            self._dma._sizes = {}
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth:
            self._dma._sizes = None


class DmaController:
    def __init__(self, max_regions: int = 65535) -> None:
        self.max_regions = max_regions
        self.regions: list[DmaRegion] = []  # sorted by address
        self._keys: list[int] = []  # their addresses (bisected by find)
        self.message_read: MessageRead | None = None
        self.message_write: MessageWrite | None = None
        # 4 KiB page numbers the device wrote since the last report (None: not logging),
        # and per page written since logging started, the byte spans [lo, hi) it wrote
        # there (carried by the migration stream).
        self.dirty_log: set[int] | None = None
        self.spans: dict[int, list[tuple[int, int]]] = {}
        # fd -> file size, while a batch of accesses runs (None: fstat before each write)
        self._sizes: dict[int, int] | None = None
        self._batch = _Batch(self)

    def batch(self) -> _Batch:
        """A batch of accesses (one RX burst, one TX doorbell): the client's file sizes
        are read once for it, not before each pwrite. Called with the NIC lock held (as
        DMA_MAP/UNMAP are), so no region changes meanwhile; a shrink racing with the
        batch can only regrow the client's own file, as a shrink racing with a single
        check can, and reads still fail short (DmaError, never SIGBUS)."""
        return self._batch

    def _file_size(self, fd: int) -> int:
        sizes = self._sizes
        if sizes is None:
            return os.fstat(fd).st_size
        size = sizes.get(fd)
        if size is None:
            size = sizes[fd] = os.fstat(fd).st_size
        return size

    # -- mapping ----------------------------------------------------------------------

    def map(self, address: int, size: int, flags: int, offset: int, fd: int | None) -> None:
        """Add a region; takes ownership of ``fd`` (kept by the region, closed on unmap
        or on refusal)."""
        try:
            if size == 0 or address + size > 1 << 64:
                raise ProtocolError(f"bad DMA region {address:#x}+{size:#x}", errno.EINVAL)
            if flags & ~3:
                raise ProtocolError(f"unknown DMA map flags {flags:#x}", errno.EINVAL)
            if len(self.regions) >= self.max_regions:
                raise ProtocolError("too many DMA regions", errno.ENOSPC)
            for r in self.regions:
                if address < r.end and r.address < address + size:
                    raise ProtocolError(
                        f"DMA region {address:#x}+{size:#x} overlaps {r.address:#x}+{r.size:#x}",
                        errno.EEXIST,
                    )
            region = DmaRegion(address, size, flags, offset)
            if fd is not None:
                _check_fd(fd, flags, offset, size)
                # Mapped: a file pwrite cannot write (hugetlbfs; its size checked before
                # each access), or one that can never shrink (checked above to cover
                # the region). Any other file: pread/pwrite.
                guarded = bool(flags & 2) and not _pwritable(fd, offset)
                sealed = bool(flags & 2) and not guarded and _shrink_sealed(fd)
                if guarded or sealed:
                    try:
                        _map_view(region, fd)
                        region.sealed = sealed
                    except (OSError, ValueError, OverflowError) as exc:
                        if guarded:
                            raise ProtocolError(f"cannot mmap DMA region: {exc}",
                                                errno.EINVAL) from exc
                        # sealed but not mappable writable (F_SEAL_WRITE): pread/pwrite
                region.fd, fd = fd, None  # the region owns it now
        finally:
            if fd is not None:
                os.close(fd)
        i = bisect.bisect(self._keys, address)
        self.regions.insert(i, region)
        self._keys.insert(i, address)

    def unmap(self, address: int, size: int) -> DmaRegion:
        for i, r in enumerate(self.regions):
            if r.address == address and r.size == size:
                del self.regions[i]
                del self._keys[i]
                r.close()
                return r
        raise ProtocolError(f"no DMA region {address:#x}+{size:#x}", errno.ENOENT)

    def unmap_all(self) -> None:
        for r in self.regions:
            r.close()
        self.regions.clear()
        self._keys.clear()

    def has_message_regions(self) -> bool:
        """Whether some region is reached only through DMA_READ/WRITE messages."""
        return any(r.fd is None for r in self.regions)

    def find(self, address: int, length: int) -> DmaRegion:
        """The region holding all of [address, address+length)."""
        i = bisect.bisect_right(self._keys, address) - 1
        if i >= 0:
            r = self.regions[i]
            if address >= r.address and address + length <= r.end:
                return r
        raise DmaError(f"DMA to {address:#x}+{length:#x} is outside the client's mappings")

    # -- access -----------------------------------------------------------------------

    def read(self, address: int, length: int) -> bytes:
        r = self.find(address, length)
        if not r.readable:
            raise DmaError(f"DMA region at {r.address:#x} is not readable")
        view = r.view
        if view is not None:
            if not r.sealed:
                _check_held(r, address, length)
            start = r.view_skew + address - r.address
            return view[start:start + length]  # mmap slices are bytes
        if r.fd is not None:
            try:
                data = os.pread(r.fd, length, r.offset + address - r.address)
            except OSError as exc:
                raise DmaError(f"DMA read at {address:#x}: {exc.strerror}") from exc
            if len(data) != length:  # the client's file shrank under its mapping
                raise DmaError(f"DMA read at {address:#x}+{length:#x}: beyond the end of "
                               "the client's file")
            return data
        return self.read_by_message(address, length)

    def write(self, address: int, data: bytes) -> None:
        r = self.find(address, len(data))
        if not r.writable:
            raise DmaError(f"DMA region at {r.address:#x} is not writable")
        view = r.view
        if view is not None:
            if not r.sealed:
                _check_held(r, address, len(data))
            start = r.view_skew + address - r.address
            view[start:start + len(data)] = data
        elif r.fd is not None:
            pos = r.offset + address - r.address
            try:
                # pwrite past the end would grow the client's file: refuse instead
                # (a shrink racing with this check only regrows the client's own file).
                if self._file_size(r.fd) < pos + len(data):
                    raise DmaError(f"DMA write at {address:#x}+{len(data):#x}: beyond the "
                                   "end of the client's file")
                n = os.pwrite(r.fd, data, pos)
            except OSError as exc:
                raise DmaError(f"DMA write at {address:#x}: {exc.strerror}") from exc
            if n != len(data):
                raise DmaError(f"DMA write at {address:#x}: short write ({n} bytes)")
        else:
            self.write_by_message(address, data)
        if self.dirty_log is not None and data:
            pages = range(address // PAGE_SIZE, (address + len(data) - 1) // PAGE_SIZE + 1)
            self.dirty_log.update(pages)
            self._log_spans(address, len(data))

    def read_by_message(self, address: int, length: int) -> bytes:
        """DMA_READ through the client, at any bus address it decodes (its RAM without
        an fd, or a function's BAR or config space in its memory space)."""
        if self.message_read is None:
            raise DmaError("no client connection for DMA_READ", errno.ENODEV)
        return self.message_read(address, length)

    def write_by_message(self, address: int, data: bytes) -> None:
        """DMA_WRITE through the client (not dirty-logged here: QEMU logs its own)."""
        if self.message_write is None:
            raise DmaError("no client connection for DMA_WRITE", errno.ENODEV)
        self.message_write(address, data)

    def _log_spans(self, address: int, length: int) -> None:
        """Add [address, address+length) to the written spans, merged per page."""
        end = address + length
        while address < end:
            page, lo = divmod(address, PAGE_SIZE)
            hi = min(end - page * PAGE_SIZE, PAGE_SIZE)
            kept = []
            for a, b in self.spans.get(page, ()):
                if b < lo or a > hi:
                    kept.append((a, b))
                else:  # overlapping or touching: one span
                    lo, hi = min(a, lo), max(b, hi)
            kept.append((lo, hi))
            self.spans[page] = kept
            address = page * PAGE_SIZE + hi

    # -- dirty page logging (VFIO_DEVICE_FEATURE_DMA_LOGGING_*) ---------------------

    @property
    def logging(self) -> bool:
        return self.dirty_log is not None

    def start_logging(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        """DMA_LOGGING_START: record the pages the device writes from now on; returns
        the page size used (at least PAGE_SIZE). Raises ProtocolError (EBUSY if
        logging is on already, EINVAL for a bad page size or range)."""
        if self.dirty_log is not None:
            raise ProtocolError("DMA logging already started", errno.EBUSY)
        if page_size == 0 or page_size & (page_size - 1):
            raise ProtocolError(f"DMA logging page size {page_size} is not a power of two")
        for iova, length in ranges:
            if length == 0 or iova + length > 1 << 64:
                raise ProtocolError(f"bad DMA logging range {iova:#x}+{length:#x}")
        # We track 4 KiB pages whatever the hint; reports are built at any size.
        self.dirty_log = set()
        self.spans = {}
        return max(page_size, PAGE_SIZE)

    def stop_logging(self) -> None:
        """DMA_LOGGING_STOP. Raises ProtocolError if logging is not on."""
        if self.dirty_log is None:
            raise ProtocolError("DMA logging is not started")
        self.dirty_log = None
        self.spans = {}  # logged_extents() reports nothing once logging stopped

    @staticmethod
    def bitmap_size(iova: int, length: int, page_size: int) -> int:
        """Bytes of the DMA_LOGGING_REPORT bitmap for [iova, iova+length) in ``page_size``
        pages (whole u64 words). Raises ProtocolError for a bad page size or range."""
        if page_size == 0 or page_size & (page_size - 1) or length == 0:
            raise ProtocolError("DMA_LOGGING_REPORT: bad page size or length")
        if length % page_size or iova % page_size:
            raise ProtocolError("DMA_LOGGING_REPORT: range not aligned to the page size")
        return 8 * ((length // page_size + 63) // 64)

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """DMA_LOGGING_REPORT: the bitmap (a bit per ``page_size`` page of [iova,
        iova+length), little endian u64 words) of the pages written since the last
        report; reported pages are cleared, as the kernel does. Raises ProtocolError."""
        log = self.dirty_log
        if log is None:
            raise ProtocolError("DMA logging is not started")
        words = self.bitmap_size(iova, length, page_size) // 8
        # Work proportional to the dirty pages in range (sorted, bisected); the
        # caller bounds the bitmap by the advertised max_bitmap_size.
        bitmap = bytearray(8 * words)
        dirty = sorted(log)
        lo = bisect.bisect_left(dirty, iova // PAGE_SIZE)
        hi = bisect.bisect_left(dirty, (iova + length + PAGE_SIZE - 1) // PAGE_SIZE)
        reported = []
        for page in dirty[lo:hi]:
            addr = page * PAGE_SIZE
            first = max(addr, iova) - iova
            last = min(addr + PAGE_SIZE, iova + length) - 1 - iova
            for i in range(first // page_size, last // page_size + 1):
                bitmap[i >> 3] |= 1 << (i & 7)
            if iova <= addr and addr + PAGE_SIZE <= iova + length:
                reported.append(page)
        log.difference_update(reported)  # reported pages are cleared, as the kernel does
        return bytes(bitmap)

    def logged_extents(self) -> list[tuple[int, bytes]]:
        """(iova, current bytes) of every span written since logging started, one page
        at most each, in address order (none if logging is off); the bytes are read
        now, so they are the memory's latest whoever wrote it last. Spans unmapped
        since are left out."""
        if self.dirty_log is None:
            return []
        out = []
        for page in sorted(self.spans):
            base = page * PAGE_SIZE
            for lo, hi in sorted(self.spans[page]):
                try:
                    out.append((base + lo, self.read(base + lo, hi - lo)))
                except VfnicError:
                    continue  # unmapped since: nothing to carry
        return out

def _check_fd(fd: int, flags: int, offset: int, size: int) -> None:
    """A DMA_MAP fd must be a regular file (memfd, tmpfs, hugetlbfs...) opened for
    the access the mapping promises, covering the region when it is mapped."""
    try:
        st = os.fstat(fd)
        acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise ProtocolError(f"DMA_MAP fd: {exc.strerror}", errno.EINVAL) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError("DMA_MAP fd is not a regular file", errno.EINVAL)
    if offset + size > 1 << 63:
        raise ProtocolError("DMA_MAP offset out of range", errno.EINVAL)
    if flags & 2 and acc == os.O_RDONLY:
        raise ProtocolError("DMA_MAP writable region with a read-only fd", errno.EACCES)
    if flags & 1 and acc == os.O_WRONLY:
        raise ProtocolError("DMA_MAP readable region with a write-only fd", errno.EACCES)
    if st.st_size < offset + size:
        raise ProtocolError(f"DMA_MAP region {size:#x} at offset {offset:#x} is beyond the "
                            f"end of the file ({st.st_size:#x})", errno.EINVAL)


def _pwritable(fd: int, offset: int) -> bool:
    """Whether the file takes pwrite (hugetlbfs has no write: EINVAL even for 0 bytes)."""
    try:
        os.pwrite(fd, b"", offset)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise ProtocolError(f"DMA_MAP fd: {exc.strerror}", errno.EINVAL) from exc
    return True


def _shrink_sealed(fd: int) -> bool:
    """Whether the file can never shrink (a memfd with F_SEAL_SHRINK): an mmap of what
    it holds now cannot fault with SIGBUS."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK)
    except OSError:  # EINVAL: a file that takes no seals
        return False


def _map_view(region: DmaRegion, fd: int) -> None:
    """Map the region's part of ``fd`` shared, read-write (the offset rounded down to
    a page)."""
    skew = region.offset % mmap.PAGESIZE
    region.view = mmap.mmap(fd, region.size + skew, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=region.offset - skew)
    region.view_skew = skew


def _check_held(r: DmaRegion, address: int, length: int) -> None:
    """A mapping of a file that may shrink: check the file still holds [address,
    address+length) before touching it (a DmaError instead of SIGBUS)."""
    assert r.fd is not None
    pos = r.offset + address - r.address
    try:
        if os.fstat(r.fd).st_size < pos + length:
            raise DmaError(f"DMA at {address:#x}+{length:#x}: beyond the end of the "
                           "client's file")
    except OSError as exc:
        raise DmaError(f"DMA at {address:#x}: {exc.strerror}") from exc
