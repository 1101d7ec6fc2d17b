"""A register bank: values for one table, guest semantics and full save access."""

from __future__ import annotations

import struct
from collections.abc import Callable

from vfnic.regs.table import Access, Register

WriteHook = Callable[[str, int], None]
ReadHook = Callable[[str], None]
# A register: its identifier in vfnic.regs.table (T.CTRL, T.RDT(q)), or its name.
Reg = Register | str


class RegisterBank:
    """BAR0 of one function.

    ``guest_read``/``guest_write`` follow the declared access semantics;
    ``get``/``set`` are the device's (and the save path's) unrestricted view.
    """

    def __init__(self, table: tuple[Register, ...], size: int) -> None:
        self.table = table
        self.size = size
        self.by_name: dict[str, Register] = {r.name: r for r in table}
        self.by_offset: dict[int, Register] = {r.offset: r for r in table}
        self.values: dict[str, int] = {}
        self.write_hooks: dict[str, WriteHook] = {}
        self.reset()

    def reset(self) -> None:
        self.values = {r.name: r.reset for r in self.table}

    # -- device / save-path access ------------------------------------------------

    def get(self, reg: Reg) -> int:
        return self.values[reg if isinstance(reg, str) else reg.name]

    def set(self, reg: Reg, value: int) -> None:
        r = self.by_name[reg if isinstance(reg, str) else reg.name]
        self.values[r.name] = value & ((1 << (8 * r.width)) - 1)

    def add(self, reg: Register, n: int) -> None:
        """A statistics register counts ``n`` more (wrapping, as a 32-bit counter does)."""
        values = self.values
        values[reg.name] = (values[reg.name] + n) & 0xFFFFFFFF

    def add64(self, low: Register, high: Register, n: int) -> None:
        """A 64-bit statistics counter kept in two registers (GORCL/GORCH) counts ``n``
        more."""
        values = self.values
        total = (values[high.name] << 32 | values[low.name]) + n
        values[low.name] = total & 0xFFFFFFFF
        values[high.name] = (total >> 32) & 0xFFFFFFFF

    def set_bits(self, reg: Reg, bits: int) -> None:
        self.set(reg, self.get(reg) | bits)

    def clear_bits(self, reg: Reg, bits: int) -> None:
        self.set(reg, self.get(reg) & ~bits)

    def on_write(self, reg: Reg, hook: WriteHook) -> None:
        """Call ``hook(name, value)`` after each guest write to ``reg`` (KeyError for a
        register this bank does not have: a misspelt hook never goes unnoticed)."""
        name = reg if isinstance(reg, str) else reg.name
        if name not in self.by_name:
            raise KeyError(f"no register {name} in this bank")
        self.write_hooks[name] = hook

    # -- guest access ---------------------------------------------------------------

    def guest_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset``; holes and doorbells read as zero."""
        out = bytearray(size)
        start = offset & ~3
        for word in range(start, offset + size, 4):
            reg = self.by_offset.get(word)
            if reg is None or reg.access is Access.WO:
                continue
            raw = struct.pack("<I", self.values[reg.name] & reg.mask)
            for i in range(4):
                pos = word + i - offset
                if 0 <= pos < size:
                    out[pos] = raw[i]
        return bytes(out)

    def guest_write(self, offset: int, data: bytes) -> None:
        """Write bytes at ``offset`` with each register's semantics; sub-word writes
        merge with the current value (as a byte-enabled PCIe write would)."""
        if len(data) == 4 and not offset & 3:  # one whole register (a doorbell): as is
            reg = self.by_offset.get(offset)
            if reg is not None:
                self._write_reg(reg, int.from_bytes(data, "little"), 0xFFFFFFFF)
            return
        start = offset & ~3
        for word in range(start, offset + len(data), 4):
            reg = self.by_offset.get(word)
            if reg is None:
                continue
            enable = 0
            value = 0
            for i in range(4):
                pos = word + i - offset
                if 0 <= pos < len(data):
                    enable |= 0xFF << (8 * i)
                    value |= data[pos] << (8 * i)
            self._write_reg(reg, value, enable)

    def _write_reg(self, reg: Register, value: int, enable: int) -> None:
        old = self.values[reg.name]
        if reg.access is Access.RO:
            return
        if reg.access is Access.RW:
            keep = old & ~(reg.mask & enable)
            self.values[reg.name] = keep | (value & reg.mask & enable)
        elif reg.access is Access.W1C:
            self.values[reg.name] = old & ~(value & enable & reg.mask)
        hook = self.write_hooks.get(reg.name)
        if hook is not None:
            hook(reg.name, value & enable)

    # -- save / restore -----------------------------------------------------------

    def save(self) -> bytes:
        return b"".join(struct.pack("<I", self.values[r.name]) for r in self.table)

    def restore(self, data: bytes) -> None:
        if len(data) != 4 * len(self.table):
            raise ValueError(f"register image of {len(data)} bytes, need {4 * len(self.table)}")
        for i, reg in enumerate(self.table):
            (self.values[reg.name],) = struct.unpack_from("<I", data, 4 * i)
