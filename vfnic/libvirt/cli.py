"""`vfnic libvirt xml`: a libvirt domain for the vfnic guest with vfnic functions."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from vfnic.errors import UsageError
from vfnic.host.cli import mem_size
from vfnic.host.vm import (
    DEFAULT_GUEST_DRIVER,
    DEFAULT_MEM,
    GUEST_DRIVERS,
    VfioUserFunction,
    guest_net_args,
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("libvirt", help="libvirt domains with vfnic functions (virsh)")
    lsub = p.add_subparsers(dest="libvirt_command", required=True)
    x = lsub.add_parser(
        "xml", help="print a domain XML for `virsh define`",
        description="Print the XML of a libvirt domain that boots the vfnic guest with these "
        "functions attached through -device vfio-user-pci (in <qemu:commandline>), each with "
        "a QMP monitor next to its socket (DIR/vfN.qmp) through which `vfnic serve` follows "
        "the migrations libvirt drives, and QEMU's dbus-vmstate object on the domain's own "
        "D-Bus bus (the VFs' state rides QEMU's migration stream; `vfnic libvirt hook` "
        "starts the bus before libvirt starts QEMU).")
    x.add_argument("name", help="domain name")
    x.add_argument("--vf", action="append", default=[], metavar="SOCKET", help="a VF's socket")
    x.add_argument("--pf", metavar="SOCKET", help="the PF's socket")
    x.add_argument("--mem", type=mem_size, default=DEFAULT_MEM, help="guest RAM (512M)")
    x.add_argument("--ip", metavar="ADDR/LEN",
                   help="put this address on the first VF's interface (vfnic0) at boot")
    x.add_argument("--driver", choices=GUEST_DRIVERS, default=DEFAULT_GUEST_DRIVER,
                   help="the VF's driver in the guest: kernel (vfnic_vf.ko, default) or python")
    x.add_argument("--exec", metavar="CMD", help="bash command the guest runs at boot")
    x.add_argument("--console", metavar="FILE", required=True,
                   help="file the serial console is written to")
    x.add_argument("--bus", metavar="PATH",
                   help="the domain's D-Bus bus socket (default: NAME.bus next to the first "
                   "function's socket); must be the same path on both hosts")
    x.set_defaults(handler=_xml)
    h = lsub.add_parser(
        "hook", help="print the libvirt QEMU hook that starts a domain's bus",
        description="Print a hook script for SYSCONFDIR/libvirt/hooks/qemu.d/ (libvirt >= "
        "6.5; make it executable, restart libvirtd) on every host: it starts a dbus-daemon "
        "for a domain's dbus-vmstate object before libvirt starts its QEMU (also on the "
        "destination of a migration) and stops it when the domain ends.")
    h.set_defaults(handler=_hook)


def _hook(args: argparse.Namespace) -> int:
    from vfnic.libvirt.domain import HOOK

    print(HOOK, end="")
    return 0


def _xml(args: argparse.Namespace) -> int:
    from vfnic.libvirt.domain import domain_xml, guest_exec_arg

    if not args.vf and not args.pf:
        raise UsageError("give at least one --vf or --pf socket")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.name):
        raise UsageError(f"bad domain name {args.name!r}")
    # Device id = socket name (vf1.sock -> vf1): the QMP monitor is then DIR/vf1.qmp,
    # where the NIC server that owns vf1 looks for it.
    sockets = [Path(p).absolute() for p in ([args.pf] if args.pf else []) + args.vf]
    fns = [VfioUserFunction(s, s.stem) for s in sockets]
    for fn in fns:
        fn.check()
    if len({fn.id for fn in fns}) != len(fns):
        raise UsageError(f"functions with the same socket name: "
                         f"{', '.join(fn.id for fn in fns)}")
    kargs = guest_net_args(args.ip, args.driver)
    if args.exec:
        kargs.append(guest_exec_arg(args.exec))
    bus = Path(args.bus).absolute() if args.bus else None
    if bus is not None and len(str(bus)) > 107:
        raise UsageError(f"bus path too long for a unix socket: {bus}")
    print(domain_xml(args.name, fns, mem=args.mem, kernel_args=kargs,
                     console_log=Path(args.console).absolute(), bus=bus), end="")
    return 0
