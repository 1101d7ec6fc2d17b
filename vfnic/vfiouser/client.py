"""Our vfio-user client: for tests, the migration orchestrator and the host-side
guest driver.

Every method that sends a request raises (vfnic.errors):
  RemoteError       the server answered with an error reply (``.errno``, ``.command``)
  ConnectionClosed  the server is gone (or never answered the connect)
  TimeoutError      no reply within ``timeout`` seconds (the builtin)
  ProtocolError     a reply too short or malformed to parse
Methods below say when they raise anything else.
"""

from __future__ import annotations

import errno
import json
import socket
from dataclasses import dataclass
from typing import Any

from vfnic.errors import ConnectionClosed, ProtocolError
from vfnic.vfiouser import wire
from vfnic.vfiouser.transport import Endpoint, Message

CLIENT_CAPS: dict[str, Any] = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1 << 20,
    "max_dma_maps": 65535,
    "pgsizes": 4096,
    "migration": {"pgsize": 4096, "max_bitmap_size": 256 * 1024 * 1024},
    "write_multiple": True,
}


@dataclass
class ClientMemory:
    """Client memory the server reaches with DMA_READ/DMA_WRITE (no fd shared)."""

    address: int
    data: bytearray

    @property
    def end(self) -> int:
        return self.address + len(self.data)


