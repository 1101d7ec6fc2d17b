"""A libvirt domain for the vfnic guest, with vfnic functions over vfio-user.

libvirt has no element for a vfio-user device, so each function goes in
``<qemu:commandline>`` as the same ``-device`` JSON vfnic.host.vm uses, plus a
QMP monitor of its own (``<fn>.qmp``) through which the NIC side can follow the
VM (migrations). What libvirt needs to run QEMU 11.1 this way:

- ``<features><acpi/>``: without it libvirt (9.0) passes ``-no-acpi``, which QEMU
  11.1 no longer accepts;
- guest RAM a shared memfd, so that the vfio-user DMA_MAP messages carry fds;
- the emulator: :func:`emulator_path` (sid's QEMU, for the libvirtd of the sid root:
  vfnic.libvirt.lab);
- the disk read-only (root mounted ``ro``): many guests share the image, and
  libvirt then does not call a migration of it unsafe.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from vfnic.errors import UsageError
from vfnic.host import image, runtime
from vfnic.host.vm import _KERNEL_ARGS, VfioUserFunction, exec_kernel_arg
from vfnic.host.vmbus import vmstate_object

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)
# The guest's kernel arguments as vfnic.host.vm has them, the root read-only.
KERNEL_ARGS = tuple("ro" if a == "rw" else a for a in _KERNEL_ARGS)
_UNITS = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def emulator_path() -> Path:
    """The QEMU libvirt runs as ``<emulator>``: the system's when vfnic uses it, else
    Debian sid's own, as the libvirtd that runs inside the sid root sees it."""
    if runtime.qemu_kind() == "system":
        return Path(runtime.qemu_argv()[0])
    return Path("/usr/bin") / runtime.QEMU_NAME


def _mib(mem: str) -> int:
    """QEMU's -m syntax ('512M', '1G', '512' in MiB) in MiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", mem.upper())
    if not m:
        raise UsageError(f"bad memory size: {mem!r}")
    mib = int(m.group(1)) * _UNITS[m.group(2)]
    if mib < 1 or mib != int(mib):
        raise UsageError(f"memory size not a whole number of MiB: {mem!r}")
    return int(mib)


def guest_exec_arg(command: str) -> str:
    """The kernel argument that runs ``command`` in the guest at boot (a domain has no
    fw_cfg file for longer ones)."""
    arg = exec_kernel_arg(command)
    if arg is None:
        raise UsageError("the guest command is too long for the kernel command line")
    return arg


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def qmp_socket(function: VfioUserFunction, qmp_dir: Path | None = None) -> Path:
    """Where the domain's QEMU serves the extra QMP monitor for ``function``."""
    return (qmp_dir or function.socket.parent) / f"{function.id}.qmp"


def domain_xml(
    name: str,
    functions: Sequence[VfioUserFunction],
    *,
    mem: str = "512M",
    vcpus: int = 1,
    kernel_args: Sequence[str] = (),
    console_log: Path,
    qmp_dir: Path | None = None,
    bridges: Sequence[tuple[str, str]] = (),
    bus: Path | None = None,
) -> str:
    """The domain XML of a vfnic guest with ``functions`` attached over vfio-user.

    Boots the vfnic guest image (kernel, initrd, read-only root) under TCG on a
    q35 machine; ``kernel_args`` are appended to the guest's command line (e.g.
    ``vfnic.ip=ADDR/LEN`` starts the guest driver at boot). The serial console is
    written to ``console_log``. Each function gets its QMP monitor at
    ``qmp_dir/<id>.qmp`` (default: next to the function's socket). ``bridges`` adds
    a virtio-net NIC (libvirt's TAP) per (host bridge, MAC). With functions, QEMU
    gets a dbus-vmstate object on the VM's own bus ``bus`` (default: ``<name>.bus``
    next to the first function's socket), so a migration carries the VFs' state; the
    bus must exist before libvirt starts QEMU, on both hosts (:data:`HOOK` starts
    it). Every path is used as given, so the same XML serves two hosts that have the
    same paths.
    """
    dom = ET.Element("domain", type="qemu")
    _sub(dom, "name", name)
    _sub(dom, "memory", str(_mib(mem)), unit="MiB")
    backing = _sub(dom, "memoryBacking")
    _sub(backing, "source", type="memfd")
    _sub(backing, "access", mode="shared")
    _sub(dom, "vcpu", str(vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
    _sub(os_el, "kernel", str(image.kernel()))
    _sub(os_el, "initrd", str(image.initrd()))
    _sub(os_el, "cmdline", " ".join([*KERNEL_ARGS, *kernel_args]))
    _sub(_sub(dom, "features"), "acpi")
    # -no-reboot, as vfnic.host.vm: a guest that powers off or panics stops.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")

    devices = _sub(dom, "devices")
    _sub(devices, "emulator", str(emulator_path()))
    disk = _sub(devices, "disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw")
    _sub(disk, "source", file=str(image.ensure_image(verbose=False)))
    _sub(disk, "target", dev="vda", bus="virtio")
    _sub(disk, "readonly")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(console_log))
    for bridge, mac in bridges:
        nic = _sub(devices, "interface", type="bridge")
        _sub(nic, "source", bridge=bridge)
        _sub(nic, "mac", address=mac)
        _sub(nic, "model", type="virtio")
        _sub(nic, "rom", enabled="no")
    _sub(devices, "memballoon", model="none")

    if functions:
        cmdline = _sub(dom, f"{{{QEMU_NS}}}commandline")
        bus = bus or functions[0].socket.parent / f"{name}.bus"
        for arg in ("-object", vmstate_object(bus)):
            _sub(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
        for fn in functions:
            qmp = f"unix:{qmp_socket(fn, qmp_dir)},server=on,wait=off"
            for arg in ("-device", fn.device_arg(), "-qmp", qmp):
                _sub(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


# A libvirt QEMU hook (SYSCONFDIR/libvirt/hooks/qemu.d/vfnic, libvirt >= 6.5): starts
# the domain's D-Bus bus for its dbus-vmstate object before libvirt starts QEMU
# ("prepare begin": a plain start and the destination of a migration alike), stops it
# once the domain is gone ("release end"). libvirt passes the domain XML on stdin.
# Domains without a dbus-vmstate object in <qemu:commandline> are left alone.
HOOK = r"""#!/bin/sh
# vfnic: one dbus-daemon per domain for QEMU's dbus-vmstate object.
[ "$2" = prepare ] && [ "$3" = begin ] || { [ "$2" = release ] && [ "$3" = end ]; } || exit 0
bus=$(grep -o "dbus-vmstate,[^\"'<>]*" | sed -n 's/.*addr=unix:path=\([^,]*\).*/\1/p' | head -n 1)
[ -n "$bus" ] || exit 0
if [ -f "$bus.pid" ]; then
    kill "$(cat "$bus.pid")" 2>/dev/null
    rm -f "$bus.pid" "$bus"
fi
[ "$2" = prepare ] || exit 0
dbus-daemon --session --fork --nopidfile --print-pid=3 --address="unix:path=$bus" \
    3>"$bus.pid" </dev/null >/dev/null 2>&1 || { echo "vfnic: no bus at $bus" >&2; exit 1; }
i=0
while [ ! -S "$bus" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
[ -S "$bus" ]
"""
