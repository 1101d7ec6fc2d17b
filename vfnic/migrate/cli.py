"""`vfnic migrate`: move a running VM and its VF to another host (QMP migration; the VF
rides QEMU's own stream through each host's `vfnic serve`)."""

from __future__ import annotations

import argparse
from typing import Any

from vfnic.errors import UsageError


def _host(text: str, what: str) -> tuple[str, int]:
    """DIR:vfN -> (DIR, N)."""
    folder, sep, vf = text.rpartition(":")
    if not sep or not vf.startswith("vf") or not vf[2:].isdigit() or not folder:
        raise UsageError(f"{what} must look like NIC_DIR:vfN, not {text!r}")
    return folder, int(vf[2:])


def register(sub: Any) -> None:
    p = sub.add_parser("migrate", help="live-migrate a VM and its vfnic VF to another host")
    p.add_argument("--from", dest="src", required=True, metavar="NIC_DIR:vfN",
                   help="the source NIC folder and VF")
    p.add_argument("--to", dest="dst", required=True, metavar="NIC_DIR:vfN",
                   help="the destination NIC folder and VF")
    p.add_argument("--qmp-from", required=True, metavar="SOCKET", help="source QEMU's QMP")
    p.add_argument("--qmp-to", required=True, metavar="SOCKET",
                   help="destination QEMU's QMP (started with -S -incoming URI)")
    p.add_argument("--uri", required=True, help="where the destination listens, tcp:HOST:PORT")
    p.add_argument("--mode", choices=("transparent", "cooperative"),
                   help="set the source VF's migration mode first (default: as set by "
                        "`vfnic link set DIR vf N migration ...`, transparent unless changed)")
    p.add_argument("--downtime-limit", type=int, default=300, metavar="MS")
    p.add_argument("--keep-source", action="store_true", help="do not quit the source QEMU")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vfnic.migrate.orchestrator import Host, Options, migrate, summary_json

    src_dir, src_vf = _host(args.src, "--from")
    dst_dir, dst_vf = _host(args.dst, "--to")
    for sock, what in ((args.qmp_from, "--qmp-from"), (args.qmp_to, "--qmp-to")):
        if not Path(sock).exists():
            raise UsageError(f"{what}: no QMP socket at {sock}")
    for folder, vf, what in ((src_dir, src_vf, "--from"), (dst_dir, dst_vf, "--to")):
        if not (Path(folder) / f"vf{vf}.sock").exists():
            raise UsageError(f"{what}: no vfnic VF socket {folder}/vf{vf}.sock")
    if not args.uri.startswith(("tcp:", "unix:")):
        raise UsageError("--uri must be tcp:HOST:PORT or unix:PATH")
    summary = migrate(
        Host(args.qmp_from, src_dir, src_vf),
        Host(args.qmp_to, dst_dir, dst_vf),
        Options(args.uri, args.mode, args.downtime_limit, quit_source=not args.keep_source),
    )
    print(summary_json(summary) if args.json else summary.text())
    return 0 if summary.status == "completed" else 1
