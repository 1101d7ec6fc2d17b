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
