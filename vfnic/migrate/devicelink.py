"""The orchestrator's side of the vfio migration protocol.

QEMU 11.1 sends no VFIO_USER_DEVICE_FEATURE for a vfio-user device, so vfnic
plays the part of QEMU's vfio migration client itself: it drives the v2 state
machine, the MIG_DATA stream and DMA dirty logging with the protocol's own
payloads, carried over the host's management socket (DIR/control.sock): a
second vfio-user session on the VF's socket is read-only (QEMU owns the VF).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
from pathlib import Path
from typing import Any

from vfnic.errors import ConnectionClosed, RemoteError, UsageError
from vfnic.vfiouser import wire
from vfnic.vfiouser.features import Feature, LogControl, LogReport, MigState, State

GET = wire.VFIO_DEVICE_FEATURE_GET
SET = wire.VFIO_DEVICE_FEATURE_SET
PROBE = wire.VFIO_DEVICE_FEATURE_PROBE
CHUNK = 1 << 16


class HostChannel:
    """The migration calls of one VF over DIR/control.sock (one connection), with
    VfioUserClient's method names; a refused call raises RemoteError(errno)."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        path = Path(socket_path)
        m = re.fullmatch(r"vf(\d+)\.sock", path.name)
        if m is None:
            raise UsageError(f"{socket_path} is not a VF socket (DIR/vfN.sock)")
        self.vf = int(m.group(1))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path.parent / "control.sock"))
        except OSError as exc:
            self.sock.close()
            raise UsageError(f"cannot reach the vfnic server of {socket_path}: "
                             f"{exc.strerror or exc}") from exc
        self.file = self.sock.makefile("rwb")

    def _call(self, call: str, **args: Any) -> bytes:
        req = {"op": "vf-migration", "vf": self.vf, "call": call, **args}
        try:
            self.file.write(json.dumps(req).encode() + b"\n")
            self.file.flush()
            line = self.file.readline()
        except OSError as exc:
            raise ConnectionClosed(f"control.sock: {exc}") from exc
        if not line:
            raise ConnectionClosed("control.sock closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RemoteError(f"{call} ({reply.get('error')})", int(reply.get("errno") or 5))
        return base64.b64decode(reply["result"])

    def feature(self, flags: int, data: bytes = b"", argsz: int | None = None) -> bytes:
        size = 8 + len(data) if argsz is None else argsz
        return self._call("feature", flags=flags, argsz=size,
                          data=base64.b64encode(data).decode())

    def mig_data_read(self, size: int) -> bytes:
        return self._call("read", size=size)

    def mig_data_write(self, data: bytes) -> None:
        self._call("write", data=base64.b64encode(data).decode())

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            n = min(1 << 16, count - len(out))
            out += self._call("region_read", region=region, offset=offset + len(out), count=n)
        return bytes(out)

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


class DeviceLink:
    """One function's migration driven over the NIC's control.sock (HostChannel).

    Every method raises what VfioUserClient's do (vfnic.errors): RemoteError when the
    device refuses (EINVAL for an arc the kernel's FSM forbids, EIO when an arc failed
    and the device went to ERROR, ENOSPC/EBUSY for DMA logging misuse), ConnectionClosed
    when the NIC server is gone, TimeoutError when it does not answer; the constructor
    raises ConnectionClosed when the socket cannot be reached."""

    def __init__(self, socket_path: str) -> None:
        self.client = HostChannel(socket_path)

    def close(self) -> None:
        self.client.close()

    def flags(self) -> int:
        return int(struct.unpack("<Q", self.client.feature(GET | Feature.MIGRATION)[:8])[0])

    def state(self) -> State:
        data = self.client.feature(GET | Feature.MIG_DEVICE_STATE, MigState.pack(0, 0))
        return State(MigState.unpack_from(data)[0])

    def set_state(self, state: State) -> State:
        data = self.client.feature(SET | Feature.MIG_DEVICE_STATE, MigState.pack(state, 0))
        return State(MigState.unpack_from(data)[0])

    def read_all(self) -> bytes:
        """MIG_DATA_READ until a short read marks the end of the available data."""
        out = bytearray()
        while True:
            chunk = self.client.mig_data_read(CHUNK)
            out += chunk
            if len(chunk) < CHUNK:
                return bytes(out)

    def write_all(self, data: bytes) -> None:
        for pos in range(0, len(data), CHUNK):
            self.client.mig_data_write(data[pos : pos + CHUNK])

    def logging_start(self, page_size: int = 4096) -> int:
        reply = self.client.feature(SET | Feature.DMA_LOGGING_START,
                                    LogControl.pack(page_size, 0, 0))
        return int(LogControl.unpack_from(reply)[0])

    def logging_report(self, iova: int, length: int, page_size: int = 4096) -> list[int]:
        """Addresses of the pages the device wrote in [iova, iova+length)."""
        words = (length // page_size + 63) // 64
        body = LogReport.pack(iova, length, page_size)
        reply = self.client.feature(GET | Feature.DMA_LOGGING_REPORT, body,
                                    argsz=8 + len(body) + 8 * words)
        bits = int.from_bytes(reply[LogReport.size:], "little")
        out = []
        i = 0
        while bits:
            if bits & 1:
                out.append(iova + i * page_size)
            bits >>= 1
            i += 1
        return out

    def logging_stop(self) -> None:
        self.client.feature(SET | Feature.DMA_LOGGING_STOP)

    def regs(self) -> bytes:
        """BAR0 as the guest sees it."""
        return self.client.region_read(0, 0, 0x4000)

    def config(self) -> bytes:
        return self.client.region_read(wire.PciRegion.CONFIG, 0, 0x100)
