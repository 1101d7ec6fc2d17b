"""`python -m vfnic.bench.worker`: the processes a benchmark runs beside itself.

Each sub-command prints JSON lines on stdout: an optional ``{"ready": ...}`` line
once it is set up, then one result object when it ends. Long-running ones stop
on SIGTERM or SIGINT (sent by the bench, by pid).

  hostdrv-rx   host-side VF driver (HostBus + VfDriver) counting received frames
  hostdrv-tx   host-side VF driver sending UDP frames as fast as it can for a while
  mbx-driver   host-side VF driver that only polls its mailbox (suspend/resume RTT)
  udp-recv     UDP socket counting datagrams (run in the peer namespace)
  udp-send     UDP sender for a fixed time (run in the peer namespace)
  peer-guest   the peer's half of the in-guest datapath benchmark: ping RTT, then
               UDP both ways, driven through the guest's control server
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from types import FrameType
from typing import Any

STOP = False


def _on_stop(_sig: int, _frame: FrameType | None) -> None:
    global STOP
    STOP = True


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, sport: int,
              dport: int, payload: int) -> bytes:
    """Ethernet + IPv4 + UDP (checksum 0: none) with ``payload`` zero bytes,
    padded to the 60-byte minimum (64 on the wire with the FCS)."""
    udp_len = 8 + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0)
    frame = dst_mac + src_mac + b"\x08\x00" + ip + udp + bytes(payload)
    return frame.ljust(60, b"\0")


# -- host-side driver workers ----------------------------------------------------------


def _driver(sock: str) -> Any:
    from vfnic.guestdriver.bus import HostBus
    from vfnic.guestdriver.driver import VfDriver

    bus = HostBus(sock, fd_backed=True)
    driver = VfDriver(bus)
    driver.init()
    return driver


def cmd_hostdrv_rx(args: argparse.Namespace) -> int:
    driver = _driver(args.sock)
    _emit({"ready": True, "mac": driver.mac_text})
    count = nbytes = 0
    first = last = 0.0
    while not STOP:
        frames = driver.rx_poll()
        if frames:
            now = time.perf_counter()
            if not count:
                first = now
            last = now
            count += len(frames)
            nbytes += sum(len(f) for f in frames)
        driver.watchdog()
    stats = driver.stats()
    _emit({"frames": count, "bytes": nbytes, "span": last - first, "device": stats,
           "driver": {"rx_errors": driver.counters.rx_errors}})
    driver.stop()
    driver.bus.close()
    return 0


def cmd_hostdrv_tx(args: argparse.Namespace) -> int:
    driver = _driver(args.sock)
    frame = udp_frame(mac_bytes(args.dst_mac), driver.mac, args.src_ip, args.dst_ip, 40000,
                      args.port, args.payload)
    batch = [frame] * args.batch
    _emit({"ready": True, "mac": driver.mac_text, "frame": len(frame)})
    if args.start_delay:
        time.sleep(args.start_delay)
    sent = 0
    t0 = time.perf_counter()
    end = t0 + args.dur
    while time.perf_counter() < end and not STOP:
        sent += driver.tx_batch(batch)
    elapsed = time.perf_counter() - t0
    stats = driver.stats()
    _emit({"sent": sent, "dropped": driver.counters.tx_dropped, "elapsed": elapsed,
           "frame": len(frame), "device": stats})
    driver.stop()
    driver.bus.close()
    return 0


def cmd_mbx_driver(args: argparse.Namespace) -> int:
    driver = _driver(args.sock)
    # Bringing the link up made the PF post LINK_CHANGE: take it before saying ready, so
    # that the first SUSPEND does not land while that message is being handled.
    deadline = time.monotonic() + 2.0
    while driver.counters.pf_messages < 1 and time.monotonic() < deadline:
        driver.watchdog(force=True)
    _emit({"ready": True, "mac": driver.mac_text})
    while not STOP:
        driver.watchdog(force=True)  # one VFMAILBOX read per loop: the fastest poll
    _emit({"pf_messages": driver.counters.pf_messages})
    driver.bus.close()
    return 0


# -- UDP workers (peer namespace) ------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.nbytes = 0
        self.first = 0.0
        self.last = 0.0

    def add(self, n: int) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1
        self.nbytes += n

    def result(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.nbytes, "span": self.last - self.first}


def _udp_rx_socket(bind: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((bind, port))
    return s


def cmd_udp_recv(args: argparse.Namespace) -> int:
    s = _udp_rx_socket(args.bind, args.port)
    s.settimeout(0.1)
    _emit({"ready": True})
    c = Counter()
    buf = bytearray(65536)
    while not STOP:
        try:
            n = s.recv_into(buf)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        c.add(n)
    _emit(c.result())
    return 0


def udp_flood(dst: str, port: int, size: int, dur: float) -> dict[str, Any]:
    from vfnic.bench.guest_server import flood

    return flood(dst, port, size, dur, sndbuf=4 << 20, batch=64, stop=lambda: STOP)


def cmd_udp_send(args: argparse.Namespace) -> int:
    _emit(udp_flood(args.dst, args.port, args.size, args.dur))
    return 0


# -- the peer's half of the guest datapath benchmark -------------------------------------


class Control:
    """Line-JSON requests to the guest's control server (vfnic/bench/datapath.py)."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.sock.settimeout(timeout)
        self.rfile = self.sock.makefile("rb")

    def send(self, req: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(req).encode() + b"\n")

    def reply(self) -> dict[str, Any]:
        line = self.rfile.readline()
        if not line:
            raise ConnectionError("guest control server closed the connection")
        return dict(json.loads(line))


