"""`python3 -m vfnic.guestdriver`: drive a vfnic VF from inside the guest as a TAP.

    python3 -m vfnic.guestdriver --ip 10.0.0.2/24 [--bdf 0000:00:04.0]

Prints one "ready" line once the interface is up, then bridges until SIGTERM or
SIGINT; SIGUSR1 prints the counters. Stdlib only (the guest image has bookworm's
python3 and PYTHONPATH=/opt).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import asdict
from types import FrameType

from vfnic.errors import VfnicError
from vfnic.guestdriver.bus import GuestBus, find_functions
from vfnic.guestdriver.driver import DEFAULT_RING_SIZE, VfDriver
from vfnic.guestdriver.tapbridge import DEFAULT_POLL_US, TapBridge

STALL_S = 3.0  # a poll loop round longer than this is reported with a traceback

PROG = "vfnic-guestdriver"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m vfnic.guestdriver",
                                description="Drive a vfnic VF from userspace as a TAP interface.")
    p.add_argument("--bdf", help="PCI address of the function (default: the first vfnic VF)")
    p.add_argument("--ip", help="IPv4 address/prefix for the interface, e.g. 10.0.0.2/24")
    p.add_argument("--ifname", default="vfnic0", help="TAP name (default vfnic0)")
    p.add_argument("--poll-us", type=int, default=DEFAULT_POLL_US,
                   help=f"idle poll interval of the rings in us (default {DEFAULT_POLL_US})")
    p.add_argument("--mailbox-ms", type=float, default=5.0,
                   help="interval of the VFMAILBOX/QERR checks in ms (default 5)")
    p.add_argument("--ring-size", type=int, default=DEFAULT_RING_SIZE,
                   help=f"descriptors per ring (default {DEFAULT_RING_SIZE})")
    p.add_argument("--list", action="store_true", help="list vfnic functions and exit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def counters(driver: VfDriver) -> str:
    return json.dumps({"driver": asdict(driver.counters), "device": driver.stats()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(message)s")
    if args.list:
        for bdf in find_functions():
            print(bdf)
        return 0
    try:
        bus = GuestBus(args.bdf)
        driver = VfDriver(bus, args.ring_size, watchdog_interval=args.mailbox_ms / 1000)
        driver.init()
        bridge = TapBridge(driver, args.ifname, args.ip, args.poll_us)
        bridge.setup()
    except (VfnicError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1

    def on_stop(_sig: int, _frame: FrameType | None) -> None:
        bridge.stop()

    def on_usr1(_sig: int, _frame: FrameType | None) -> None:
        print(counters(driver), flush=True)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_usr1)
    print(f"{PROG}: ready {args.ifname} bdf={bus.name} mac={driver.mac_text} "
          f"link={'up' if driver.link_up else 'down'}", flush=True)
    def stall_watch() -> None:
        """A poll loop that stops going round leaves the guest without its link: say
        where it is stuck (in the driver's log), once per stall."""
        reported = 0.0
        while not bridge.stop_event.wait(1.0):
            beat = driver.last_poll
            if time.monotonic() - beat > STALL_S and beat != reported:
                reported = beat
                print(f"{PROG}: poll loop stalled for {time.monotonic() - beat:.1f} s:",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    threading.Thread(target=stall_watch, name="stall-watch", daemon=True).start()
    try:
        bridge.run()
    except (VfnicError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        driver.stop()
        bridge.close()
    print(counters(driver), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
