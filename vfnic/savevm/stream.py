"""The migration data stream: versioned, checksummed records.

Each record: magic "VFMR", version u16, kind u16, payload length u32, payload,
CRC32 of all that. Kinds:
  FULL   a whole function snapshot (the device's own layout: vfnic.device.snapshot)
  DELTA  CRC32 of the base snapshot, then patches (offset u32, length u32, bytes)
  EXTENTS the guest memory the device wrote by DMA: (iova u64, length u32,
         bytes)*, each extent within one page, written into the destination's guest
         memory when the state is restored (only the bytes the device wrote: the
         rest of those pages is the CPU's, which QEMU's own RAM migration carries)
  END    CRC32 of the resulting snapshot
A destination assembles FULL [DELTA] END and checks every CRC before the
snapshot is restored, so a wrong version or a truncated or corrupted stream is
refused with the destination unchanged.
"""

from __future__ import annotations

import struct
import zlib

from vfnic.errors import SnapshotError

MAGIC = b"VFMR"
VERSION = 2  # 2: DMA-written extents (1 carried whole pages)
KIND_FULL, KIND_DELTA, KIND_END, KIND_EXTENTS = 1, 2, 3, 5
PAGE_SIZE = 4096
MAX_STREAM = 16 << 20

Header = struct.Struct("<4sHHI")
Patch = struct.Struct("<II")
Extent = struct.Struct("<QI")  # iova, length


def _record(kind: int, payload: bytes) -> bytes:
    head = Header.pack(MAGIC, VERSION, kind, len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def full_record(image: bytes) -> bytes:
    return _record(KIND_FULL, image)


def delta_record(base: bytes, image: bytes, chunk: int = 64) -> bytes:
    """Patches turning ``base`` into ``image``, in ``chunk``-byte units."""
    if len(base) != len(image):
        return full_record(image)
    patches = []
    start = -1
    for off in range(0, len(image) + chunk, chunk):
        differs = off < len(image) and base[off : off + chunk] != image[off : off + chunk]
        if differs and start < 0:
            start = off
        elif not differs and start >= 0:
            end = min(off, len(image))
            patches.append(Patch.pack(start, end - start) + image[start:end])
            start = -1
    return _record(KIND_DELTA, struct.pack("<I", zlib.crc32(base)) + b"".join(patches))


def extents_record(extents: list[tuple[int, bytes]]) -> bytes:
    return _record(KIND_EXTENTS, b"".join(Extent.pack(iova, len(data)) + data
                                          for iova, data in extents))


def end_record(image: bytes) -> bytes:
    return _record(KIND_END, struct.pack("<I", zlib.crc32(image)))


def records(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < Header.size + 4:
            raise SnapshotError("migration stream truncated")
        magic, version, kind, length = Header.unpack_from(data, pos)
        if magic != MAGIC:
            raise SnapshotError("migration stream: bad record magic")
        if version != VERSION:
            raise SnapshotError(f"migration stream version {version}, expected {VERSION}")
        end = pos + Header.size + length
        if end + 4 > len(data):
            raise SnapshotError("migration stream truncated")
        (crc,) = struct.unpack_from("<I", data, end)
        if crc != zlib.crc32(data[pos:end]):
            raise SnapshotError("migration stream record checksum mismatch")
        out.append((kind, data[pos + Header.size : end]))
        pos = end + 4
    return out


def assemble(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The snapshot and the DMA-written extents a complete stream describes
    (SnapshotError if it is not complete)."""
    image: bytearray | None = None
    extents: list[tuple[int, bytes]] = []
    ended = False
    for kind, payload in records(data):
        if ended:
            raise SnapshotError("migration stream: data after the end record")
        if kind == KIND_FULL:
            image = bytearray(payload)
        elif kind == KIND_DELTA:
            if image is None or len(payload) < 4:
                raise SnapshotError("migration stream: delta without a base")
            (base_crc,) = struct.unpack_from("<I", payload)
            if base_crc != zlib.crc32(image):
                raise SnapshotError("migration stream: delta for another base")
            pos = 4
            while pos < len(payload):
                off, length = Patch.unpack_from(payload, pos)
                pos += Patch.size
                if off + length > len(image) or pos + length > len(payload):
                    raise SnapshotError("migration stream: patch out of range")
                image[off : off + length] = payload[pos : pos + length]
                pos += length
        elif kind == KIND_EXTENTS:
            pos = 0
            while pos < len(payload):
                if pos + Extent.size > len(payload):
                    raise SnapshotError("migration stream: bad extents record")
                iova, length = Extent.unpack_from(payload, pos)
                pos += Extent.size
                if (not 0 < length <= PAGE_SIZE or pos + length > len(payload)
                        or iova % PAGE_SIZE + length > PAGE_SIZE):
                    raise SnapshotError(f"migration stream: bad extent {iova:#x}+{length:#x}")
                extents.append((iova, payload[pos : pos + length]))
                pos += length
        elif kind == KIND_END:
            if image is None or len(payload) != 4:
                raise SnapshotError("migration stream: end without data")
            (crc,) = struct.unpack("<I", payload)
            if crc != zlib.crc32(image):
                raise SnapshotError("migration stream: result checksum mismatch")
            ended = True
        else:
            raise SnapshotError(f"migration stream: unknown record kind {kind}")
    if not ended or image is None:
        raise SnapshotError("migration stream truncated (no end record)")
    return bytes(image), extents
