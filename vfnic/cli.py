"""The ``vfnic`` command line.

Each sub-command lives with the layer it drives; this module only parses and
turns every VfnicError into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from vfnic.errors import VfnicError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line and exit status 2, as argparse does, without the usage block.
        sys.stderr.write(f"vfnic: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from vfnic import serve
    from vfnic.host import cli as host_cli
    from vfnic.libvirt import cli as libvirt_cli
    from vfnic.migrate import cli as migrate_cli

    parser = _Parser(prog="vfnic", description="A software SR-IOV NIC served over vfio-user.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve.register(sub)
    host_cli.register(sub)
    migrate_cli.register(sub)
    libvirt_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except VfnicError as exc:
        sys.stderr.write(f"vfnic: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
