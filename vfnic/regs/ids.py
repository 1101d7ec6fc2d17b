"""The NIC's PCI identity, declared once: the device presents it, the guest driver
model and the orchestrator look for it (standard library only)."""

from __future__ import annotations

VENDOR_ID = 0x1234  # QEMU's experimental vendor ID: no guest driver binds to it
PF_DEVICE_ID = 0x5FE0
VF_DEVICE_ID = 0x5FE1
CLASS_ETHERNET = 0x020000
SUBSYS_VENDOR = 0x1AF4
SUBSYS_ID = 0x0100