def ping_rtt(target: str, count: int, interval: float) -> dict[str, Any]:
    out = subprocess.run(["ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}", "-W", "2",
                          target], capture_output=True, text=True, check=False).stdout
    import re

    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    loss = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    res: dict[str, Any] = {"raw": out.strip().splitlines()[-2:]}
    if m:
        res.update(min=float(m.group(1)), avg=float(m.group(2)), max=float(m.group(3)),
                   mdev=float(m.group(4)))
    if loss:
        res.update(sent=int(loss.group(1)), received=int(loss.group(2)))
    return res


def guest_tx(ctl: Control, me: str, port: int, size: int, dur: float) -> dict[str, Any]:
    """The guest sends to us for ``dur`` seconds; we count."""
    s = _udp_rx_socket(me, port)
    s.setblocking(False)
    c = Counter()
    buf = bytearray(65536)
    ctl.send({"op": "send", "dst": me, "port": port, "size": size, "dur": dur})
    reply: dict[str, Any] | None = None
    drain_until = None
    deadline = time.monotonic() + dur + 120
    ctl_fd = ctl.sock
    while True:
        now = time.monotonic()
        if drain_until is not None and now > drain_until:
            break
        if now > deadline:
            raise TimeoutError("the guest did not report the end of its send")
        ready, _, _ = select.select([s, ctl_fd], [], [], 0.1)
        if s in ready:
            while True:
                try:
                    n = s.recv_into(buf)
                except BlockingIOError:
                    break
                c.add(n)
        if ctl_fd in ready and reply is None:
            reply = ctl.reply()
            drain_until = time.monotonic() + 1.0  # frames still in the pipeline
    s.close()
    assert reply is not None
    return {"guest": reply, "peer": c.result()}


def guest_rx(ctl: Control, guest: str, port: int, size: int, dur: float) -> dict[str, Any]:
    """We send to the guest for ``dur`` seconds; it counts."""
    ctl.send({"op": "recv", "port": port, "idle": 1.5, "max": dur + 60})
    first = ctl.reply()
    if not first.get("listening"):
        raise RuntimeError(f"guest receiver not listening: {first}")
    sent = udp_flood(guest, port, size, dur)
    reply = ctl.reply()
    return {"peer": sent, "guest": reply}


DEVICE_STATS = ("GPRC", "GPTC", "MPC", "RXERRC", "TXERRC")


def device_stats(nic_dir: str | None, function: str = "vf0") -> dict[str, int]:
    """The VF's statistics registers, through `vfnic serve`'s management socket."""
    if not nic_dir:
        return {}
    from vfnic.device.nic import control_call

    regs = control_call(nic_dir, {"op": "regs", "function": function})
    return {r["name"]: int(r["value"]) for r in regs if r["name"] in DEVICE_STATS}


def server_counters(nic_dir: str | None, function: str = "vf0") -> dict[str, int]:
    """The server's event counts for the VF (BAR0 accesses by register, vfio-user
    messages, MSI-X signals, RX/TX batches): `{"op": "counters"}` on control.sock."""
    if not nic_dir:
        return {}
    from vfnic.device.nic import control_call

    return {str(k): int(v) for k, v in control_call(nic_dir, {"op": "counters",
                                                          "function": function}).items()}


def _with_device(nic_dir: str | None, fn: Any, *args: Any) -> dict[str, Any]:
    before, sbefore = device_stats(nic_dir), server_counters(nic_dir)
    res: dict[str, Any] = fn(*args)
    if nic_dir:
        after, safter = device_stats(nic_dir), server_counters(nic_dir)
        res["device"] = {k: (after[k] - before[k]) & 0xFFFFFFFF for k in after}
        res["server"] = {k: v - sbefore.get(k, 0) for k, v in safter.items()
                         if v != sbefore.get(k, 0)}
    return res


