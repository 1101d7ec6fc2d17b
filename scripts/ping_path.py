"""Where a ping's round trip goes: the peer pings a guest (kernel driver on a VF, or
virtio-net), every echo is timestamped by the kernel where it enters and leaves the
guest's side of the LAN (the VF's uplink TAP, the virtio-net guest's TAP), and for the
VF `vfnic serve` records when its threads reach each step of the frame's way:

  tap -> uplink wake       request on the uplink TAP -> the uplink thread's poll returns
  uplink wake -> burst     the TAP reads (until empty) -> Switch.from_uplink_burst
  burst -> MSI-X           the switch, the RX ring's DMA, the write-back -> eventfd written
  MSI-X -> socket wake     QEMU, the guest's driver and stack, the TDT write, back to
                           the serving thread's select
  socket wake -> TDT       reading the vfio-user message
  TDT -> tap               the doorbell, the TX ring's DMA, the switch -> the TAP write

with the CPU time the server thread spent in the two Python steps. The steps are
recorded by wrappers installed in `vfnic serve` through a sitecustomize module on its
PYTHONPATH (this script's measurement only, nothing in vfnic itself).

    python scripts/ping_path.py [--count N] [--interval S] [--rounds R] KIND ...

KIND is kvf or virtio; the guests run one after the other on one `vfnic serve` in a
fresh lab, R rounds each. Needs root.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vfnic.bench import datapath as dp
from vfnic.bench.common import short_tmpdir, table
from vfnic.migrate.lab import GUEST_IP, Lab

# Runs inside `vfnic serve`: one line per step, "tag thread-id thread-cpu-ns wall-ns".
SITECUSTOMIZE = r'''
import os, sys, threading, time
_fd = os.open(os.environ["VFNIC_PING_TRACE"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def _rec(tag):
    os.write(_fd, f"{tag} {threading.get_native_id()} {time.thread_time_ns()} "
                  f"{time.time_ns()}\n".encode())
def _patch():
    import select as _sel, types
    from vfnic.device import function as fnm, switch as sw
    from vfnic.vfiouser import transport as tr
    def around(cls, name, tag, after=False):
        orig = getattr(cls, name)
        def wrapper(*a, **k):
            if not after:
                _rec(tag)
            r = orig(*a, **k)
            if after:
                _rec(tag)
            return r
        setattr(cls, name, wrapper)
    around(sw.Switch, "from_uplink_burst", "burst")
    around(fnm.PciFunction, "signal", "msix", after=True)
    around(tr.Endpoint, "recv_message", "msg", after=True)
    around(sw.TapUplink, "send", "tap", after=True)
    class Poll:
        def __init__(self):
            self.p = _sel.poll()
        def register(self, *a):
            self.p.register(*a)
        def poll(self, t):
            r = self.p.poll(t)
            if r:
                _rec("uplink")
            return r
    sw.select = types.SimpleNamespace(poll=Poll, POLLIN=_sel.POLLIN)
    def select(r, w, x, *t):
        out = _sel.select(r, w, x, *t)
        if not t and out[0]:
            _rec("sock")
        return out
    tr.select = types.SimpleNamespace(select=select)
_want = (("vfnic.device.switch", "TapUplink"), ("vfnic.device.function", "PciFunction"),
         ("vfnic.vfiouser.transport", "Endpoint"))
import builtins
_import, _done = builtins.__import__, []
def _hook(name, *a, **k):
    m = _import(name, *a, **k)
    if not _done and all(hasattr(sys.modules.get(mod), attr) for mod, attr in _want):
        _done.append(1)
        _patch()
    return m
builtins.__import__ = _hook
'''

# Runs in the fabric namespace: ICMP echoes on one interface with kernel timestamps.
SNIFFER = r'''
import json, socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0))
s.setsockopt(socket.SOL_SOCKET, 35, 1)  # SO_TIMESTAMPNS
s.settimeout(0.2)
print("ready", flush=True)
end, out = time.monotonic() + float(sys.argv[2]), []
while time.monotonic() < end:
    try:
        data, anc, _, _ = s.recvmsg(2048, 64)
    except socket.timeout:
        continue
    if len(data) < 42 or data[12:14] != b"\x08\x00" or data[23] != 1:
        continue
    icmp = data[14 + (data[14] & 15) * 4:]
    if icmp[0] in (0, 8):
        t = [struct.unpack("qq", d[:16]) for lvl, k, d in anc if k == 35]
        if t:
            out.append((icmp[0], struct.unpack("!H", icmp[6:8])[0], t[0][0] * 10**9 + t[0][1]))
print(json.dumps(out), flush=True)
'''

Event = tuple[int, str, int]  # wall ns, step, thread CPU ns
STEPS = ("tap -> uplink wake", "uplink wake -> burst", "burst -> MSI-X", "MSI-X -> socket wake",
         "socket wake -> TDT", "TDT -> tap")


def echoes(lab: Lab, iface: str, count: int, interval: float) -> tuple[dict[int, float],
                                                                        list[tuple[int, int]]]:
    """Ping the guest; its RTTs by sequence number (ms) and (request, reply) kernel
    timestamps (ns) on ``iface``."""
    sniffer = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("fab"), sys.executable, "-c", SNIFFER, iface,
         str(count * interval + 5)], stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout is not None
        sniffer.stdout.readline()
        ping = subprocess.run(["ip", "netns", "exec", lab.ns("peer"), "ping", "-n", "-c",
                               str(count), "-i", str(interval), GUEST_IP],
                              capture_output=True, text=True, check=False)
        seen = json.loads(sniffer.stdout.readline())
    finally:
        sniffer.kill()
        sniffer.wait()
    rtt = {int(m[1]): float(m[2]) for m in re.finditer(r"icmp_seq=(\d+) .*time=([\d.]+) ms",
                                                      ping.stdout)}
    req = {seq: t for kind, seq, t in seen if kind == 8}
    rep = {seq: t for kind, seq, t in seen if kind == 0}
    return rtt, [(req[s], rep[s]) for s in rtt if s in req and s in rep]


def server_steps(trace: Path, pairs: list[tuple[int, int]]) -> dict[str, list[float]]:
    """Per echo, the time (µs) between the server's steps, from its trace."""
    events: list[Event] = []
    for line in trace.read_text().splitlines():
        tag, _tid, cpu, wall = line.split()
        events.append((int(wall), tag, int(cpu)))
    events.sort()
    out: dict[str, list[float]] = {k: [] for k in (*STEPS, "burst -> MSI-X CPU", "TDT -> tap CPU")}
    walls = [e[0] for e in events]
    for request, reply in pairs:
        seg = events[bisect.bisect_left(walls, request):bisect.bisect_right(walls, reply) + 4]

        def first(tag: str, after: int, seg: list[Event] = seg) -> Event | None:
            return next((e for e in seg if e[1] == tag and e[0] >= after), None)

        up = first("uplink", request)
        burst = up and first("burst", up[0])
        msix = burst and first("msix", burst[0])
        tap = msix and first("tap", msix[0])
        if not (up and burst and msix and tap):
            continue
        msgs = [e for e in seg if e[1] == "msg" and msix[0] <= e[0] <= tap[0]]
        socks = [e for e in seg if e[1] == "sock" and msix[0] <= e[0] <= (msgs or [tap])[-1][0]]
        if not msgs or not socks:
            continue
        msg, sock = msgs[-1], socks[-1]
        marks = (request, up[0], burst[0], msix[0], sock[0], msg[0], tap[0])
        for name, a, b in zip(STEPS, marks, marks[1:], strict=False):
            out[name].append((b - a) / 1e3)
        out["burst -> MSI-X CPU"].append((msix[2] - burst[2]) / 1e3)
        out["TDT -> tap CPU"].append((tap[2] - msg[2]) / 1e3)
    return out


