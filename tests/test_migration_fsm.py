"""The vfio migration v2 state machine, arc by arc, through our client.

The expected behaviour is derived here independently of the device's table:
the direct arcs of linux/vfio.h (with P2P and PRE_COPY supported), the shortest
path that does not enter the saving group midway (a path that starts saving may
stay in it, as PRE_COPY -> PRE_COPY_P2P -> STOP_COPY does), and the one arc the
spec forbids outright (STOP_COPY -> PRE_COPY[_P2P])."""

from __future__ import annotations

import errno
import itertools
import struct
from collections import deque

import pytest
from devicelink import DeviceLink

from vfnic.device.nic import NicServer
from vfnic.errors import RemoteError, VfnicError
from vfnic.savevm.migration import Device
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient
from vfnic.vfiouser.features import Feature, State

S = State
DIRECT = {
    (S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.STOP), (S.STOP, S.RUNNING_P2P),
    (S.RUNNING_P2P, S.RUNNING), (S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP),
    (S.STOP, S.RESUMING), (S.RESUMING, S.STOP), (S.RUNNING, S.PRE_COPY),
    (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY),
    (S.RUNNING_P2P, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.RUNNING_P2P),
    (S.PRE_COPY_P2P, S.STOP_COPY),
}
SAVING = {S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY}
REACHABLE = [s for s in State if s != S.ERROR]


def expected_path(cur: State, new: State) -> list[State] | None:
    """Shortest path of direct arcs with no saving state inside; None if refused."""
    if new == S.ERROR or cur == S.ERROR:
        return None
    if cur == S.STOP_COPY and new in (S.PRE_COPY, S.PRE_COPY_P2P):
        return None
    if cur == new:
        return []
    queue: deque[list[State]] = deque([[cur]])
    seen = {cur}
    while queue:
        path = queue.popleft()
        for a, b in DIRECT:
            if a != path[-1] or b in seen:
                continue
            if b == new:
                return path[1:] + [b]
            if b in SAVING and not (new in SAVING and all(x in SAVING for x in path)):
                continue  # a saving state inside a path only on the way within the group
            seen.add(b)
            queue.append(path + [b])
    return None


def test_expected_paths_are_unambiguous() -> None:
    # Sanity of the derivation: every legal request has exactly one shortest path.
    for cur, new in itertools.product(REACHABLE, REACHABLE):
        p = expected_path(cur, new)
        if p is not None:
            assert len(p) <= 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="vfsm-", dir="/tmp"))
    srv = NicServer(path / "nic", 1)
    srv.start()
    yield srv
    srv.stop()


def primary_client(server: NicServer) -> VfioUserClient:
    """Connect once the previous primary session is gone (else we would be secondary)."""
    import time

    deadline = time.monotonic() + 5
    while server.servers["vf0"].attached and time.monotonic() < deadline:
        time.sleep(0.01)
    return VfioUserClient(str(server.dir / "vf0.sock"))


def drive(link: DeviceLink, target: State) -> None:
    path = expected_path(S.RUNNING, target)
    assert path is not None
    for step in path:
        link.set_state(step)


@pytest.mark.parametrize("cur", REACHABLE, ids=lambda s: s.name)
@pytest.mark.parametrize("new", list(State), ids=lambda s: s.name)
def test_every_arc_matches_the_kernel(server: NicServer, cur: State, new: State) -> None:
    primary = primary_client(server)
    link = DeviceLink(primary)  # the owner drives it: a second session is read-only
    fn = server.nic.vfs[0]
    try:
        primary.reset()
        if cur == S.RESUMING:
            drive(link, S.STOP)
        drive(link, cur)
        assert link.state() == cur
        trail: list[State] = []
        original = fn.migration._arc

        def spy(a: State, b: State) -> None:
            trail.append(b)
            original(a, b)

        fn.migration._arc = spy  # type: ignore[method-assign]
        want = expected_path(cur, new)
        try:
            if want is None:
                with pytest.raises(RemoteError) as err:
                    link.set_state(new)
                assert err.value.errno == errno.EINVAL
                assert link.state() == cur and trail == []  # refused: nothing moved
            else:
                if cur == S.RESUMING and new != S.RESUMING:
                    # leaving RESUMING checks the data written; give it a valid stream
                    link.client.mig_data_write(valid_stream(server))
                assert link.set_state(new) == new
                assert trail == want
        finally:
            fn.migration._arc = original  # type: ignore[method-assign]
        running = new in (S.RUNNING, S.RUNNING_P2P, S.PRE_COPY, S.PRE_COPY_P2P)
        if want is not None:
            assert fn.running == running
    finally:
        link.close()
        primary.reset()
        primary.close()


_STREAM: dict[str, bytes] = {}


