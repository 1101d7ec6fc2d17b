"""Register semantics and save/restore, checked with Hypothesis on the table."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vfnic.device import snapshot
from vfnic.device.nic import Nic
from vfnic.errors import SnapshotError
from vfnic.regs import strategies as rs
from vfnic.regs.bank import RegisterBank
from vfnic.regs.table import BAR0_SIZE, PF_TABLE, VF_TABLE, Access

TABLES = {"pf": PF_TABLE, "vf0": VF_TABLE}


def guest_view(fn) -> bytes:  # type: ignore[no-untyped-def]
    """Everything the guest can read: BAR0, config space and the MSI-X BAR."""
    return fn.bank.guest_read(0, BAR0_SIZE) + fn.config.read(0, 4096) + fn.region_read(3, 0, 0x4000)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["pf", "vf0"]), data=st.data())
def test_snapshot_restore_is_indistinguishable(name: str, data: st.DataObject) -> None:
    nic = Nic(2)
    fn = nic.function(name)
    for offset, value in data.draw(rs.guest_writes(TABLES[name], BAR0_SIZE)):
        fn.region_write(0, offset, value)
    for offset, value in data.draw(st.lists(st.tuples(st.integers(0, 4095), st.binary(
            min_size=1, max_size=4)), max_size=10)):
        if offset + len(value) <= 4096:
            fn.region_write(7, offset, value)
    saved = snapshot.save(fn)
    fresh = Nic(2).function(name)
    snapshot.restore(fresh, saved)
    assert guest_view(fresh) == guest_view(fn)
    assert snapshot.save(fresh) == saved
    assert fresh.bank.values == fn.bank.values


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["pf", "vf0"]), data=st.data())
def test_ro_registers_never_change_under_guest_writes(name: str, data: st.DataObject) -> None:
    table = TABLES[name]
    bank = RegisterBank(table, BAR0_SIZE)
    reg = data.draw(rs.register(table, Access.RO))
    before = data.draw(rs.value(reg))
    bank.set(reg.name, before)
    for _, value in data.draw(st.lists(st.tuples(st.just(0), st.binary(min_size=4, max_size=4)),
                                       min_size=1, max_size=5)):
        bank.guest_write(reg.offset, value)
    assert bank.get(reg.name) == before


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["pf", "vf0"]), data=st.data())
def test_w1c_clears_only_written_bits(name: str, data: st.DataObject) -> None:
    table = TABLES[name]
    bank = RegisterBank(table, BAR0_SIZE)
    reg = data.draw(rs.register(table, Access.W1C))
    before = data.draw(rs.value(reg)) & reg.mask
    written = data.draw(rs.value(reg))
    bank.set(reg.name, before)
    bank.guest_write(reg.offset, struct.pack("<I", written))
    assert bank.get(reg.name) == before & ~(written & reg.mask)


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(["pf", "vf0"]), data=st.data())
def test_rw_registers_keep_exactly_the_implemented_bits(name: str, data: st.DataObject) -> None:
    table = TABLES[name]
    bank = RegisterBank(table, BAR0_SIZE)
    reg = data.draw(rs.register(table, Access.RW))
    written = data.draw(rs.value(reg))
    bank.guest_write(reg.offset, struct.pack("<I", written))
    assert bank.get(reg.name) == written & reg.mask
    assert bank.guest_read(reg.offset, 4) == struct.pack("<I", written & reg.mask)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["pf", "vf0"]), data=st.data())
def test_doorbells_read_as_zero(name: str, data: st.DataObject) -> None:
    table = TABLES[name]
    bank = RegisterBank(table, BAR0_SIZE)
    reg = data.draw(rs.register(table, Access.WO))
    bank.set(reg.name, data.draw(rs.value(reg)))
    assert bank.guest_read(reg.offset, 4) == b"\0\0\0\0"


def test_save_path_reads_and_writes_every_register() -> None:
    for table in (PF_TABLE, VF_TABLE):
        bank = RegisterBank(table, BAR0_SIZE)
        for i, reg in enumerate(table):
            bank.set(reg.name, 0xA5A50000 + i)
        other = RegisterBank(table, BAR0_SIZE)
        other.restore(bank.save())
        assert other.values == bank.values


def test_snapshots_of_unchanged_devices_are_identical() -> None:
    a, b = Nic(3), Nic(3)
    for fa, fb in zip(a.functions, b.functions, strict=True):
        assert snapshot.save(fa) == snapshot.save(fa) == snapshot.save(fb)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_corrupted_or_truncated_snapshots_are_refused_and_change_nothing(
    data: st.DataObject,
) -> None:
    src = Nic(1).vfs[0]
    src.region_write(0, 0x20, b"\x11\x22\x33\x44")
    good = snapshot.save(src)
    dst = Nic(1).vfs[0]
    before = snapshot.save(dst)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(good) - 1))
        bit = data.draw(st.integers(0, 7))
        bad = bytearray(good)
        bad[pos] ^= 1 << bit
    elif kind == "truncate":
        bad = bytearray(good[: data.draw(st.integers(0, len(good) - 1))])
    else:
        bad = bytearray(good + data.draw(st.binary(min_size=1, max_size=16)))
    try:
        snapshot.restore(dst, bytes(bad))
    except SnapshotError:
        pass
    else:
        raise AssertionError(f"{kind} snapshot was accepted")
    assert snapshot.save(dst) == before


def test_pf_snapshot_does_not_restore_a_vf() -> None:
    nic = Nic(1)
    try:
        snapshot.restore(nic.vfs[0], snapshot.save(nic.pf))
    except SnapshotError as exc:
        assert "PF" in str(exc)
    else:
        raise AssertionError("accepted")
