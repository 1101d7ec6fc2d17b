"""The runtime folder and its sockets (issue 10, item 4): DIR owner-only or refused,
sockets owner-only (or a group's), one `vfnic serve` per DIR, accept loops that
survive EMFILE, control.sock bounds."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfnic.device import nic as nicmod
from vfnic.device.nic import MAX_CONTROL_CONNS, MAX_CONTROL_LINE, NicServer, control_call
from vfnic.errors import FolderError
from vfnic.vfiouser.client import VfioUserClient

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vff-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_dir_and_sockets_are_owner_only_whatever_the_umask(base: Path) -> None:
    old = os.umask(0)
    try:
        srv = NicServer(base / "nic", num_vfs=1)
    finally:
        os.umask(old)
    try:
        assert mode(base / "nic") == 0o700
        for name in ("pf.sock", "vf0.sock", "control.sock"):
            assert mode(base / "nic" / name) == 0o600, name
    finally:
        srv.stop()


def test_group_option_opens_the_sockets_to_that_group(base: Path) -> None:
    srv = NicServer(base / "nic", num_vfs=1, group="nogroup")
    gid = 65534
    try:
        st = os.lstat(base / "nic")
        assert st.st_gid == gid and mode(base / "nic") & 0o070 == 0o010
        for name in ("vf0.sock", "control.sock"):
            s = os.lstat(base / "nic" / name)
            assert stat.S_IMODE(s.st_mode) == 0o660 and s.st_gid == gid
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["other-owner", "symlink", "world-writable", "group-writable",
                                  "a-file"])
def test_an_unsafe_dir_is_refused(base: Path, kind: str) -> None:
    target = base / "nic"
    if kind == "symlink":
        (base / "real").mkdir(mode=0o700)
        target.symlink_to(base / "real")
    elif kind == "a-file":
        target.write_text("")
    else:
        target.mkdir(mode=0o700)
        if kind == "other-owner":
            os.chown(target, NOBODY, NOBODY)
        elif kind == "world-writable":
            os.chmod(target, 0o777)
        else:
            os.chmod(target, 0o770)
    with pytest.raises(FolderError):
        NicServer(target, num_vfs=1)
    assert not (base / "real" / "vf0.sock").exists()  # nothing created through a symlink


def test_the_cli_refuses_an_unsafe_dir_in_one_line(base: Path) -> None:
    (base / "nic").mkdir(mode=0o700)
    os.chown(base / "nic", NOBODY, NOBODY)
    out = subprocess.run([sys.executable, "-m", "vfnic.cli", "serve", "--dir", str(base / "nic")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "not by the serving user" in out.stderr


def test_a_second_serve_on_the_same_dir_fails_and_the_first_keeps_serving(base: Path) -> None:
    first = NicServer(base / "nic", num_vfs=1)
    first.start()
    try:
        with pytest.raises(FolderError, match="already served"):
            NicServer(base / "nic", num_vfs=1)
        out = subprocess.run([sys.executable, "-m", "vfnic.cli", "serve", "--dir",
                              str(base / "nic")], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode != 0 and "already served by another vfnic serve" in out.stderr
        assert out.stderr.strip().count("\n") == 0
        c = VfioUserClient(str(base / "nic" / "vf0.sock"))  # the first one's sockets
        c.close()
        assert control_call(base / "nic", {"op": "link-show"})["vfs"][0]["vf"] == 0
    finally:
        first.stop()
    again = NicServer(base / "nic", num_vfs=1)  # the lock went with the first server
    again.stop()


# -- accept loops -----------------------------------------------------------------------------


def test_accept_loops_survive_running_out_of_file_descriptors(base: Path) -> None:
    srv = NicServer(base / "nic", num_vfs=1)
    srv.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(12)]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            for i, s in enumerate(socks):  # connect() needs no new fd; accept() does
                s.connect(str(base / "nic" / ("control.sock" if i % 2 else "vf0.sock")))
            time.sleep(0.5)  # both accept loops hit EMFILE meanwhile
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for s in socks:
            s.close()
        # Both loops serve again.
        deadline = time.monotonic() + 10
        while True:
            try:
                info = control_call(base / "nic", {"op": "link-show"}, timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert info["vfs"][0]["vf"] == 0
        deadline = time.monotonic() + 10
        while srv.servers["vf0"].attached and time.monotonic() < deadline:
            time.sleep(0.05)
        c = VfioUserClient(str(base / "nic" / "vf0.sock"), timeout=5)
        try:
            c.reset()  # the owner: every earlier connection is gone
        finally:
            c.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        srv.stop()


# -- control.sock bounds ----------------------------------------------------------------------


@pytest.fixture
def served(base: Path) -> Iterator[NicServer]:
    srv = NicServer(base / "nic", num_vfs=1)
    srv.start()
    yield srv
    srv.stop()


def control_conn(srv: NicServer) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(srv.control_path)
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_control_refuses_an_overlong_line(served: NicServer) -> None:
    s = control_conn(served)
    try:
        s.sendall(b"x" * (MAX_CONTROL_LINE + 10))
        reply = json.loads(read_line(s))
        assert not reply["ok"] and "too long" in reply["error"]
        assert s.recv(16) == b""  # and the connection is closed
    finally:
        s.close()
    assert control_call(served.dir, {"op": "link-show"})["vfs"]


def test_control_bounds_its_connections(served: NicServer) -> None:
    held = [control_conn(served) for _ in range(MAX_CONTROL_CONNS)]
    try:
        time.sleep(0.2)
        extra = control_conn(served)
        reply = json.loads(read_line(extra))
        assert not reply["ok"] and "too many" in reply["error"]
        extra.close()
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            assert control_call(served.dir, {"op": "link-show"})["vfs"]
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_control_closes_idle_connections(served: NicServer, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setattr(nicmod, "CONTROL_IDLE", 0.3)
    s = control_conn(served)
    try:
        t = time.monotonic()
        assert s.recv(16) == b""
        assert time.monotonic() - t < 5
    finally:
        s.close()


def test_control_survives_bad_requests(served: NicServer) -> None:
    s = control_conn(served)
    try:
        for bad in (b"[1]\n", b"{\"op\": \"vf-set\", \"vf\": \"x\"}\n", b"\xff\xfe\n",
                    b"{\"op\": \"vf-migration\", \"vf\": 0, \"call\": \"read\"}\n"):
            s.sendall(bad)
            assert json.loads(read_line(s))["ok"] is False
    finally:
        s.close()
