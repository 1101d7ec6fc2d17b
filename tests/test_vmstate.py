"""The VF's state as QEMU's dbus-vmstate carries it (vfnic.migrate.vfstate), in process:
any device state and DMA-written guest pages survive Save -> Load bit for bit, any
corrupted or foreign Save output is refused with the destination unchanged, and a
state over QEMU's 1 MiB is refused with the source VF running again."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfnic.device import snapshot
from vfnic.device.function import PciFunction
from vfnic.device.nic import Nic
from vfnic.errors import SnapshotError, VfnicError
from vfnic.migrate import vfstate as vmstate
from vfnic.regs import strategies as rs
from vfnic.regs.table import BAR0_SIZE, VF_TABLE
from vfnic.savevm import stream
from vfnic.savevm.migration import State

RAM = 64 * stream.PAGE_SIZE  # guest RAM shared with the device (a memfd, like QEMU's)


def with_ram(fn: PciFunction) -> PciFunction:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, RAM)
    fn.dma.map(0, RAM, 3, 0, fd)
    return fn


def device_state(fn: PciFunction) -> tuple[object, ...]:
    """Everything a snapshot holds but the function's own index on its host."""
    return (dict(fn.bank.values), bytes(fn.config.data), bytes(fn.msix), fn.perm_mac,
            fn.link_state, fn.migration_mode)


