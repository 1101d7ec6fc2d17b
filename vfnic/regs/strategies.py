"""Hypothesis strategies derived from the register table (used by the tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from vfnic.regs.table import Access, Register


def register(table: tuple[Register, ...], access: Access | None = None) -> st.SearchStrategy[
    Register
]:
    regs = [r for r in table if access is None or r.access is access]
    return st.sampled_from(regs)


def value(reg: Register) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << (8 * reg.width)) - 1)


@st.composite
def guest_write(draw: st.DrawFn, table: tuple[Register, ...], bar_size: int) -> tuple[int, bytes]:
    """A guest store: to a declared register (any width, any byte lane) or a hole."""
    if draw(st.booleans()):
        reg = draw(register(table))
        size = draw(st.sampled_from([1, 2, 4]))
        lane = draw(st.integers(0, (reg.width // size) - 1)) * size if size < reg.width else 0
        offset = reg.offset + lane
    else:
        size = draw(st.sampled_from([1, 2, 4, 8]))
        offset = draw(st.integers(0, bar_size // size - 1)) * size
    return offset, draw(st.binary(min_size=size, max_size=size))


def guest_writes(table: tuple[Register, ...], bar_size: int,
                 max_size: int = 40) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    return st.lists(guest_write(table, bar_size), max_size=max_size)