def med(values: list[float]) -> str:
    if not values:
        return "–"
    v = sorted(values)
    return f"{statistics.median(v):,.0f} ({v[len(v) // 10]:,.0f}–{v[len(v) * 9 // 10]:,.0f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=200, help="pings per round")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between pings")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("kinds", nargs="+", choices=("kvf", "virtio"))
    args = p.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with short_tmpdir("vfpp-") as tmp, tempfile.TemporaryDirectory() as site:
        Path(site, "sitecustomize.py").write_text(SITECUSTOMIZE)
        trace = tmp / "trace"
        os.environ["PYTHONPATH"] = site  # only `vfnic serve`, started next, reads it
        os.environ["VFNIC_PING_TRACE"] = str(trace)
        lab = Lab(tmp / "lab")
        (tmp / "lab").mkdir()
        lab.up()
        try:
            nic = lab.start_nic("a", vfs=2, nic_id=1)
            del os.environ["PYTHONPATH"]
            taps: dict[str, str] = {}
            plain = dp.virtio_args

            def virtio_args(tap: str, *a: Any, **k: Any) -> list[str]:
                taps["virtio"] = tap
                return plain(tap, *a, **k)

            dp.virtio_args = virtio_args  # type: ignore[assignment]
            for _ in range(args.rounds):
                for kind in args.kinds:
                    r = results.setdefault(kind, {})

                    def measure(kind: str = kind, r: dict[str, list[float]] = r) -> None:
                        time.sleep(1)
                        trace.write_text("")
                        iface = taps["virtio"] if kind == "virtio" else lab.tap("a")
                        rtt, pairs = echoes(lab, iface, args.count, args.interval)
                        r.setdefault("RTT at the peer", []).extend(rtt.values())
                        r.setdefault("TAP to TAP", []).extend((b - a) / 1e3 for a, b in pairs)
                        if kind != "virtio":
                            for k, v in server_steps(trace, pairs).items():
                                r.setdefault(k, []).extend(v)

                    dp.guest_datapath(lab, kind, nic if kind != "virtio" else None, 0.5, 1,
                                      before=measure)
        finally:
            lab.down()
    rows = []
    for kind, r in results.items():
        rtt = [v * 1000 for v in r.pop("RTT at the peer", [])]
        rows.append([kind, "RTT at the peer", med(rtt), len(rtt)])
        for k, v in r.items():
            rows.append([kind, k, med(v), len(v)])
    print(table(["guest", "step", "µs, median (p10–p90)", "echoes"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
