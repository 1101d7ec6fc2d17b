"""Runs inside the guest (`python3 -m vfnic.bench.guest_server`, standard library only):
the datapath bench's traffic end in the guest. It listens on a TCP control port for
one JSON request per line and answers each with one JSON line:

  {"op": "send", "dst", "port", "size", "dur"}  UDP datagrams of ``size`` bytes to
                                                 dst:port for ``dur`` seconds
  {"op": "recv", "port", "max", "idle"}          count UDP datagrams on ``port`` (answers
                                                 {"listening": true} first) until ``idle``
                                                 seconds pass without one, or ``max``
  {"op": "quit"}

Each answer carries "counters": where frames were lost inside the guest (interface
queues, UDP socket drops) during the request. Prints ``@@bench-server-ready`` when
it listens.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

BATCH = 32  # datagrams between clock reads


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


def counters() -> dict[str, int]:
    """Interface and UDP counters of the guest kernel."""
    out = {}
    for ifn in os.listdir("/sys/class/net"):
        if ifn != "lo":
            d = f"/sys/class/net/{ifn}/statistics/"
            for k in ("tx_packets", "tx_dropped", "rx_packets", "rx_dropped"):
                with open(d + k) as f:
                    out[f"{ifn}.{k}"] = int(f.read())
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    for k, v in zip(rows[0][1:], rows[1][1:], strict=True):
        out["udp." + k] = int(v)
    out.update(interrupts())
    return out


def interrupts() -> dict[str, int]:
    """The NICs' interrupts (/proc/interrupts lines named vfnic*/virtio*, all CPUs) and
    the NET_RX/NET_TX softirqs (/proc/softirqs) the guest handled."""
    out: dict[str, int] = {}
    try:
        with open("/proc/interrupts") as f:
            ncpu = len(f.readline().split())
            for line in f:
                fields = line.split()
                if len(fields) > ncpu + 1 and fields[-1].startswith(("vfnic", "virtio")):
                    out["irq." + fields[-1]] = sum(int(x) for x in fields[1:ncpu + 1])
        with open("/proc/softirqs") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in ("NET_RX:", "NET_TX:"):
                    out["softirq." + fields[0][:-1]] = sum(int(x) for x in fields[1:])
    except OSError:
        pass
    return out


def delta(before: dict[str, int]) -> dict[str, int]:
    after = counters()
    return {k: after[k] - before.get(k, 0) for k in after}


def flood(dst: str, port: int, size: int, dur: float, sndbuf: int = 1 << 20,
          batch: int = BATCH, stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """UDP datagrams of ``size`` bytes to dst:port, as fast as the socket takes them,
    for ``dur`` seconds (or until ``stop()``), the clock read every ``batch``. Also the
    peer's sender (vfnic.bench.worker)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    s.connect((dst, port))
    payload = bytes(size)
    sent = errors = 0
    t0 = time.perf_counter()
    end = t0 + dur
    while not stop():
        for _ in range(batch):
            try:
                s.send(payload)
                sent += 1
            except OSError:
                errors += 1
        if time.perf_counter() >= end:
            break
    elapsed = time.perf_counter() - t0
    s.close()
    return {"sent": sent, "errors": errors, "elapsed": elapsed}


def send(req: dict[str, Any]) -> dict[str, Any]:
    return flood(req["dst"], req["port"], req["size"], req["dur"])


def recv(req: dict[str, Any], f: Writer) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("0.0.0.0", req["port"]))
    s.settimeout(0.2)
    f.write(b'{"listening": true}\n')
    f.flush()
    count = nbytes = 0
    first = last = 0.0
    deadline = time.monotonic() + req["max"]
    buf = bytearray(65536)
    while time.monotonic() < deadline:
        try:
            n = s.recv_into(buf)
        except TimeoutError:
            if count and time.perf_counter() - last > req["idle"]:
                break
            continue
        last = time.perf_counter()
        if not count:
            first = last
        count += 1
        nbytes += n
    s.close()
    return {"count": count, "bytes": nbytes, "span": last - first}


def serve(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    print("@@bench-server-ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as f:
            for line in f:
                req = json.loads(line)
                if req["op"] == "quit":
                    sys.exit(0)
                before = counters()
                out = send(req) if req["op"] == "send" else recv(req, f)
                out["counters"] = delta(before)
                f.write(json.dumps(out).encode() + b"\n")
                f.flush()


def main() -> None:
    p = argparse.ArgumentParser(prog="python3 -m vfnic.bench.guest_server")
    p.add_argument("--port", type=int, required=True, help="TCP control port")
    serve(p.parse_args().port)


if __name__ == "__main__":
    main()
