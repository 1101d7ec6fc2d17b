"""A test client for the vfio migration protocol over vfio-user: DEVICE_FEATURE
(v2 state machine, DMA dirty logging) and MIG_DATA on a secondary session, the way
a vfio migration client would drive them (QEMU 11.1 sends none of this for a
vfio-user device; vfnic's own migration goes through QEMU's dbus-vmstate)."""

from __future__ import annotations

import struct

from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient
from vfnic.vfiouser.features import Feature, LogControl, LogReport, MigState, State

GET = wire.VFIO_DEVICE_FEATURE_GET
SET = wire.VFIO_DEVICE_FEATURE_SET
PROBE = wire.VFIO_DEVICE_FEATURE_PROBE
CHUNK = 1 << 16


class DeviceLink:
    """Drives the VF's migration through ``session``: a VF socket's path (a session of
    its own, the owner only if nobody else is attached) or the owner's client (a
    second session on a VF socket is read-only: it may not change device state)."""

    def __init__(self, session: str | VfioUserClient) -> None:
        self.owned = isinstance(session, str)
        self.client = VfioUserClient(session) if isinstance(session, str) else session

    def close(self) -> None:
        if self.owned:
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
        """BAR0 as the guest sees it (REGION_READ through the secondary session)."""
        return self.client.region_read(0, 0, 0x4000)

    def config(self) -> bytes:
        return self.client.region_read(wire.PciRegion.CONFIG, 0, 0x100)
