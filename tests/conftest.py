"""Shared fixtures: a running NIC in a short temporary folder (UNIX socket paths
must fit in 108 bytes)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfnic.device.nic import NicServer
from vfnic.migrate.lab import Lab, require_root


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def two_huge_pages() -> Iterator[None]:
    """Reserve two more huge pages on this host for the test, then give them back."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = int(knob.read_text())
    knob.write_text(str(before + 2))
    try:
        yield
    finally:
        knob.write_text(str(before))


@pytest.fixture
def nic(short_dir: Path) -> Iterator[NicServer]:
    server = NicServer(short_dir / "nic", num_vfs=2)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def lab(short_dir: Path) -> Iterator[Lab]:
    """Two hosts, a peer and a fabric in network namespaces (vfnic.migrate.lab)."""
    require_root()
    lab = Lab(short_dir)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
