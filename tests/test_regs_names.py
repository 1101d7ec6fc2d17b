"""Registers and bits as identifiers derived from the one table (vfnic.regs.table):
CTRL, RDT(q), VFMBMEM(i), EICR_LSC; hooks keyed by them; a misspelt one fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vfnic.device.nic import VF_WRITE_HOOKS, WRITE_HOOKS, Nic
from vfnic.regs import table as T
from vfnic.regs.bank import RegisterBank
from vfnic.regs.table import Register, RegisterArray


def identifier_of(reg: Register) -> Register:
    """The register reached by its identifier: T.NAME, or T.ARRAY(n) for NAMEn."""
    plain = getattr(T, reg.name, None)
    if isinstance(plain, Register):
        return plain
    stem = reg.name.rstrip("0123456789")
    array = getattr(T, stem)
    assert isinstance(array, RegisterArray), reg.name
    return array(int(reg.name[len(stem):]))


@pytest.mark.parametrize("reg", T.PF_TABLE, ids=lambda r: r.name)
def test_every_row_of_the_table_is_an_identifier(reg: Register) -> None:
    assert identifier_of(reg) is reg


def test_queue_registers_follow_the_queue_stride() -> None:
    for q in range(T.NUM_QUEUES):
        assert T.RDT(q).name == f"RDT{q}"
        assert T.RDT(q).offset == T.QUEUE_BASE + q * T.QUEUE_STRIDE + 0x10
        assert T.TDT(q).offset - T.TDBAL(q).offset == 0x10
        assert T.RX.DT(q) is T.RDT(q) and T.TX.XDCTL(q) is T.TXDCTL(q)
    with pytest.raises(IndexError):
        T.RDT(T.NUM_QUEUES)
    assert T.VFMBMEM(T.MBX_WORDS - 1).name == f"VFMBMEM{T.MBX_WORDS - 1}"
    assert T.PFMAILBOX(T.MAX_VFS - 1).offset == 0x0500 + 4 * (T.MAX_VFS - 1)


def test_a_register_stands_for_its_offset_where_an_integer_is_wanted() -> None:
    import operator
    import struct

    assert operator.index(T.RDT(1)) == T.RDT(1).offset
    assert struct.pack("<I", T.TDT(0)) == struct.pack("<I", T.TDT(0).offset)
    assert hex(T.CTRL) == "0x0"


def test_bits_are_named() -> None:
    assert T.EICR_LSC == 1 << 31 and T.EICR_MAILBOX == 1 << 30
    assert T.EICR_RTXQ(1) == 1 << 1 and T.EICR_RTXQ_MASK == 0b11
    assert T.RXDCTL.mask == T.TXDCTL.mask == T.QCTL_ENABLE
    assert set(T.QERR_NAMES) == {T.QERR_DMA, T.QERR_LEN, T.QERR_RING, T.QERR_TAIL}


def test_the_bank_takes_identifiers_and_names() -> None:
    bank = RegisterBank(T.VF_TABLE, T.BAR0_SIZE)
    bank.set(T.RDT(1), 0x1_0005)  # 32-bit register: stored as written, masked on guest reads
    assert bank.get("RDT1") == bank.get(T.RDT(1)) == 0x1_0005
    bank.set_bits(T.CTRL, T.CTRL_SLU)
    assert bank.get(T.CTRL) == T.CTRL_SLU


def test_a_hook_on_an_unknown_register_is_refused() -> None:
    bank = RegisterBank(T.VF_TABLE, T.BAR0_SIZE)
    with pytest.raises(KeyError):
        bank.on_write("RDTT0", lambda _n, _v: None)
    with pytest.raises(KeyError):  # a PF-only register on a VF
        bank.on_write(T.PFMBICR, lambda _n, _v: None)


def test_a_misspelt_register_in_a_hook_table_fails_at_import(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "badhooks.py").write_text(
        "from vfnic.regs import table as T\n"
        "HOOKS = {T.CTRL: print, T.RDTT(0): print}\n")
    out = subprocess.run([sys.executable, "-c", "import badhooks"], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "has no attribute 'RDTT'" in out.stderr


def test_the_nics_hooks_are_registers_of_the_table_and_fire() -> None:
    assert set(WRITE_HOOKS) <= set(T.VF_TABLE) and set(VF_WRITE_HOOKS) <= set(T.VF_TABLE)
    nic = Nic(1)
    vf = nic.vfs[0]
    for reg in (*WRITE_HOOKS, *VF_WRITE_HOOKS):
        assert vf.bank.write_hooks[reg.name] is not None
    vf.bank.guest_write(T.EIMS.offset, T.EICR_LSC.to_bytes(4, "little"))
    vf.bank.guest_write(T.CTRL.offset, T.CTRL_SLU.to_bytes(4, "little"))  # CTRL hook: link up
    assert vf.bank.get(T.STATUS) & T.STATUS_LU
    assert vf.bank.get(T.EICR) & T.EICR_LSC
