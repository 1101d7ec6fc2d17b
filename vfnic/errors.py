"""One exception hierarchy for vfnic.

Each error knows the errno it becomes in a vfio-user reply and the one-line
message a person sees on the command line.
"""

from __future__ import annotations

import errno as _errno


class VfnicError(Exception):
    """Base of every vfnic error."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(VfnicError):
    """A malformed or out-of-range vfio-user message (becomes an errno reply)."""


class UnsupportedError(ProtocolError):
    """A command or feature the device does not implement."""

    errno = _errno.ENOTSUP


class NotTtyError(ProtocolError):
    """A device feature that is not implemented (the kernel answers ENOTTY)."""

    errno = _errno.ENOTTY


class DmaError(VfnicError):
    """A DMA access outside the client's mappings or refused by the client."""

    errno = _errno.EFAULT


class RemoteError(VfnicError):
    """The peer answered a request with an error reply."""

    def __init__(self, command: str, errno: int) -> None:
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"{command} failed: {name} ({errno})", errno)
        self.command = command


class ConnectionClosed(VfnicError):
    """The peer closed the socket."""

    errno = _errno.ECONNRESET


class SnapshotError(VfnicError):
    """A device state snapshot that cannot be restored (bad version, truncated, corrupt)."""


class SetupError(VfnicError):
    """The QEMU runtime or guest image is missing or unusable."""

    errno = _errno.ENOENT


class UsageError(VfnicError):
    """A bad command line."""


class AccessDenied(ProtocolError):
    """A session that does not own the function asked to change it (read-only session)."""

    errno = _errno.EPERM


class DmaTimeout(DmaError):
    """The client did not answer a DMA_READ/DMA_WRITE within the bound: it is cut off."""

    errno = _errno.ETIMEDOUT


class PolicyError(UsageError):
    """A VF setting the host refuses (duplicate MAC, out-of-range VLAN, ...)."""


class FolderError(UsageError):
    """The runtime folder is unsafe (not ours, a symlink, writable by others) or in use."""
