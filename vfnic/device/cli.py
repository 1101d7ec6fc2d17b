"""`vfnic serve`, `vfnic link`, `vfnic regs`: run a NIC and look at it."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from vfnic.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a NIC: DIR/pf.sock, DIR/vfN.sock, DIR/control.sock")
    p.add_argument("--dir", required=True, help="runtime folder for the sockets")
    p.add_argument("--vfs", type=int, default=4, help="number of VFs (default 4, at most 8)")
    p.add_argument("--uplink", metavar="TAP", help="host TAP device for the PF's uplink port")
    p.add_argument("--nic-id", type=int, default=0, help="number in the default MACs (0-255)")
    p.add_argument("--busy-poll", type=int, default=0, metavar="USEC",
                   help="keep polling a client's socket this long after each message "
                   "before sleeping (lower latency for bursts, costs a CPU; default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="log protocol errors")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("link", help="show or set the PF's VFs, like `ip link`")
    lsub = p.add_subparsers(dest="link_command", required=True)
    s = lsub.add_parser("show", help="list the PF and its VFs")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=cmd_link_show)
    s = lsub.add_parser(
        "set", help="DIR vf N state auto|enable|disable|migrate|cancelmigration|suspend|resume"
        " | DIR vf N mac MAC | DIR vf N migration transparent|cooperative")
    s.add_argument("dir")
    s.add_argument("words", nargs="+", help="vf N state STATE")
    s.set_defaults(handler=cmd_link_set)

    p = sub.add_parser("regs", help="dump a function's registers, like `ethtool -d`")
    p.add_argument("dir")
    p.add_argument("function", help="pf, vf0, vf1, ...")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_regs)

    p = sub.add_parser("lspci", help="a function's config space decoded by `lspci -vvv`, "
                       "as the host sees it (the PF's SR-IOV capability included)")
    p.add_argument("dir")
    p.add_argument("function", help="pf, vf0, vf1, ...")
    p.add_argument("-x", "--dump", action="store_true",
                   help="print the `lspci -xxxx` hex dump instead (for `lspci -F`)")
    p.set_defaults(handler=cmd_lspci)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from vfnic.device.nic import NicServer

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="vfnic serve: %(message)s",
    )
    logging.getLogger("vfnic.vmstate").setLevel(logging.INFO)  # migrations, whoever drives them
    if not 0 <= args.busy_poll <= 1_000_000:
        raise UsageError("--busy-poll must be between 0 and 1000000 microseconds")
    try:
        server = NicServer(args.dir, args.vfs, args.uplink, args.nic_id, args.busy_poll)
    except OSError as exc:
        raise UsageError(f"cannot serve in {args.dir}: {exc.strerror or exc}") from exc
    # The migration layer sits above the NIC: wired in here, not by the NIC server.
    from vfnic.migrate.vmstate import attach

    attach(server)
    done = threading.Event()

    def stop(_sig: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.start()
    names = ", ".join(f"{n}.sock" for n in server.servers)
    print(f"vfnic: serving PF and {args.vfs} VFs in {args.dir} ({names}, control.sock)",
          flush=True)
    while not done.wait(0.5):
        pass
    server.stop()
    print("vfnic: stopped", flush=True)
    return 0


def cmd_link_show(args: argparse.Namespace) -> int:
    from vfnic.device.nic import control_call

    info = control_call(args.dir, {"op": "link-show"})
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    pf = info["pf"]
    print(f"pf: link/ether {pf['mac']} link {pf['link']}"
          f"{' (attached)' if pf['attached'] else ''}")
    for vf in info["vfs"]:
        print(f"    vf {vf['vf']}     link/ether {vf['mac']}, link-state {vf['state']}, "
              f"link {vf['link']}, migration {vf['migration_mode']}, "
              f"{'attached' if vf['attached'] else 'not attached'}")
    return 0


def cmd_link_set(args: argparse.Namespace) -> int:
    from vfnic.device.nic import control_call

    words = args.words
    usage = ("usage: vfnic link set DIR vf N state "
             "auto|enable|disable|migrate|cancelmigration|suspend|resume  |  vf N mac MAC"
             "  |  vf N migration transparent|cooperative")
    if len(words) != 4 or words[0] != "vf" or not words[1].isdigit():
        raise UsageError(usage)
    vf, what, value = int(words[1]), words[2], words[3]
    if what == "state":
        result = control_call(args.dir, {"op": "vf-state", "vf": vf, "state": value})
    elif what == "mac":
        result = control_call(args.dir, {"op": "vf-mac", "vf": vf, "mac": value})
    elif what == "migration":
        result = control_call(args.dir, {"op": "vf-migration", "vf": vf, "mode": value})
    else:
        raise UsageError(usage)
    if result:
        driver = f", driver {result['driver_us']} us" if result.get("driver_us") else ""
        print(f"vf {vf}: {value} acknowledged in {result['mailbox_ms']} ms{driver}")
    return 0


def cmd_regs(args: argparse.Namespace) -> int:
    from vfnic.device.nic import control_call

    regs = control_call(args.dir, {"op": "regs", "function": args.function})
    if args.json:
        print(json.dumps(regs, indent=2))
        return 0
    sys.stdout.write(f"{args.function} registers (BAR0):\n")
    for r in regs:
        sys.stdout.write(
            f"0x{r['offset']:04x}: {r['name']:<14} {r['access']:<3} 0x{r['value']:08x}\n"
        )
    return 0


def cmd_lspci(args: argparse.Namespace) -> int:
    import shutil
    import subprocess
    import tempfile

    from vfnic.device.nic import control_call

    dump = control_call(args.dir, {"op": "config", "function": args.function})
    if args.dump:
        sys.stdout.write(dump)
        return 0
    lspci = shutil.which("lspci")
    if lspci is None:
        raise UsageError("lspci not found: install pciutils (or use --dump)")
    with tempfile.NamedTemporaryFile("w", prefix="vfnic-lspci-", suffix=".txt") as f:
        f.write(dump)
        f.flush()
        out = subprocess.run([lspci, "-F", f.name, "-vvv", "-nn"], capture_output=True,
                             text=True, check=False)
    if out.returncode != 0:
        raise UsageError(f"lspci: {out.stderr.strip() or out.returncode}")
    sys.stdout.write(out.stdout)
    return 0
