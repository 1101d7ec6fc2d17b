"""DMA memory cannot crash or stall the NIC (issue 10, item 2): a client's file
shrinking under the server, a client that never answers DMA_READ/DMA_WRITE, a
DMA_LOGGING_REPORT asking for a huge bitmap."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfnic.device.nic import NicServer
from vfnic.regs import descriptors as D
from vfnic.regs import table as T
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient
from vfnic.vfiouser.features import MAX_BITMAP, Feature, LogControl, LogReport
from vfnic.vfiouser.server import DMA_REPLY_TIMEOUT, _Released
from vfnic.vfiouser.transport import Endpoint

pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    VENDOR_ID,
    dma_map_payload,
    make_memfd,
    region_access,
    u32,
    version_payload,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
TDBAL0, TDBAH0, TDLEN0, TDT0, TXDCTL0, QERR0 = 0x1020, 0x1024, 0x1028, 0x1030, 0x1034, 0x1038
RING = 0x10000  # ring at this IOVA, one 4 KiB page; frame buffer right after
BUF = 0x11000


@pytest.fixture
def served() -> Iterator[Path]:
    """`vfnic serve` in its own process: a SIGBUS would kill it, not pytest."""
    folder = Path(tempfile.mkdtemp(prefix="vfd-", dir="/tmp"))
    proc = subprocess.Popen([sys.executable, "-m", "vfnic.cli", "serve", "--dir",
                             str(folder / "nic"), "--vfs", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (folder / "nic" / "control.sock").exists() or proc.poll() is not None,
                   timeout=20, what="vfnic serve")
        assert proc.poll() is None, proc.communicate()
        yield folder / "nic"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def start_tx(c: VfioUserClient) -> None:
    """Bus master on, TX ring 0 of 8 descriptors at RING, descriptor 0 points at BUF."""
    c.config_write(0x04, 2, 0x6)
    c.write32(0, TDBAL0, RING)
    c.write32(0, TDBAH0, 0)
    c.write32(0, TDLEN0, 128)
    c.write32(0, TXDCTL0, T.QCTL_ENABLE)


def test_a_client_shrinking_its_memfd_does_not_kill_the_server(served: Path) -> None:
    fd = make_memfd(0x10000)
    desc = D.TX_DESC.pack(BUF, 60, 0, D.CMD_EOP | D.CMD_RS, 0, 0, 0)
    os.pwrite(fd, desc, 0)
    c = VfioUserClient(str(served / "vf0.sock"))
    try:
        c.dma_map(RING, 0x10000, fd=fd)
        start_tx(c)
        os.ftruncate(fd, 0)  # the attack: shrink the file under the server's mapping
        c.write32(0, TDT0, 1)  # doorbell: the server reads descriptor 0 from the file
        assert c.read32(0, QERR0) & T.QERR_DMA  # this VF sees a DMA queue error
        assert not c.read32(0, TXDCTL0) & T.QCTL_ENABLE
        other = VfioUserClient(str(served / "vf1.sock"))  # and the NIC keeps serving
        try:
            assert other.read32(wire.PciRegion.CONFIG, 0) & 0xFFFF == VENDOR_ID
        finally:
            other.close()
    finally:
        c.close()
        os.close(fd)


def test_a_shrunk_memfd_fails_rx_dma_too(served: Path) -> None:
    """Frames to a VF whose RX ring memory vanished: a queue error, no crash."""
    fd = make_memfd(0x10000)
    c = VfioUserClient(str(served / "vf0.sock"))
    try:
        c.dma_map(RING, 0x10000, fd=fd)
        c.config_write(0x04, 2, 0x6)
        c.write32(0, 0x1000, RING)  # RDBAL0
        c.write32(0, 0x1008, 128)  # RDLEN0
        c.write32(0, 0x1014, T.QCTL_ENABLE)  # RXDCTL0
        c.write32(0, 0x1010, 7)  # RDT0
        c.write32(0, 0x0000, 1 << 6)  # CTRL.SLU
        os.ftruncate(fd, 0)
        sender = VfioUserClient(str(served / "vf1.sock"))
        try:
            sfd = make_memfd(0x10000)
            frame = bytes.fromhex("025646000001") + bytes.fromhex("025646000101") + bytes(50)
            os.pwrite(sfd, D.TX_DESC.pack(BUF, len(frame), 0, D.CMD_EOP, 0, 0, 0), 0)
            os.pwrite(sfd, frame, BUF - RING)
            sender.dma_map(RING, 0x10000, fd=sfd)
            start_tx(sender)
            sender.write32(0, 0x0000, 1 << 6)
            sender.write32(0, TDT0, 1)
            os.close(sfd)
            wait_until(lambda: bool(c.read32(0, 0x1038) & T.QERR_DMA), what="RX queue error")
            assert sender.read32(wire.PciRegion.CONFIG, 0) & 0xFFFF == VENDOR_ID
        finally:
            sender.close()
    finally:
        c.close()
        os.close(fd)


# -- a client that does not answer DMA requests ---------------------------------------------


def stalled_client(path: str) -> socket.socket:
    """Owns the VF, maps memory without an fd, rings the TX doorbell (posted write) and
    then never reads its socket: the server's DMA_READ goes unanswered."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    ep = Endpoint(sock)
    ep.request(wire.Command.VERSION, version_payload(), timeout=5)

    def write(region: int, offset: int, data: bytes) -> None:
        ep.request(wire.Command.REGION_WRITE, region_access(region, offset, len(data)) + data,
                   timeout=5)

    ep.request(wire.Command.DMA_MAP, dma_map_payload(RING, 0x10000), timeout=5)
    write(wire.PciRegion.CONFIG, 4, b"\x06\x00")
    for off, val in ((TDBAL0, RING), (TDLEN0, 128), (TXDCTL0, T.QCTL_ENABLE)):
        write(0, off, u32(val))
    ep.send(ep.new_id(), wire.Command.REGION_WRITE, region_access(0, TDT0, 4) + u32(1),
            wire.TYPE_COMMAND | wire.FLAG_NO_REPLY)
    return sock


