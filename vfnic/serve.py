"""`vfnic serve`, `vfnic link`, `vfnic regs`: run a NIC and look at it.

`vfnic serve` is where the NIC (vfnic.device) and the migration layer's
org.qemu.VMState1 helpers (vfnic.migrate.vmstate) are put together: the device
layer knows nothing of QMP or D-Bus.
"""

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
    p.add_argument("--link-speed", type=int, default=0, metavar="MBPS",
                   help="line rate of the uplink port in Mbit/s: the VFs' frames to the "
                   "uplink share it by min_tx_rate/max_tx_rate (default 0: unlimited, "
                   "nothing is scheduled)")
    p.add_argument("--busy-poll", type=int, default=0, metavar="USEC",
                   help="keep polling a client's socket this long after each message "
                   "before sleeping (lower latency for bursts, costs a CPU; default 0)")
    p.add_argument("--group", metavar="GROUP",
                   help="open the sockets to this group too (mode 0660, DIR g+x), e.g. the "
                   "group QEMU runs as; default: owner only (0600)")
    p.add_argument("-v", "--verbose", action="store_true", help="log protocol errors")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("link", help="show or set the PF's VFs, like `ip link`")
    lsub = p.add_subparsers(dest="link_command", required=True)
    s = lsub.add_parser("show", help="list the PF and its VFs")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=cmd_link_show)
    s = lsub.add_parser(
        "set", help="DIR vf N [mac MAC] [vlan VID [qos Q]] [spoofchk on|off] [trust on|off] "
        "[max_tx_rate MBPS] [min_tx_rate MBPS] [state auto|enable|disable] "
        "[migration transparent|cooperative] | DIR vf N state "
        "migrate|cancelmigration|suspend|resume")
    s.add_argument("dir")
    s.add_argument("words", nargs="+", help="vf N SETTING VALUE ...")
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
    from vfnic.device.policy import MAX_RATE

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="vfnic serve: %(message)s",
    )
    logging.getLogger("vfnic.vmstate").setLevel(logging.INFO)  # migrations, whoever drives them
    if not 0 <= args.busy_poll <= 1_000_000:
        raise UsageError("--busy-poll must be between 0 and 1000000 microseconds")
    if not 0 <= args.link_speed <= MAX_RATE:
        raise UsageError(f"--link-speed must be between 0 (unlimited) and {MAX_RATE} Mbit/s")
    try:
        server = NicServer(args.dir, args.vfs, args.uplink, args.nic_id, args.busy_poll,
                           args.group, args.link_speed)
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


def format_vf(vf: dict[str, Any]) -> str:
    """One VF the way `ip link show` prints a PF's VF list (iproute2's print_vfinfo)."""
    out = f"    vf {vf['vf']}     link/ether {vf['mac']} brd ff:ff:ff:ff:ff:ff"
    if vf.get("vlan"):
        out += f", vlan {vf['vlan']}"
        if vf.get("qos"):
            out += f", qos {vf['qos']}"
    if vf.get("max_tx_rate"):
        out += f", max_tx_rate {vf['max_tx_rate']}Mbps"
    if vf.get("min_tx_rate"):
        out += f", min_tx_rate {vf['min_tx_rate']}Mbps"
    if "spoofchk" in vf:
        out += f", spoof checking {'on' if vf['spoofchk'] else 'off'}"
    out += f", link-state {vf['state']}"
    if "trust" in vf:
        out += f", trust {'on' if vf['trust'] else 'off'}"
    if "migration_mode" in vf:
        out += f", migration {vf['migration_mode']}"
    out += f", link {vf['link']}, {'attached' if vf['attached'] else 'not attached'}"
    return out


def format_speed(pf: dict[str, Any]) -> str:
    """The uplink's line rate, as ethtool prints Speed (Mb/s; unlimited if none)."""
    speed = pf.get("speed") or 0
    return f"speed {speed}Mb/s" if speed else "speed unlimited"


def cmd_link_show(args: argparse.Namespace) -> int:
    from vfnic.device.nic import control_call

    info = control_call(args.dir, {"op": "link-show"})
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    pf = info["pf"]
    print(f"pf: link/ether {pf['mac']} link {pf['link']}, {format_speed(pf)}"
          f"{' (attached)' if pf['attached'] else ''}")
    for vf in info["vfs"]:
        print(format_vf(vf))
    return 0


VF_SETTINGS = ("mac", "vlan", "qos", "spoofchk", "trust", "max_tx_rate", "min_tx_rate",
               "state", "migration")
MIGRATION_STATES = ("migrate", "cancelmigration", "suspend", "resume")


def parse_vf_settings(words: list[str]) -> tuple[int, dict[str, str]]:
    """`vf N SETTING VALUE ...` in iproute2's grammar (UsageError otherwise)."""
    usage = ("usage: vfnic link set DIR vf N [mac MAC] [vlan VID [qos Q]] [spoofchk on|off] "
             "[trust on|off] [max_tx_rate MBPS] [min_tx_rate MBPS] "
             "[state auto|enable|disable|migrate|cancelmigration|suspend|resume] "
             "[migration transparent|cooperative]")
    if len(words) < 4 or words[0] != "vf" or not words[1].isdigit() or len(words) % 2:
        raise UsageError(usage)
    settings: dict[str, str] = {}
    for key, value in zip(words[2::2], words[3::2], strict=True):
        if key not in VF_SETTINGS:
            raise UsageError(f"unknown VF setting {key!r}; {usage}")
        if key in settings:
            raise UsageError(f"{key} given twice")
        if key == "qos" and "vlan" not in settings:
            raise UsageError("qos must follow vlan (vlan VID qos Q)")
        settings[key] = value
    if settings.get("state") in MIGRATION_STATES and len(settings) > 1:
        raise UsageError(f"state {settings['state']} goes alone")
    return int(words[1]), settings


def cmd_link_set(args: argparse.Namespace) -> int:
    from vfnic.device.nic import control_call

    vf, settings = parse_vf_settings(args.words)
    state = settings.get("state")
    if state in MIGRATION_STATES:
        result = control_call(args.dir, {"op": "vf-state", "vf": vf, "state": state})
        driver = f", driver {result['driver_us']} us" if result.get("driver_us") else ""
        print(f"vf {vf}: {state} acknowledged in {result['mailbox_ms']} ms{driver}")
        return 0
    mode = settings.pop("migration", None)
    if mode is not None:  # vfnic's own knob: how this VF's state is migrated
        control_call(args.dir, {"op": "vf-migration", "vf": vf, "mode": mode})
    if settings:
        control_call(args.dir, {"op": "vf-set", "vf": vf, "settings": settings})
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