def random_source(data: st.DataObject) -> tuple[PciFunction, dict[int, bytes]]:
    src = with_ram(Nic(1, nic_id=1).vfs[0])
    for offset, value in data.draw(rs.guest_writes(VF_TABLE, BAR0_SIZE, 25)):
        src.region_write(0, offset, value)
    src.msix[:64] = data.draw(st.binary(min_size=64, max_size=64))
    src.migration_mode = data.draw(st.sampled_from(["transparent", "cooperative"]))
    vmstate.start_dirty_log(src)
    written: dict[int, bytes] = {}
    for page in data.draw(st.lists(st.integers(0, RAM // stream.PAGE_SIZE - 1), max_size=12)):
        content = data.draw(st.binary(min_size=1, max_size=64))
        addr = page * stream.PAGE_SIZE + data.draw(st.integers(0, 64))
        src.dma.write(addr, content)  # the device's DMA, logged
        written[page] = src.dma.read(page * stream.PAGE_SIZE, stream.PAGE_SIZE)
    return src, written


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_device_state_survives_save_then_load_bit_for_bit(data: st.DataObject) -> None:
    src, written = random_source(data)
    dst = with_ram(Nic(2, nic_id=2).vfs[1])  # another host, another VF index
    blob = vmstate.save(src)
    assert src.migration.state == State.STOP_COPY and not src.running
    assert vmstate.pages_in(blob) == len(written)
    vmstate.load(dst, blob)
    assert dst.migration.state == State.STOP
    assert device_state(dst) == device_state(src)
    for page, content in written.items():
        assert dst.dma.read(page * stream.PAGE_SIZE, stream.PAGE_SIZE) == content
    vmstate.run(dst)
    assert dst.migration.state == State.RUNNING and dst.running


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_corrupted_save_output_is_refused_and_changes_nothing(data: st.DataObject) -> None:
    src, _ = random_source(data)
    dst = with_ram(Nic(1, nic_id=2).vfs[0])
    good = vmstate.save(src)
    bad = bytearray(good)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "garbage"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            bad[data.draw(st.integers(0, len(bad) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        bad = bad[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "extend":
        bad += data.draw(st.binary(min_size=1, max_size=64))
    else:
        bad = bytearray(data.draw(st.binary(max_size=4096)))
    if bytes(bad) == good:
        return
    before = (device_state(dst), dst.dma.read(0, RAM))
    with pytest.raises(VfnicError):
        vmstate.load(dst, bytes(bad))
    assert (device_state(dst), dst.dma.read(0, RAM)) == before
    assert dst.migration.state == State.RUNNING  # refused: the VF as it was
    vmstate.load(dst, good)  # and a good stream is still taken
    assert device_state(dst) == device_state(src)


def test_a_foreign_stream_is_refused() -> None:
    nic = Nic(1, nic_id=1)
    pf_stream = stream.full_record(snapshot.save(nic.pf))
    pf_stream += stream.end_record(snapshot.save(nic.pf))
    dst = Nic(1, nic_id=2).vfs[0]
    with pytest.raises(SnapshotError, match="PF"):
        vmstate.load(dst, pf_stream)
    with pytest.raises(SnapshotError):
        vmstate.load(dst, b"VMSTATE of some other helper")
    assert dst.migration.state == State.RUNNING


def test_a_state_over_qemus_limit_is_refused_and_the_vf_runs_on() -> None:
    src = with_ram(Nic(1, nic_id=1).vfs[0])
    src.region_write(0, 0x28, struct.pack("<I", 0xCAFE0001))
    vmstate.start_dirty_log(src)
    for page in range(RAM // stream.PAGE_SIZE):  # every byte of every page, by DMA
        src.dma.write(page * stream.PAGE_SIZE, b"x" * stream.PAGE_SIZE)
    with pytest.raises(vmstate.StateTooLarge, match="exceeds QEMU's dbus-vmstate limit"):
        vmstate.save(src, limit=32 * stream.PAGE_SIZE)
    assert src.migration.state == State.RUNNING and src.running
    assert src.bank.get("MTA") == 0xCAFE0001
    # Under the real limit the same state fits: 1 MiB holds about 250 whole pages.
    assert vmstate.max_pages(len(snapshot.save(src))) > RAM // stream.PAGE_SIZE
    assert len(vmstate.save(src)) <= vmstate.LIMIT


def test_migration_mode_is_set_per_vf_and_shown(nic) -> None:  # type: ignore[no-untyped-def]
    from vfnic.device.nic import control_call
    from vfnic.errors import UsageError

    control_call(nic.dir, {"op": "vf-migration", "vf": 1, "mode": "cooperative"})
    vfs = control_call(nic.dir, {"op": "link-show"})["vfs"]
    assert [v["migration_mode"] for v in vfs] == ["transparent", "cooperative"]
    with pytest.raises(UsageError, match="migration mode must be one of"):
        control_call(nic.dir, {"op": "vf-migration", "vf": 0, "mode": "fast"})
    with pytest.raises(UsageError, match="no VF 7"):
        control_call(nic.dir, {"op": "vf-migration", "vf": 7, "mode": "cooperative"})


def test_qemu_option_syntax_is_read_like_qemu_reads_it() -> None:
    from vfnic.migrate.vmstate import _object_or_device

    obj = _object_or_device("dbus-vmstate,id=v,addr=unix:path=/r/b.bus,id-list=a,,b")
    assert obj["qom-type"] == "dbus-vmstate" and obj["addr"] == "unix:path=/r/b.bus"
    assert obj["id-list"] == "a,b"
    dev = _object_or_device('{"driver": "vfio-user-pci", "id": "nic0", '
                            '"socket": {"type": "unix", "path": "/n/vf0.sock"}}')
    assert dev["id"] == "nic0" and dev["socket"]["path"] == "/n/vf0.sock"
    dev = _object_or_device("vfio-user-pci,id=nic1,socket.type=unix,socket.path=/n/vf1.sock")
    assert dev["driver"] == "vfio-user-pci" and dev["socket"]["path"] == "/n/vf1.sock"


def test_pages_outside_the_destinations_ram_are_refused_before_anything_is_applied() -> None:
    src = with_ram(Nic(1, nic_id=1).vfs[0])
    src.region_write(0, 0x28, struct.pack("<I", 0xCAFE0001))
    vmstate.start_dirty_log(src)
    src.dma.write(RAM - stream.PAGE_SIZE, b"last page")
    blob = vmstate.save(src)
    dst = Nic(1, nic_id=2).vfs[0]
    fd = os.memfd_create("small-ram")
    os.ftruncate(fd, RAM // 2)
    dst.dma.map(0, RAM // 2, 3, 0, fd)  # a destination whose RAM ends below that page
    before = device_state(dst)
    with pytest.raises(SnapshotError, match="outside the destination's DMA mappings"):
        vmstate.load(dst, blob)
    assert device_state(dst) == before and dst.migration.state == State.RUNNING


def test_records_are_numbered_past_the_kept_history_and_waited_for_server_side() -> None:
    import threading
    from typing import cast

    from vfnic.device.nic import NicServer
    from vfnic.migrate.vmstate import VmStateService

    service = VmStateService(cast(NicServer, None))  # records only: no NIC needed
    for i in range(150):
        service.add_record({"role": "source", "n": i, "result": "completed"})
    assert [r["seq"] for r in service.records()] == list(range(51, 151))  # last 100 kept
    assert [r["n"] for r in service.records(since=148)] == [148, 149]
    late: dict[str, object] = {"role": "destination"}
    service.add_record(late)
    threading.Timer(0.2, lambda: late.update(restored_at=1.0)).start()
    got = service.control({"op": "migration-wait", "role": "destination", "key": "restored_at",
                           "since": 150, "timeout": 10})
    assert got["seq"] == 151 and got["restored_at"] == 1.0
    with pytest.raises(VfnicError, match="no source record with 'loaded_at'"):
        service.wait_record("source", "loaded_at", 150, 0.05)


def test_only_the_bytes_the_device_wrote_are_carried_and_the_rest_of_the_page_is_qemus() -> None:
    src = with_ram(Nic(1, nic_id=1).vfs[0])
    vmstate.start_dirty_log(src)
    src.dma.write(0x1000 + 100, b"\x11" * 98)  # a frame into an RX buffer
    src.dma.write(0x1000 + 150, b"\x22" * 100)  # another, overlapping it
    src.dma.write(0x2FF0, b"\x33" * 32)  # a write-back across a page boundary
    src.dma.write(0x5000, b"\x44" * 16)
    src.dma.write(0x5000 + 16, b"\x55" * 16)  # touching: one extent
    blob = vmstate.save(src)
    assert [(iova, len(b)) for iova, b in vmstate.extents_in(blob)] == [
        (0x1000 + 100, 150), (0x2FF0, 16), (0x3000, 16), (0x5000, 32)]
    assert vmstate.pages_in(blob) == 4
    dst = with_ram(Nic(1, nic_id=2).vfs[0])
    # What QEMU's RAM stream brought: the CPU's bytes of those pages, not the device's.
    for page in (0x1000, 0x2000, 0x3000, 0x5000):
        dst.dma.write(page, b"\xcc" * stream.PAGE_SIZE)
    vmstate.load(dst, blob)
    assert dst.dma.read(0x1000, 100) == b"\xcc" * 100
    assert dst.dma.read(0x1000 + 100, 150) == b"\x11" * 50 + b"\x22" * 100
    assert dst.dma.read(0x1000 + 250, 10) == b"\xcc" * 10
    assert dst.dma.read(0x2FF0, 32) == b"\x33" * 32
    assert dst.dma.read(0x5000, 40) == b"\x44" * 16 + b"\x55" * 16 + b"\xcc" * 8
