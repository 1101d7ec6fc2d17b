"""One exception hierarchy for vfnic.

Each error knows the errno it becomes in a vfio-user reply and the one-line
message a person sees on the command line (``vfnic: error: MESSAGE``, exit 1).

    VfnicError                       .errno, .message
    ├── ReplyError                   raised while serving a request: the dispatcher
    │   │                            answers it with .errno and keeps serving
    │   ├── ProtocolError            EINVAL  a malformed or out-of-range message
    │   │   ├── UnsupportedError     ENOTSUP a command or feature not implemented
    │   │   ├── NotTtyError          ENOTTY  a device feature not implemented
    │   │   ├── AccessDenied         EPERM   a read-only (non-owner) session tried a change
    │   │   └── FramingError         (vfiouser.transport) a header that cannot be honoured
    │   ├── DmaError                 EFAULT  DMA outside the mappings, or refused by the client
    │   │   └── DmaTimeout           ETIMEDOUT  the client did not answer a DMA request in time
    │   └── SnapshotError            EINVAL  device state that cannot be restored
    ├── TransportError               the other end of a link failed or said no
    │   ├── ConnectionClosed         ECONNRESET  the peer closed the vfio-user socket
    │   ├── RemoteError              the peer answered a request with an errno reply
    │   ├── ServerUnreachable        ECONNREFUSED  no `vfnic serve` answers on DIR/control.sock
    │   ├── QmpReplyError            (host.qmp) QEMU answered a query in an unexpected shape
    │   ├── MailboxTimeout           (device.pfagent) the VF driver did not acknowledge
    │   ├── BusError                 (guestdriver.bus) the function cannot be reached
    │   └── DriverError              (guestdriver.driver) the VF does not behave
    │       └── MailboxError         the PF refused or did not answer a mailbox request
    └── OperatorError                for the person running vfnic: fix the command or setup
        ├── UsageError               a bad command line or management request
        │   ├── PolicyError          a VF setting the host refuses (duplicate MAC, bad VLAN)
        │   └── FolderError          an unsafe or busy runtime folder (DIR)
        ├── SetupError               ENOENT  the QEMU runtime or guest image is missing
        ├── VmError                  (host.vm) QEMU or the guest failed
        ├── LabError                 (migrate.lab) the namespaces could not be set up
        └── MigrationError           (migrate.control) the migration failed
            ├── MigrationCancelled   cancelled on request
            ├── SuspendOvertaken     QEMU stopped the guest before the driver's SUSPEND ack
            └── StateTooLarge        EFBIG  (migrate.vfstate) over QEMU's 1 MiB per helper

Errors defined next to the code that raises them (in parentheses) derive from
the branch shown. Code below the command line catches a branch, never a leaf
it does not own; the command line catches VfnicError.
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


# -- errors that become errno replies ------------------------------------------------


class ReplyError(VfnicError):
    """Raised while serving a request; the dispatcher replies with ``errno``."""


class ProtocolError(ReplyError):
    """A malformed or out-of-range vfio-user message (becomes an errno reply)."""


class UnsupportedError(ProtocolError):
    """A command or feature the device does not implement."""

    errno = _errno.ENOTSUP


class NotTtyError(ProtocolError):
    """A device feature that is not implemented (the kernel answers ENOTTY)."""

    errno = _errno.ENOTTY


class DmaError(ReplyError):
    """A DMA access outside the client's mappings or refused by the client."""

    errno = _errno.EFAULT


class SnapshotError(ReplyError):
    """A device state snapshot that cannot be restored (bad version, truncated, corrupt)."""


# -- transport errors ------------------------------------------------------------------


class TransportError(VfnicError):
    """The other end of a link (socket, management socket, mailbox, bus) failed or
    refused."""


class ConnectionClosed(TransportError):
    """The peer closed the socket."""

    errno = _errno.ECONNRESET


class RemoteError(TransportError):
    """The peer answered a request with an error reply (``errno``, ``command``)."""

    def __init__(self, command: str, errno: int) -> None:
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"{command} failed: {name} ({errno})", errno)
        self.command = command


class ServerUnreachable(TransportError):
    """No `vfnic serve` answers on a folder's control.sock (none started, or it died)."""

    errno = _errno.ECONNREFUSED


# -- operator errors -------------------------------------------------------------------


class OperatorError(VfnicError):
    """For the person running vfnic: a bad command, a missing setup, or a VM, lab or
    migration that failed; the command line prints the message."""


class SetupError(OperatorError):
    """The QEMU runtime or guest image is missing or unusable."""

    errno = _errno.ENOENT


class UsageError(OperatorError):
    """A bad command line or management request."""


class PolicyError(UsageError):
    """A VF setting the host refuses (duplicate MAC, out-of-range VLAN, ...)."""


class FolderError(UsageError):
    """The runtime folder is unsafe (not ours, a symlink, writable by others) or in use."""


class AccessDenied(ProtocolError):
    """A session that does not own the function asked to change it (read-only session)."""

    errno = _errno.EPERM


class DmaTimeout(DmaError):
    """The client did not answer a DMA_READ/DMA_WRITE within the bound: it is cut off."""

    errno = _errno.ETIMEDOUT