def valid_stream(server: NicServer) -> bytes:
    from vfnic.device import snapshot
    from vfnic.savevm import stream

    if "s" not in _STREAM:
        image = snapshot.save(server.nic.vfs[0])
        _STREAM["s"] = stream.full_record(image) + stream.end_record(image)
    return _STREAM["s"]


class FailingDevice:
    """The function as the state machine sees it (savevm.migration.Device), with
    one call made to fail: failures are injected through the protocol."""

    def __init__(self, real: Device, fail: str) -> None:
        self.real = real
        self.fail = fail
        self.failed = False

    def _maybe_fail(self, call: str) -> None:
        if call == self.fail and not self.failed:
            self.failed = True
            raise VfnicError(f"injected {call} failure")

    def save_state(self) -> bytes:
        self._maybe_fail("save_state")
        return self.real.save_state()

    def load_state(self, image: bytes, pages: list[tuple[int, bytes]]) -> None:
        self._maybe_fail("load_state")
        self.real.load_state(image, pages)

    def set_running(self, running: bool) -> None:
        self._maybe_fail(f"set_running({running})")
        self.real.set_running(running)

    def dma_extents(self) -> list[tuple[int, bytes]]:
        self._maybe_fail("dma_extents")
        return self.real.dma_extents()


@pytest.mark.parametrize(("fail", "target"), [
    ("set_running(False)", S.STOP), ("save_state", S.STOP_COPY), ("save_state", S.PRE_COPY),
    ("dma_extents", S.STOP_COPY),
])
def test_error_only_after_a_failed_arc_and_reset_recovers(server: NicServer, fail: str,
                                                          target: State) -> None:
    primary = primary_client(server)
    link = DeviceLink(primary)
    fn = server.nic.vfs[0]
    real = fn.migration.device
    try:
        primary.reset()
        fn.migration.device = failing = FailingDevice(real, fail)
        with pytest.raises(RemoteError) as err:
            link.set_state(target)
        assert failing.failed
        assert err.value.errno == errno.EIO
        assert link.state() == S.ERROR
        assert not fn.running  # ERROR: stopped
        for target in REACHABLE:
            with pytest.raises(RemoteError):
                link.set_state(target)
        assert link.state() == S.ERROR
        readonly = VfioUserClient(str(server.dir / "vf0.sock"))  # not the owner
        try:
            with pytest.raises(RemoteError) as eperm:  # only the owner (QEMU) may reset
                readonly.reset()
            assert eperm.value.errno == errno.EPERM
        finally:
            readonly.close()
        primary.reset()  # VFIO_USER_DEVICE_RESET: back to RUNNING
        assert link.state() == S.RUNNING
        assert fn.running
    finally:
        fn.migration.device = real
        link.close()
        primary.close()


def test_migration_feature_reports_stop_copy_p2p_and_pre_copy(server: NicServer) -> None:
    link = DeviceLink(str(server.dir / "vf0.sock"))
    try:
        assert link.flags() == 0b111
        probe = link.client.feature(wire.VFIO_DEVICE_FEATURE_PROBE | wire.VFIO_DEVICE_FEATURE_SET
                                    | Feature.MIG_DEVICE_STATE)
        assert probe == b""
        with pytest.raises(RemoteError) as err:  # MIGRATION has no SET
            link.client.feature(wire.VFIO_DEVICE_FEATURE_SET | Feature.MIGRATION)
        assert err.value.errno == errno.EINVAL
        with pytest.raises(RemoteError) as err:  # unknown state value
            link.client.feature(wire.VFIO_DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE,
                                struct.pack("<II", 99, 0))
        assert err.value.errno == errno.EINVAL
    finally:
        link.close()


def test_mig_data_streams_with_a_short_read_at_the_end(server: NicServer) -> None:
    primary = primary_client(server)
    link = DeviceLink(primary)
    try:
        primary.reset()
        with pytest.raises(RemoteError):  # not in a saving state
            link.client.mig_data_read(16)
        link.set_state(S.PRE_COPY)
        chunks = []
        while True:
            c = link.client.mig_data_read(1000)
            chunks.append(c)
            if len(c) < 1000:
                break
        assert all(len(c) == 1000 for c in chunks[:-1]) and len(chunks) > 5
        assert link.client.mig_data_read(1000) == b""  # drained
        primary.write32(0, 0x28, 0x12345678)  # changes after pre-copy ...
        link.set_state(S.STOP_COPY)
        final = link.read_all()
        assert 0 < len(final) < len(b"".join(chunks))  # ... only the delta is sent
        with pytest.raises(RemoteError):  # MIG_DATA_WRITE only in RESUMING
            link.client.mig_data_write(b"x")
    finally:
        link.close()
        primary.reset()
        primary.close()