class VfioUserClient:
    """One vfio-user session (the first on a socket is the primary, as QEMU's is).

    Raises ConnectionClosed if ``path`` cannot be connected to, and what version()
    raises when ``negotiate``."""

    def __init__(self, path: str, negotiate: bool = True, timeout: float = 30.0,
                 busy_poll: float = 0.0) -> None:
        self.path = path
        self.timeout = timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise ConnectionClosed(f"cannot connect to {path}: {exc.strerror or exc}") from exc
        # busy_poll: seconds of polling for a reply before sleeping (Endpoint.busy_poll)
        self.endpoint = Endpoint(sock, self._on_server_command, busy_poll=busy_poll)
        self.memory: list[ClientMemory] = []
        self.server_caps: dict[str, Any] = {}
        self.dma_requests = 0
        if negotiate:
            self.version()

    def close(self) -> None:
        self.endpoint.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw access --------------------------------------------------------------------

    def request(self, command: int, payload: bytes = b"", fds: list[int] | None = None,
                no_reply: bool = False) -> Message | None:
        """Send ``command``; its reply (None if ``no_reply``). Raises as the module says."""
        return self.endpoint.request(command, payload, fds, self.timeout, no_reply)

    def call(self, command: int, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        """Send ``command`` and return the reply's payload. Raises as the module says."""
        reply = self.request(command, payload, fds)
        assert reply is not None
        reply.close_fds()
        return reply.payload

    def poll(self, timeout: float = 0.0) -> bool:
        """Serve server requests (DMA_READ/WRITE) that arrived while idle; a bad one gets
        an errno reply. Raises ConnectionClosed."""
        return self.endpoint.poll(timeout)

    # -- server -> client: DMA to our emulated memory ----------------------------------

    def _find(self, address: int, count: int) -> ClientMemory:
        for m in self.memory:
            if m.address <= address and address + count <= m.end:
                return m
        raise ProtocolError(f"DMA {address:#x}+{count} outside client memory", errno.EFAULT)

    def _on_server_command(self, msg: Message) -> None:
        msg.close_fds()
        try:
            if msg.command not in (wire.Command.DMA_READ, wire.Command.DMA_WRITE):
                raise ProtocolError(f"unexpected {wire.command_name(msg.command)}", errno.ENOTSUP)
            req = wire.parse(wire.DmaAccess, msg.payload, wire.DMA_ACCESS_SIZE, "DMA access")
            mem = self._find(req.address, req.count)
            off = req.address - mem.address
            self.dma_requests += 1
            if msg.command == wire.Command.DMA_READ:
                data = bytes(mem.data[off : off + req.count])
                self.endpoint.reply(msg, msg.payload[:16] + data)
            else:
                data = msg.payload[16:]
                if len(data) != req.count:
                    raise ProtocolError("DMA_WRITE count does not match its data")
                mem.data[off : off + req.count] = data
                self.endpoint.reply(
                    msg, wire.build(wire.DmaAccess, address=req.address, count=req.count)
                )
        except ProtocolError as exc:
            if not msg.no_reply:
                self.endpoint.reply_error(msg, exc.errno)

    # -- commands ----------------------------------------------------------------------

    def version(self, major: int = 0, minor: int = 0,
                caps: dict[str, Any] | None = None) -> dict[str, Any]:
        """VFIO_USER_VERSION: the server's capabilities. Raises ProtocolError for a
        version other than 0.0 in the reply."""
        body = json.dumps({"capabilities": CLIENT_CAPS if caps is None else caps}).encode()
        reply = self.call(
            wire.Command.VERSION, wire.build(wire.Version, major=major, minor=minor) + body + b"\0"
        )
        ver = wire.parse(wire.Version, reply, 4, "VERSION reply")
        if ver.major != 0 or ver.minor != 0:
            raise ProtocolError(f"server replied version {ver.major}.{ver.minor}")
        doc = json.loads(reply[4:].rstrip(b"\0").decode()) if len(reply) > 4 else {}
        self.server_caps = doc.get("capabilities", {})
        return self.server_caps

    def dma_map(self, address: int, size: int, flags: int = 3, fd: int | None = None,
                offset: int = 0) -> None:
        """VFIO_USER_DMA_MAP (sends ``fd`` if given; the caller keeps its copy)."""
        payload = wire.build(wire.DmaMap, argsz=32, flags=flags, offset=offset, address=address,
                             size=size)
        self.call(wire.Command.DMA_MAP, payload, [fd] if fd is not None else None)

    def add_memory(self, address: int, size: int) -> ClientMemory:
        """Map client memory without an fd: the server must use DMA_READ/WRITE."""
        mem = ClientMemory(address, bytearray(size))
        self.memory.append(mem)
        self.dma_map(address, size)
        return mem

    def dma_unmap(self, address: int, size: int, flags: int = 0) -> bytes:
        payload = wire.build(wire.DmaUnmap, argsz=24, flags=flags, address=address, size=size)
        return self.call(wire.Command.DMA_UNMAP, payload)

    def device_info(self) -> Any:
        payload = wire.build(wire.DeviceInfo, argsz=16, flags=0, num_regions=0, num_irqs=0)
        return wire.parse(wire.DeviceInfo, self.call(wire.Command.DEVICE_GET_INFO, payload), 16,
                          "DEVICE_GET_INFO reply")

    def region_info(self, index: int) -> Any:
        payload = wire.build(wire.RegionInfo, argsz=32, flags=0, index=index, cap_offset=0,
                             size=0, offset=0)
        reply = self.call(wire.Command.DEVICE_GET_REGION_INFO, payload)
        return wire.parse(wire.RegionInfo, reply, 32, "DEVICE_GET_REGION_INFO reply")

    def irq_info(self, index: int) -> Any:
        payload = wire.build(wire.IrqInfo, argsz=16, flags=0, index=index, count=0)
        reply = self.call(wire.Command.DEVICE_GET_IRQ_INFO, payload)
        return wire.parse(wire.IrqInfo, reply, 16, "DEVICE_GET_IRQ_INFO reply")

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: bytes = b"",
                 fds: list[int] | None = None) -> None:
        payload = wire.build(wire.IrqSet, argsz=20 + len(data), flags=flags, index=index,
                             start=start, count=count) + data
        self.call(wire.Command.DEVICE_SET_IRQS, payload, fds)

    def region_read(self, region: int, offset: int, count: int) -> bytes:
        payload = wire.REGION_ACCESS.pack(offset, region, count)
        reply = self.call(wire.Command.REGION_READ, payload)
        return reply[16:]

    def region_write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        payload = wire.REGION_ACCESS.pack(offset, region, len(data))
        if posted:
            self.request(wire.Command.REGION_WRITE, payload + data, no_reply=True)
        else:
            self.call(wire.Command.REGION_WRITE, payload + data)

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.region_read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int, posted: bool = False) -> None:
        self.region_write(region, offset, value.to_bytes(4, "little"), posted)

    def write_multi(self, writes: list[tuple[int, int, bytes]]) -> int:
        body = b"".join(
            wire.build(wire.WriteMultiEntry, offset=off, region=reg, count=len(data),
                       data=data.ljust(8, b"\0"))
            for reg, off, data in writes
        )
        reply = self.call(
            wire.Command.REGION_WRITE_MULTI, wire.build(wire.WriteMultiHeader, wr_cnt=len(writes))
            + body
        )
        return int(wire.WriteMultiHeader.parse(reply[:8]).wr_cnt)

    def reset(self) -> None:
        """VFIO_USER_DEVICE_RESET (RemoteError EPERM from a secondary session)."""
        self.call(wire.Command.DEVICE_RESET)

    def feature(self, flags: int, data: bytes = b"", argsz: int | None = None) -> bytes:
        """VFIO_USER_DEVICE_FEATURE: the reply's data after struct vfio_device_feature."""
        size = 8 + len(data) if argsz is None else argsz
        reply = self.call(
            wire.Command.DEVICE_FEATURE, wire.build(wire.DeviceFeature, argsz=size, flags=flags)
            + data
        )
        return reply[8:]

    def mig_data_read(self, size: int) -> bytes:
        """VFIO_USER_MIG_DATA_READ: up to ``size`` bytes (fewer at the end of the data)."""
        reply = self.call(wire.Command.MIG_DATA_READ, wire.build(wire.MigData, argsz=8 + size,
                                                                 size=size))
        return reply[8:]

    def mig_data_write(self, data: bytes) -> None:
        """VFIO_USER_MIG_DATA_WRITE (RemoteError unless the device is RESUMING)."""
        self.call(wire.Command.MIG_DATA_WRITE,
                  wire.build(wire.MigData, argsz=8 + len(data), size=len(data)) + data)

    # -- config-space helpers ------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.region_read(wire.PciRegion.CONFIG, offset, size), "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.region_write(wire.PciRegion.CONFIG, offset, value.to_bytes(size, "little"))