def test_a_silent_dma_client_is_cut_off_and_never_stalls_other_vfs(
        nic_server: NicServer) -> None:
    other = VfioUserClient(str(nic_server.dir / "vf1.sock"))
    try:
        started = time.monotonic()
        sock = stalled_client(str(nic_server.dir / "vf0.sock"))
        worst = 0.0
        reads = 0
        while time.monotonic() - started < DMA_REPLY_TIMEOUT + 0.5:
            t = time.monotonic()
            assert other.read32(wire.PciRegion.CONFIG, 0) & 0xFFFF == VENDOR_ID
            worst = max(worst, time.monotonic() - t)
            reads += 1
        # The other VF never waited on the stalled one (a NIC-wide lock held for the
        # DMA reply used to stall it 10 s per posted write).
        assert worst < 0.5, f"a register read of vf1 took {worst:.3f} s"
        # The silent client is cut off after the bound: its socket is closed.
        sock.settimeout(DMA_REPLY_TIMEOUT + 5)
        data = b"x"
        while data:  # the server's DMA_READ request, then EOF
            data = sock.recv(65536)
        assert time.monotonic() - started < DMA_REPLY_TIMEOUT + 3
        sock.close()
        wait_until(lambda: not nic_server.servers["vf0"].attached, what="vf0 detached")
        fn = nic_server.nic.vfs[0]
        assert fn.bank.get("QERR0") & T.QERR_DMA  # the VF saw a DMA error
    finally:
        other.close()


# -- DMA_LOGGING_REPORT ---------------------------------------------------------------------


