"""A helper shared by the tests of a VF's settings (test_vf_policy, test_egress): a
NicServer whose uplink is a fresh TAP."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from vfnic.device.nic import NicServer

TAPS = itertools.count()


@contextlib.contextmanager
def tap_nic_server(prefix: str, **kwargs: Any) -> Iterator[NicServer]:
    """A started NicServer in a short /tmp folder with a TAP uplink named after
    ``prefix`` (a new name each time: a TAP closed under a reader lingers); stopped
    and removed after."""
    folder = tempfile.mkdtemp(prefix=f"{prefix}-", dir="/tmp")
    tap = f"{prefix[:4]}{os.getpid() % 100000}x{next(TAPS)}"
    server = NicServer(folder, uplink=tap, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)

