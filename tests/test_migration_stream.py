"""Save / stream / restore round trips (Hypothesis), and refused streams."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vfnic.device import snapshot
from vfnic.device.nic import Nic
from vfnic.errors import SnapshotError
from vfnic.regs import strategies as rs
from vfnic.regs.table import BAR0_SIZE, NUM_QUEUES, VF_TABLE
from vfnic.savevm import stream
from vfnic.savevm.migration import State

RING_REGS = [f"{k}{q}" for q in range(NUM_QUEUES)
             for k in ("RDBAL", "RDBAH", "RDLEN", "RDH", "RDT", "TDBAL", "TDBAH", "TDLEN",
                       "TDH", "TDT", "RXDCTL", "TXDCTL", "QERR")]


def migrate_in_process(src_nic: Nic, dst_nic: Nic, between: list[tuple[int, bytes]]) -> bytes:
    """PRE_COPY, guest writes, STOP_COPY on the source; RESUMING on the destination."""
    src, dst = src_nic.vfs[0], dst_nic.vfs[0]
    src.migration.set_state(State.PRE_COPY)
    data = src.migration.read(1 << 20)
    for offset, value in between:
        src.region_write(0, offset, value)
    src.migration.set_state(State.STOP_COPY)
    data += src.migration.read(1 << 20)
    dst.migration.set_state(State.STOP)
    dst.migration.set_state(State.RESUMING)
    dst.migration.write(data)
    dst.migration.set_state(State.STOP)
    return data


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_registers_and_ring_state_survive_save_stream_restore_bit_for_bit(
    data: st.DataObject,
) -> None:
    src_nic, dst_nic = Nic(1, nic_id=1), Nic(1, nic_id=2)
    src = src_nic.vfs[0]
    for offset, value in data.draw(rs.guest_writes(VF_TABLE, BAR0_SIZE, 25)):
        src.region_write(0, offset, value)
    # Ring positions as the device left them (RDH/TDH are device-owned).
    for name in data.draw(st.lists(st.sampled_from(RING_REGS), max_size=8)):
        # inside the register's mask: a restore refuses bits no write can set
        src.bank.set(name, data.draw(st.integers(0, 0xFFFF)) & src.bank.by_name[name].mask)
    src.bank.set("EICR", data.draw(st.integers(0, 0xFFFFFFFF)))  # pending causes
    src.msix[:64] = data.draw(st.binary(min_size=64, max_size=64))  # MSI-X table
    between = data.draw(rs.guest_writes(VF_TABLE, BAR0_SIZE, 10))
    migrate_in_process(src_nic, dst_nic, between)
    dst = dst_nic.vfs[0]
    assert snapshot.save(dst) == snapshot.save(src)
    assert dst.bank.values == src.bank.values
    assert bytes(dst.config.data) == bytes(src.config.data)
    assert dst.msix == src.msix and dst.mac == src.mac


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_or_truncated_streams_are_always_refused(data: st.DataObject) -> None:
    src_nic, dst_nic = Nic(1, nic_id=1), Nic(1, nic_id=2)
    src_nic.vfs[0].region_write(0, 0x28, struct.pack("<I", 0xABCD1234))
    src = src_nic.vfs[0]
    src.migration.set_state(State.PRE_COPY)
    good = src.migration.read(1 << 20)
    src.region_write(0, 0x28, b"\x01\x02\x03\x04")
    src.migration.set_state(State.STOP_COPY)
    good += src.migration.read(1 << 20)
    kind = data.draw(st.sampled_from(["flip", "truncate", "version", "drop-end"]))
    bad = bytearray(good)
    if kind == "flip":
        pos = data.draw(st.integers(0, len(good) - 1))
        bad[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        bad = bad[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "version":
        bad[4:6] = struct.pack("<H", data.draw(st.integers(0, 0xFFFF).filter(
            lambda v: v != stream.VERSION)))
    else:
        recs = stream.records(good)
        bad = bytearray(b"".join(stream._record(k, p) for k, p in recs
                                 if k != stream.KIND_END))
    dst = dst_nic.vfs[0]
    before = snapshot.save(dst)
    dst.migration.set_state(State.RESUMING)
    dst.migration.write(bytes(bad))
    try:
        dst.migration.set_state(State.STOP)
    except SnapshotError:
        pass
    else:
        raise AssertionError(f"a {kind} stream was accepted")
    assert snapshot.save(dst) == before  # the destination is unchanged
    assert dst.migration.state == State.RESUMING  # and may be fed a good stream again
    dst.migration.write(good)
    dst.migration.set_state(State.STOP)
    assert snapshot.save(dst) == snapshot.save(src)


def test_stop_copy_sends_only_what_changed_after_pre_copy() -> None:
    src_nic, dst_nic = Nic(1), Nic(1, nic_id=2)
    data = migrate_in_process(src_nic, dst_nic, [(0x28, b"\xaa\xbb\xcc\xdd")])
    kinds = [k for k, _ in stream.records(data)]
    assert kinds == [stream.KIND_FULL, stream.KIND_DELTA, stream.KIND_END]
    delta = stream.records(data)[1][1]
    assert len(delta) < 200  # a few patches, not the whole 20 KiB image
    assert dst_nic.vfs[0].bank.get("MTA") == 0xDDCCBBAA


def test_stopped_device_does_no_dma_and_counts_arrivals_outside_its_state() -> None:
    nic = Nic(2)
    vf = nic.vfs[0]
    vf.migration.set_state(State.STOP)
    before = snapshot.save(vf)
    vf.datapath.receive(b"\x02\x56\x46\x00\x00\x01" + b"\x00" * 54)
    assert vf.stopped_drops == 1
    assert snapshot.save(vf) == before
    assert not vf.signal(2, 0)  # no interrupts while stopped


class RecordingDevice:
    """A device seen only through savevm.migration.Device: the FSM needs nothing else."""

    def __init__(self, state: bytes) -> None:
        self.state = state
        self.running = True
        self.calls: list[str] = []

    def save_state(self) -> bytes:
        self.calls.append("save_state")
        return self.state

    def load_state(self, image: bytes, pages: list[tuple[int, bytes]]) -> None:
        self.calls.append("load_state")
        self.state = image

    def set_running(self, running: bool) -> None:
        self.calls.append(f"set_running({running})")
        self.running = running

    def dma_extents(self) -> list[tuple[int, bytes]]:
        self.calls.append("dma_extents")
        return []


def test_the_state_machine_drives_any_device_through_the_protocol() -> None:
    from vfnic.savevm.migration import Migration

    src = Migration(RecordingDevice(b"device state " * 100))
    src.set_state(State.PRE_COPY)
    data = src.read(1 << 20)
    src.set_state(State.STOP_COPY)
    data += src.read(1 << 20)
    assert src.device.calls == ["save_state", "set_running(False)", "save_state",  # type: ignore[attr-defined]
                                "dma_extents"]
    dst_dev = RecordingDevice(b"")
    dst = Migration(dst_dev)
    dst.set_state(State.STOP)
    dst.set_state(State.RESUMING)
    dst.write(data)
    dst.set_state(State.STOP)
    assert dst_dev.state == b"device state " * 100 and not dst_dev.running
    dst.set_state(State.RUNNING)
    assert dst_dev.running
