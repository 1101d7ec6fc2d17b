"""The server's RX and TX work per batch (issue 9, item 5), in process on a real memfd
(pread/pwrite, as for QEMU's memory) and a real eventfd: what a driver sees must be
what it saw when the device worked frame by frame."""

from __future__ import annotations

import os
import struct
import types
from collections.abc import Iterator

import pytest

from vfnic.device import pci
from vfnic.device.function import PciFunction
from vfnic.device.nic import Nic
from vfnic.regs import descriptors as D
from vfnic.regs import table as T
from vfnic.vfiouser import wire

MEM = 0x10000
SIZE = 0x10000
RX_RING, TX_RING, BUFFERS = 0x0, 0x1000, 0x2000  # offsets in the memfd
SLOTS = 8  # descriptors per ring (DLEN 128)


class Vf:
    """A VF of ``nic`` with its rings in a memfd, driven as a driver would."""

    def __init__(self, nic: Nic, fn: PciFunction) -> None:
        self.nic, self.fn = nic, fn
        self.mem = os.memfd_create("test-batch")
        os.ftruncate(self.mem, SIZE)
        fn.dma.map(MEM, SIZE, 3, 0, os.dup(self.mem))
        fn.config.set(pci.COMMAND, 2, fn.config.get(pci.COMMAND, 2) | pci.COMMAND_MASTER)
        fn.session = types.SimpleNamespace(endpoint=None)  # type: ignore[assignment]
        self.irq = os.eventfd(0, os.EFD_NONBLOCK)
        fn.irq_fds[(wire.PciIrq.MSI, 0)] = self.irq
        fn.bank.set(T.EIMS, 0xFFFFFFFF)
        fn.bank.set_bits(T.CTRL, T.CTRL_SLU)
        nic._update_link(fn)
        for ring, off in ((T.RX, RX_RING), (T.TX, TX_RING)):
            fn.bank.set(ring.DBAL(0), MEM + off)
            fn.bank.set(ring.DLEN(0), SLOTS * D.DESC_SIZE)
            fn.bank.set(ring.XDCTL(0), T.QCTL_ENABLE)
        for i in range(SLOTS):
            self.post(i, MEM + BUFFERS + i * D.RX_BUFFER_SIZE // 2)
        self.interrupts()

    def post(self, slot: int, addr: int) -> None:
        os.pwrite(self.mem, struct.pack("<QQ", addr, 0), RX_RING + slot * D.DESC_SIZE)

    def rx_desc(self, slot: int) -> tuple[int, ...]:
        return D.RX_DESC.unpack(os.pread(self.mem, D.DESC_SIZE, RX_RING + slot * D.DESC_SIZE))

    def buffer(self, slot: int, n: int) -> bytes:
        return os.pread(self.mem, n, BUFFERS + slot * D.RX_BUFFER_SIZE // 2)

    def interrupts(self) -> int:
        try:
            return os.eventfd_read(self.irq)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.fn.irq_fds.clear()
        self.fn.dma.unmap_all()
        os.close(self.irq)
        os.close(self.mem)


@pytest.fixture
def vfs() -> Iterator[tuple[Nic, Vf, Vf]]:
    nic = Nic(2)
    a, b = Vf(nic, nic.vfs[0]), Vf(nic, nic.vfs[1])
    try:
        yield nic, a, b
    finally:
        a.close()
        b.close()


def frames_to(vf: Vf, count: int, size: int = 60) -> list[bytes]:
    src = b"\x02\x00\x00\x00\x00\x99"
    return [(vf.fn.rx_mac + src + b"\x88\xb5" + bytes([i]) * size)[:size] for i in range(count)]


def test_a_burst_fills_the_posted_descriptors_across_the_wrap_and_misses_the_rest(
        vfs: tuple[Nic, Vf, Vf]) -> None:
    nic, _, vf = vfs
    fn = vf.fn
    fn.bank.set(T.RDH(0), 6)
    fn.bank.set(T.RDT(0), 3)  # slots 6, 7, 0, 1, 2 are the device's
    frames = frames_to(vf, 7)
    # every receiver of the burst missed frames: the uplink reader waits for descriptors
    assert nic.switch.from_uplink_burst(frames) is True
    slots = [6, 7, 0, 1, 2]
    for frame, slot in zip(frames, slots, strict=False):
        addr, length, _csum, status, errors, _vlan = vf.rx_desc(slot)
        assert addr == MEM + BUFFERS + slot * D.RX_BUFFER_SIZE // 2  # the address is kept
        assert (length, status, errors) == (len(frame), D.STAT_DD | D.STAT_EOP, 0)
        assert vf.buffer(slot, len(frame)) == frame
    assert all(vf.rx_desc(s)[3] == 0 for s in (3, 4, 5))  # not the device's: untouched
    assert fn.bank.get(T.RDH(0)) == 3
    assert (fn.bank.get(T.GPRC), fn.bank.get(T.MPC)) == (5, 2)
    assert (fn.counters["rx_frames"], fn.counters["rx_missed"], fn.counters["rx_batches"]) \
        == (5, 2, 1)
    assert fn.bank.get(T.GORCL) == 5 * 60
    assert vf.interrupts() == 1  # one for the burst
    fn.bank.set(T.RDT(0), 5)  # two descriptors posted again
    assert nic.switch.from_uplink_burst(frames_to(vf, 2)) is False  # all delivered


def test_a_burst_starves_only_if_every_function_that_got_frames_missed_some(
        vfs: tuple[Nic, Vf, Vf]) -> None:
    """The uplink reader waits for descriptors only when no receiver of the burst had
    room: traffic for a function with room never waits for another's ring."""
    nic, a, b = vfs
    a.fn.bank.set(T.RDT(0), 0)  # a: no descriptor posted
    b.fn.bank.set(T.RDT(0), 4)  # b: room for 4
    assert nic.switch.from_uplink_burst(frames_to(a, 2) + frames_to(b, 2)) is False
    assert (a.fn.bank.get(T.MPC), b.fn.bank.get(T.GPRC)) == (2, 2)
    assert nic.switch.from_uplink_burst(frames_to(a, 1) + frames_to(b, 3)) is True  # b: 2 left
    assert (a.fn.bank.get(T.MPC), b.fn.bank.get(T.GPRC), b.fn.bank.get(T.MPC)) == (3, 4, 1)
    unknown = [b"\x02\x00\x00\x00\x00\x42" + f[6:] for f in frames_to(a, 2)]
    assert nic.switch.from_uplink_burst(unknown) is False  # for nobody here: no wait
    assert (a.interrupts(), b.interrupts()) == (0, 2)  # b: one per burst that fed it
    assert not nic.burst_rx  # every receiver flushed


def test_an_oversized_frame_in_a_batch_uses_its_descriptor_with_the_length_error(
        vfs: tuple[Nic, Vf, Vf]) -> None:
    nic, _, vf = vfs
    fn = vf.fn
    fn.bank.set(T.RDT(0), 4)
    frames = frames_to(vf, 3)
    frames[1] = frames[1] + bytes(D.RX_BUFFER_SIZE)
    nic.switch.from_uplink_burst(frames)
    assert vf.rx_desc(1)[1:5] == (0, 0, D.STAT_DD | D.STAT_EOP, D.RXERR_LEN)
    assert vf.rx_desc(2)[1:5] == (60, 0, D.STAT_DD | D.STAT_EOP, 0)
    assert vf.buffer(2, 60) == frames[2]
    assert (fn.bank.get(T.GPRC), fn.bank.get(T.RXERRC), fn.bank.get(T.RDH(0))) == (2, 1, 3)


def test_a_bad_buffer_address_mid_batch_delivers_the_frames_before_it_and_stops_the_queue(
        vfs: tuple[Nic, Vf, Vf]) -> None:
    nic, _, vf = vfs
    fn = vf.fn
    fn.bank.set(T.RDT(0), 5)
    vf.post(2, 0x900000)  # outside the client's mappings
    frames = frames_to(vf, 4)
    nic.switch.from_uplink_burst(frames)
    assert [vf.rx_desc(s)[3] for s in range(4)] == [D.STAT_DD | D.STAT_EOP] * 2 + [0, 0]
    assert vf.buffer(1, 60) == frames[1]
    assert fn.bank.get(T.RDH(0)) == 2 and fn.bank.get(T.GPRC) == 2
    assert not fn.bank.get(T.RXDCTL(0)) & T.QCTL_ENABLE
    assert fn.bank.get(T.QERR(0)) & T.QERR_DMA
    assert fn.bank.get(T.MPC) == 1  # the frame after the faulting one
    assert vf.interrupts() == 1


def test_a_client_file_shrunk_between_batches_is_a_dma_error_and_never_regrown(
        vfs: tuple[Nic, Vf, Vf]) -> None:
    nic, _, vf = vfs
    fn = vf.fn
    fn.bank.set(T.RDT(0), 6)
    nic.switch.from_uplink_burst(frames_to(vf, 2))
    assert fn.bank.get(T.GPRC) == 2
    os.ftruncate(vf.mem, BUFFERS)  # the buffers are gone, the ring is not
    nic.switch.from_uplink_burst(frames_to(vf, 2))
    assert os.fstat(vf.mem).st_size == BUFFERS  # pwrite did not grow it back
    assert fn.bank.get(T.QERR(0)) & T.QERR_DMA
    assert fn.bank.get(T.GPRC) == 2 and fn.bank.get(T.RDH(0)) == 2


def test_a_tx_batch_to_another_vf_is_delivered_as_one_batch_with_one_interrupt_each(
        vfs: tuple[Nic, Vf, Vf]) -> None:
    _, tx, rx = vfs
    frames = frames_to(rx, 5)
    for i, frame in enumerate(frames):
        frame = frame[:6] + tx.fn.rx_mac + frame[12:]
        frames[i] = frame
        os.pwrite(tx.mem, frame, BUFFERS + 0x800 + i * 64)
        cmd = D.CMD_EOP | (D.CMD_RS if i == 4 else 0)
        os.pwrite(tx.mem, D.TX_DESC.pack(MEM + BUFFERS + 0x800 + i * 64, len(frame), 0, cmd,
                                         0, 0, 0), TX_RING + i * D.DESC_SIZE)
    rx.fn.bank.set(T.RDT(0), 7)
    with tx.fn.lock:
        tx.fn.bank.set(T.TDT(0), 5)
        tx.fn.datapath.on_tail_write(T.TX, 0)
    assert tx.fn.bank.get(T.TDH(0)) == 5 and tx.fn.bank.get(T.GPTC) == 5
    assert os.pread(tx.mem, 1, TX_RING + 4 * D.DESC_SIZE + 12) == bytes([D.STAT_DD])
    assert os.pread(tx.mem, 1, TX_RING + 3 * D.DESC_SIZE + 12) == b"\0"
    assert [rx.buffer(s, 60) for s in range(5)] == frames
    assert rx.fn.bank.get(T.GPRC) == 5
    assert (tx.interrupts(), rx.interrupts()) == (1, 1)


def test_tx_write_back_is_one_dma_per_batch_and_only_rs_descriptors_get_dd(
        vfs: tuple[Nic, Vf, Vf], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sent descriptors that asked for a report get DD in one write per transmit
    (two when the span wraps), the descriptors between them written back as they were
    read; one without RS before the first RS one is not written at all."""
    _, tx, rx = vfs
    start = 5  # slots 5, 6, 7, 0, 1, 2: the batch wraps
    tx.fn.bank.set(T.TDH(0), start)
    tx.fn.bank.set(T.TDT(0), start)
    descs: dict[int, bytes] = {}
    for i, frame in enumerate(frames_to(rx, 6)):
        slot = (start + i) % SLOTS
        frame = frame[:6] + tx.fn.rx_mac + frame[12:]
        os.pwrite(tx.mem, frame, BUFFERS + 0x800 + i * 64)
        cmd = D.CMD_EOP | (D.CMD_RS if i % 2 else 0)  # RS in slots 6, 0 and 2
        descs[slot] = D.TX_DESC.pack(MEM + BUFFERS + 0x800 + i * 64, len(frame), 0, cmd,
                                     0, 0, 0)
        os.pwrite(tx.mem, descs[slot], TX_RING + slot * D.DESC_SIZE)
    writes: list[tuple[int, int]] = []
    write = tx.fn.dma.write

    def counted(address: int, data: bytes) -> None:
        writes.append((address, len(data)))
        write(address, data)

    monkeypatch.setattr(tx.fn.dma, "write", counted)
    rx.fn.bank.set(T.RDT(0), 7)
    with tx.fn.lock:
        tx.fn.bank.set(T.TDT(0), (start + 6) % SLOTS)
        tx.fn.datapath.on_tail_write(T.TX, 0)
    assert tx.fn.bank.get(T.TDH(0)) == (start + 6) % SLOTS
    assert tx.fn.bank.get(T.GPTC) == 6 and rx.fn.bank.get(T.GPRC) == 6
    ring = MEM + TX_RING
    assert writes == [(ring + 6 * D.DESC_SIZE, 2 * D.DESC_SIZE), (ring, 3 * D.DESC_SIZE)]
    for i in range(6):
        slot = (start + i) % SLOTS
        want = bytearray(descs[slot])
        if i % 2:
            want[D.STATUS_OFFSET] = D.STAT_DD
        assert os.pread(tx.mem, D.DESC_SIZE, TX_RING + slot * D.DESC_SIZE) == bytes(want), i
    assert tx.interrupts() == 1
