"""Sub-commands `vfnic qemu` and `vfnic vm run`."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from vfnic.errors import UsageError
from vfnic.host import runtime
from vfnic.host.vm import (
    DEFAULT_GUEST_DRIVER,
    DEFAULT_MEM,
    GUEST_DRIVERS,
    VM,
    VfioUserFunction,
    guest_net_args,
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    # '+' as the only prefix: every QEMU option ("-device", "--version") is passed on.
    p = sub.add_parser(
        "qemu",
        help="run the QEMU that vfnic uses (system QEMU >= 10.1, else the cached one)",
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="QEMU's arguments")
    p.set_defaults(handler=_qemu)

    p = sub.add_parser("vm", help="boot the test guest with vfnic functions attached")
    vsub = p.add_subparsers(dest="vm_command", required=True)
    r = vsub.add_parser(
        "run",
        help="boot the guest; with --exec run a command in it and exit with its status",
        description="Boot the guest image with vfio-user functions attached. With --exec, run "
        "CMD in the guest, print its output, power off and exit with its status; without it, "
        "keep the VM in the foreground until Ctrl-C.",
    )
    r.add_argument("--vf", action="append", default=[], metavar="SOCKET", help="a VF's socket")
    r.add_argument("--pf", metavar="SOCKET", help="the PF's socket")
    r.add_argument("--mem", type=mem_size, default=DEFAULT_MEM, help="guest RAM (512M)")
    r.add_argument("--smp", type=int, default=1, help="guest vCPUs (1)")
    r.add_argument("--exec", metavar="CMD", help="bash command to run in the guest")
    r.add_argument("--ip", metavar="ADDR/LEN",
                   help="put this IPv4 address on the first VF's interface (vfnic0) at boot")
    r.add_argument("--driver", choices=GUEST_DRIVERS, default=DEFAULT_GUEST_DRIVER,
                   help="the VF's driver in the guest: kernel (vfnic_vf.ko, default) or "
                        "python (the driver model, bridged to a TAP)")
    r.add_argument("--netns", metavar="NS", help="run QEMU in this network namespace")
    r.add_argument("--timeout", type=float, default=300.0, help="for --exec, seconds (300)")
    r.add_argument(
        "--qemu-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra QEMU argument, repeatable (write --qemu-arg=-device)",
    )
    r.set_defaults(handler=_vm_run)


def mem_size(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*[KMGT]?", text):
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (e.g. 512M, 1G)")
    return text


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C so that the VM is stopped on the way out.
    raise KeyboardInterrupt


def _qemu(args: argparse.Namespace) -> int:
    argv = runtime.qemu_argv() + list(args.args)
    rc = subprocess.call(argv, env=runtime.qemu_env())
    return rc if rc >= 0 else 128 - rc


def _vm_run(args: argparse.Namespace) -> int:
    functions: list[VfioUserFunction] = []
    if args.pf:
        functions.append(VfioUserFunction(Path(args.pf), "pf"))
    functions += [VfioUserFunction(Path(s), f"vf{i}") for i, s in enumerate(args.vf)]
    for fn in functions:
        fn.check()
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.ip:
        import ipaddress

        try:
            ipaddress.ip_interface(args.ip)
        except ValueError:
            raise UsageError(f"--ip: not an IPv4 address/prefix: {args.ip!r}") from None
        if not args.vf:
            raise UsageError("--ip needs a --vf to put the address on")
    kernel_args = guest_net_args(args.ip, args.driver)
    common: dict[str, Any] = dict(
        mem=args.mem, smp=args.smp, extra_args=args.qemu_arg, verbose=True,
        kernel_args=kernel_args, netns=args.netns,
    )
    if args.exec is not None:
        with VM(functions, command=args.exec, **common) as vm:
            return vm.wait_exec(args.timeout, out=sys.stdout)
    vm = VM(functions, keep=True, **common)
    with vm:
        print(f"console log:    {vm.console_log}")
        print(f"console socket: {vm.console_socket}  (a shell: socat -,raw,echo=0 UNIX:PATH)")
        print(f"QMP socket:     {vm.qmp_socket}")
        if vm.vmstate:
            print(f"D-Bus bus:      {vm.bus_socket}  (QEMU's dbus-vmstate: the VFs' "
                  "state migrates with the VM)")
        print(f"QEMU pid:       {vm.pid}  (Ctrl-C stops it)", flush=True)
        try:
            rc = vm.wait()
        except KeyboardInterrupt:
            print("vfnic: stopping the VM", file=sys.stderr)
            return 0
    return rc