def cmd_peer_guest(args: argparse.Namespace) -> int:
    ctl = Control(args.guest, args.ctl)
    result: dict[str, Any] = {"ping": ping_rtt(args.guest, args.ping, 0.05)}
    sizes = [int(x) for x in args.sizes.split(",")]
    for size in sizes:
        print(f"peer-guest: guest -> peer, {size} B payload", file=sys.stderr, flush=True)
        result[f"tx{size}"] = _with_device(args.nic_dir, guest_tx, ctl, args.me, args.port,
                                           size, args.dur)
    for size in sizes:
        print(f"peer-guest: peer -> guest, {size} B payload", file=sys.stderr, flush=True)
        result[f"rx{size}"] = _with_device(args.nic_dir, guest_rx, ctl, args.guest,
                                           args.port + 1, size, args.dur)
    ctl.send({"op": "quit"})
    _emit(result)
    return 0


def cmd_l2_watch(args: argparse.Namespace) -> int:
    """Count the frames that announce where the guest is, as the peer sees them:
    gratuitous ARPs for its IPv4 address, RARPs (QEMU's and the NIC's announce) and
    IPv6 neighbour advertisements, each with the time of the first one."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    s.bind((args.iface, 0))
    s.settimeout(0.1)
    ip = socket.inet_aton(args.ip)
    counts = {"garp": 0, "rarp": 0, "na": 0}
    first: dict[str, float] = {}
    _emit({"ready": True})
    while not STOP:
        try:
            frame, addr = s.recvfrom(65535)
        except (TimeoutError, InterruptedError):
            continue
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        kind = None
        et = frame[12:14]
        if et == b"\x08\x06" and len(frame) >= 42 and frame[28:32] == frame[38:42] == ip:
            kind = "garp"
        elif et == b"\x80\x35":
            kind = "rarp"
        elif et == b"\x86\xdd" and len(frame) > 54 and frame[20] == 58 and frame[54] == 136:
            kind = "na"
        if kind:
            counts[kind] += 1
            first.setdefault(kind, time.time())
    _emit({"counts": counts, "first": first})
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    """Echo every message on a UNIX socket: the floor of a Python IPC round trip."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(args.path)
    srv.listen(1)
    _emit({"ready": True})
    conn, _ = srv.accept()
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
    srv.close()
    _emit({"done": True})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfnic.bench.worker")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("hostdrv-rx")
    s.add_argument("--sock", required=True)
    s.set_defaults(fn=cmd_hostdrv_rx)
    s = sub.add_parser("hostdrv-tx")
    s.add_argument("--sock", required=True)
    s.add_argument("--dst-mac", required=True)
    s.add_argument("--src-ip", default="10.77.0.3")
    s.add_argument("--dst-ip", default="10.77.0.4")
    s.add_argument("--port", type=int, default=5001)
    s.add_argument("--payload", type=int, default=18)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--dur", type=float, default=5.0)
    s.add_argument("--start-delay", type=float, default=0.0)
    s.set_defaults(fn=cmd_hostdrv_tx)
    s = sub.add_parser("mbx-driver")
    s.add_argument("--sock", required=True)
    s.set_defaults(fn=cmd_mbx_driver)
    s = sub.add_parser("udp-recv")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=5001)
    s.set_defaults(fn=cmd_udp_recv)
    s = sub.add_parser("udp-send")
    s.add_argument("--dst", required=True)
    s.add_argument("--port", type=int, default=5001)
    s.add_argument("--size", type=int, default=18)
    s.add_argument("--dur", type=float, default=5.0)
    s.set_defaults(fn=cmd_udp_send)
    s = sub.add_parser("peer-guest")
    s.add_argument("--guest", required=True)
    s.add_argument("--me", required=True)
    s.add_argument("--ctl", type=int, default=5009)
    s.add_argument("--port", type=int, default=5001)
    s.add_argument("--sizes", default="18,1472")
    s.add_argument("--dur", type=float, default=5.0)
    s.add_argument("--ping", type=int, default=50)
    s.add_argument("--nic-dir", help="vfnic serve folder: the VF's statistics per test")
    s.set_defaults(fn=cmd_peer_guest)
    s = sub.add_parser("l2-watch")
    s.add_argument("--iface", required=True)
    s.add_argument("--ip", required=True)
    s.set_defaults(fn=cmd_l2_watch)
    s = sub.add_parser("echo")
    s.add_argument("--path", required=True)
    s.set_defaults(fn=cmd_echo)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
