"""`ethtool -d` of the VF's kernel driver, named as the register table names it.

vfnic_vf's register dump (kmod/ethtool.c) is every VF register in the order of
VF_TABLE, one 32-bit little-endian word each. ethtool has no decoder for it, so:

    ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool

prints one line per register: name, BAR0 offset, access, value. Stdlib only (it
runs in the guest).
"""

from __future__ import annotations

import struct
import sys

from vfnic.regs.table import VF_TABLE, Access, Register

DUMP_SIZE = 4 * len(VF_TABLE)


class DumpError(ValueError):
    """Not a vfnic_vf register dump."""


def decode(raw: bytes) -> list[tuple[Register, int]]:
    """(register, value) pairs of an `ethtool -d DEV raw on` dump (ethtool writes the
    driver's buffer as it is: no header)."""
    if len(raw) != DUMP_SIZE:
        raise DumpError(f"{len(raw)} bytes: not a vfnic_vf register dump ({DUMP_SIZE} bytes)")
    values = struct.unpack(f"<{len(VF_TABLE)}I", raw)
    return list(zip(VF_TABLE, values, strict=True))


def render(pairs: list[tuple[Register, int]]) -> str:
    lines = []
    for reg, value in pairs:
        note = " (write-only: reads 0)" if reg.access is Access.WO else ""
        lines.append(f"{reg.name:<14} 0x{reg.offset:04x} {reg.access.value:<3} "
                     f"0x{value:08x}{note}")
    return "\n".join(lines)


def main() -> int:
    try:
        print(render(decode(sys.stdin.buffer.read())))
    except DumpError as exc:
        print(f"vfnic.regs.ethtool: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