def report(c: VfioUserClient, iova: int, length: int) -> bytes:
    body = LogReport.pack(iova, length, 4096)
    words = (length // 4096 + 63) // 64
    return c.feature(wire.VFIO_DEVICE_FEATURE_GET | Feature.DMA_LOGGING_REPORT, body,
                     argsz=8 + len(body) + 8 * words)


def test_logging_report_enforces_the_advertised_bitmap_limit(nic_server: NicServer) -> None:
    c = VfioUserClient(str(nic_server.dir / "vf0.sock"))
    try:
        caps = c.server_caps
        assert caps["migration"]["max_bitmap_size"] == MAX_BITMAP
        c.feature(wire.VFIO_DEVICE_FEATURE_SET | Feature.DMA_LOGGING_START,
                  LogControl.pack(4096, 0, 0))
        fn = nic_server.nic.vfs[0]
        with fn.lock:  # pages the device wrote, far apart
            assert fn.dma.dirty_log is not None
            fn.dma.dirty_log.update({0x10, 0x7FFFF0})
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.monotonic()
        with pytest.raises(Exception) as err:  # a 1 GiB bitmap: refused at once
            report(c, 0, 1 << 45)
        assert getattr(err.value, "errno", None) == errno.E2BIG
        # The largest allowed bitmap (32 GiB of 4 KiB pages) with two dirty pages.
        bitmap = report(c, 0, 8 * MAX_BITMAP * 4096)[LogReport.size:]
        assert time.monotonic() - t < 2.0
        assert len(bitmap) == MAX_BITMAP
        bits = int.from_bytes(bitmap, "little")
        assert bits == (1 << 0x10) | (1 << 0x7FFFF0)
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
        assert grown_kib < 64 * 1024, f"the reports took {grown_kib} KiB"
    finally:
        c.close()


def test_nothing_blocks_while_one_vf_waits(nic_server: NicServer) -> None:
    """Meanwhile control.sock answers too (it takes the NIC lock)."""
    from vfnic.device.nic import control_call

    sock = stalled_client(str(nic_server.dir / "vf0.sock"))
    try:
        time.sleep(0.2)  # the server is waiting for its DMA_READ reply now
        t = time.monotonic()
        info = control_call(nic_server.dir, {"op": "link-show"})
        assert time.monotonic() - t < 0.5 and info["vfs"][0]["attached"]
    finally:
        sock.close()


# -- hugetlbfs guest memory (no pwrite): mmap with a size check ------------------------------


def test_hugetlb_memory_works_and_a_shrink_is_a_dma_error(nic_server: NicServer,
                                                          two_huge_pages: None) -> None:
    from vfnic.errors import DmaError

    huge = 2 << 20
    fd = os.memfd_create("vfd-huge", os.MFD_HUGETLB)
    try:
        os.ftruncate(fd, huge)
        fn = nic_server.nic.vfs[0]
        with fn.lock:
            fn.dma.map(0x200000, huge, 3, 0, os.dup(fd))
            assert fn.dma.regions[0].view is not None  # hugetlbfs takes no pwrite
            fn.dma.write(0x200010, b"hello")
            assert fn.dma.read(0x200010, 5) == b"hello"
        os.ftruncate(fd, 0)
        with fn.lock:
            with pytest.raises(DmaError, match="beyond the end"):
                fn.dma.read(0x200010, 5)
            with pytest.raises(DmaError, match="beyond the end"):
                fn.dma.write(0x200010, b"x")
            fn.dma.unmap_all()
    finally:
        os.close(fd)


# -- a memfd sealed against shrinking (QEMU's memory-backend-memfd): mapped directly -------


def sealed_memfd(size: int, seals: int) -> int:
    import fcntl

    fd = os.memfd_create("vfd-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_a_memfd_sealed_against_shrinking_is_accessed_through_its_mapping(
        nic_server: NicServer) -> None:
    """No system call per access, and no SIGBUS either: the kernel refuses the shrink
    that would make one."""
    import fcntl

    fd = sealed_memfd(0x10000, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    fn = nic_server.nic.vfs[0]
    try:
        with fn.lock:
            fn.dma.map(0x10000, 0xF000, 3, 0x1000, os.dup(fd))  # at an offset in the file
            r = fn.dma.regions[0]
            assert r.sealed and r.view is not None
            fn.dma.write(0x10010, b"hello")
            assert os.pread(fd, 5, 0x1010) == b"hello"
            os.pwrite(fd, b"world", 0x1ffb)  # across a page boundary
            assert fn.dma.read(0x10ffb, 5) == b"world"
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # the attack the pread path guards against
        with fn.lock:
            assert fn.dma.read(0x10010, 5) == b"hello"
            fn.dma.unmap_all()
    finally:
        os.close(fd)


def test_other_seals_keep_pread_pwrite_and_their_errors(nic_server: NicServer) -> None:
    """Sealed against growing only: it may shrink, so no mapping, and a shrink is a
    DmaError. Sealed against writes: the mapping cannot be writable, pwrite fails: a
    DmaError, the server unharmed."""
    import fcntl

    from vfnic.errors import DmaError

    fn = nic_server.nic.vfs[0]
    grow = sealed_memfd(0x10000, fcntl.F_SEAL_GROW)
    frozen = sealed_memfd(0x10000, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
    try:
        with fn.lock:
            fn.dma.map(0x10000, 0x10000, 3, 0, os.dup(grow))
            fn.dma.map(0x40000, 0x10000, 3, 0, os.dup(frozen))
            assert [(r.sealed, r.view) for r in fn.dma.regions] == [(False, None)] * 2
            fn.dma.write(0x10010, b"hello")
            with pytest.raises(DmaError):
                fn.dma.write(0x40010, b"hello")
            assert fn.dma.read(0x40010, 5) == bytes(5)
        os.ftruncate(grow, 0)
        with fn.lock:
            with pytest.raises(DmaError, match="beyond the end"):
                fn.dma.read(0x10010, 5)
            fn.dma.unmap_all()
    finally:
        os.close(grow)
        os.close(frozen)


def test_a_dma_message_lets_go_of_the_nic_lock_however_deeply_it_is_held() -> None:
    """While the client answers a server-to-client DMA message the NIC lock is free
    for the other functions' threads, and held again as deeply after (public RLock
    calls only)."""
    lock = threading.RLock()

    def other_takes_it() -> bool:
        got: list[bool] = []

        def take() -> None:
            if lock.acquire(timeout=0.5):
                got.append(True)
                lock.release()

        t = threading.Thread(target=take)
        t.start()
        t.join(2.0)
        return bool(got)

    with lock, lock:
        assert not other_takes_it()
        with _Released(lock):
            assert other_takes_it()
        assert not other_takes_it()
        lock.release()
        assert not other_takes_it()  # still held once: the depth came back whole
        lock.acquire()
    assert other_takes_it()
    with _Released(lock):  # not held: nothing to let go, nothing taken after
        assert other_takes_it()
    assert other_takes_it()
