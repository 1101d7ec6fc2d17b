"""Section "isolation": what VF isolation and hardening cost, and what they bound.

1. Register reads/s of vf1 (our vfio-user client against a `vfnic serve`
   process) with vf0's client healthy, while vf0's client stalls the server's
   DMA_READ (inside the 2 s bound), and after the bound cut that client off.
2. Packet rate vf0 -> vf1 through the NIC's switch (two host-side VF drivers on
   memfd memory against `vfnic serve`), spoofchk on vs off, interleaved; and the
   switch's own cost per frame, in process.
3. One DMA access by pread/pwrite on the client's fd (what the server does now)
   vs through an mmap of it (what it did before; a shrunk file then SIGBUSes),
   in process, 16-byte descriptor and 1514-byte frame.
4. min_tx_rate under contention: three VFs blasting at the uplink of a `vfnic
   serve --link-speed` process, the rate each achieved (its GOTC register) with
   and without a min_tx_rate (and a max_tx_rate), interleaved; and the cost per
   frame of the transmit path with and without a link speed, in process.
"""

from __future__ import annotations

import mmap
import os
import socket
import statistics
import threading
import time
from pathlib import Path

from vfnic.bench.common import Section, log, met, serve, short_tmpdir, stat_text, table
from vfnic.device.nic import control_call
from vfnic.dma.controller import DmaController
from vfnic.guestdriver.bus import HostBus
from vfnic.guestdriver.driver import VfDriver
from vfnic.regs import table as T
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient
from vfnic.vfiouser.server import DMA_REPLY_TIMEOUT
from vfnic.vfiouser.transport import Endpoint

TDBAL0, TDLEN0, TDT0, TXDCTL0 = 0x1020, 0x1028, 0x1030, 0x1034
ETH_TEST = 0x88B5


def _access(region: int, offset: int, data: bytes) -> bytes:
    return wire.build(wire.RegionAccess, offset=offset, region=region, count=len(data)) + data


def stall_vf(path: Path) -> socket.socket:
    """A client that owns the VF, rings its TX doorbell and never answers DMA_READ."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    ep = Endpoint(sock)
    ep.request(wire.Command.VERSION, wire.build(wire.Version, major=0, minor=0)
               + b'{"capabilities": {}}\0', timeout=5)
    ep.request(wire.Command.DEVICE_RESET, timeout=5)  # as QEMU does at realize
    ep.request(wire.Command.DMA_MAP, wire.build(wire.DmaMap, argsz=32, flags=3, offset=0,
                                                address=0x10000, size=0x10000), timeout=5)
    ep.request(wire.Command.REGION_WRITE, _access(wire.PciRegion.CONFIG, 4, b"\x06\0"),
               timeout=5)
    for off, val in ((TDBAL0, 0x10000), (TDLEN0, 128), (TXDCTL0, T.QCTL_ENABLE)):
        ep.request(wire.Command.REGION_WRITE, _access(0, off, val.to_bytes(4, "little")),
                   timeout=5)
    ep.send(ep.new_id(), wire.Command.REGION_WRITE, _access(0, TDT0, (1).to_bytes(4, "little")),
            wire.TYPE_COMMAND | wire.FLAG_NO_REPLY)
    return sock


def reads_per_s(c: VfioUserClient, seconds: float) -> tuple[float, float]:
    """Register reads/s and the slowest read (ms) over ``seconds``."""
    n, worst = 0, 0.0
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        c.read32(0, 0x0008)
        worst = max(worst, time.perf_counter() - now)
        n += 1
    return n / (time.perf_counter() - start), worst * 1000


def bench_stall(sec: Section, rounds: int) -> None:
    rows: dict[str, list[float]] = {"healthy": [], "stalled": [], "after": []}
    worst: dict[str, list[float]] = {k: [] for k in rows}
    with short_tmpdir("vfb-iso") as tmp, serve(tmp / "nic", vfs=2) as d:
        c = VfioUserClient(str(d / "vf1.sock"))
        try:
            for r in range(rounds):
                rate, w = reads_per_s(c, 1.0)
                rows["healthy"].append(rate)
                worst["healthy"].append(w)
                sock = stall_vf(d / "vf0.sock")
                time.sleep(0.05)
                rate, w = reads_per_s(c, DMA_REPLY_TIMEOUT - 0.3)
                rows["stalled"].append(rate)
                worst["stalled"].append(w)
                sock.settimeout(DMA_REPLY_TIMEOUT + 5)
                while sock.recv(65536):  # cut off by the server
                    pass
                sock.close()
                rate, w = reads_per_s(c, 1.0)
                rows["after"].append(rate)
                worst["after"].append(w)
                log(f"isolation: stall round {r + 1}/{rounds}: "
                    + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rows.items()))
                deadline = time.monotonic() + 5
                while control_call(d, {"op": "link-show"})["vfs"][0]["attached"]:
                    if time.monotonic() > deadline:
                        raise RuntimeError("vf0's stalled client was not cut off")
                    time.sleep(0.05)
        finally:
            c.close()
    base = statistics.median(rows["healthy"])
    ok = all(statistics.median(rows[k]) * 2 >= base for k in ("stalled", "after"))
    sec.data["stall"] = rows
    labels = {"healthy": "vf0's client healthy (idle)",
              "stalled": "vf0's client not answering a DMA_READ (within the "
                         f"{DMA_REPLY_TIMEOUT:g} s bound)",
              "after": "after vf0's client was cut off"}
    sec.add(f"### Register reads of vf1 while vf0's client stalls\n\n"
            f"vf1's STATUS register read by our client in a loop (round trip per read); "
            f"{rounds} interleaved rounds, medians (min–max). Target: within 2× of the "
            f"healthy figure: {met(ok)}.")
    sec.add(table(["vf0's client", "vf1 reads/s", "slowest read (ms)"],
                  [[labels[k], stat_text(rows[k], "{:.0f}"), stat_text(worst[k], "{:.1f}")]
                   for k in rows]))


def bench_spoofchk(sec: Section, rounds: int, frames: int) -> None:
    rates: dict[str, list[float]] = {"on": [], "off": []}
    with short_tmpdir("vfb-spoof") as tmp, serve(tmp / "nic", vfs=2) as d:
        d0 = VfDriver(HostBus(str(d / "vf0.sock"), fd_backed=True), 256)
        d1 = VfDriver(HostBus(str(d / "vf1.sock"), fd_backed=True), 256)
        try:
            d0.init()
            d1.init()
            frame = d1.mac + d0.mac + ETH_TEST.to_bytes(2, "big") + bytes(46)
            for r in range(rounds):
                for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    control_call(d, {"op": "vf-set", "vf": 0, "settings": {"spoofchk": mode}})
                    got = 0
                    start = time.perf_counter()
                    while got < frames:
                        d0.tx_batch([frame] * 32)
                        got += len(d1.rx_poll())
                        d0.rx_poll()
                        if time.perf_counter() - start > 60:
                            raise RuntimeError(f"only {got} of {frames} frames arrived")
                    rates[mode].append(got / (time.perf_counter() - start))
                log(f"isolation: spoofchk round {r + 1}/{rounds}: on {rates['on'][-1]:.0f}, "
                    f"off {rates['off'][-1]:.0f} frames/s")
        finally:
            d0.bus.close()
            d1.bus.close()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    overhead = (off - on) / off * 100
    overlap = min(rates["on"]) <= max(rates["off"]) and min(rates["off"]) <= max(rates["on"])
    sec.data["spoofchk"] = rates
    sec.add(f"### Packet rate with spoofchk on vs off\n\n"
            f"vf0 -> vf1 through the NIC's switch, two host-side VF drivers (memfd memory, "
            f"batches of 32 60-byte frames) against `vfnic serve`; {frames} frames per run, "
            f"{rounds} interleaved runs of each. Overhead of spoofchk (median off vs on): "
            f"{overhead:.1f} %" + (" (the two ranges overlap)" if overlap else "")
            + f"; target ≤ 5 %: {met(overhead <= 5)}.")
    sec.add(table(["spoofchk", "frames/s"],
                  [[k, stat_text(v, "{:.0f}")] for k, v in rates.items()]))


def bench_switch(sec: Section, n: int) -> None:
    """The switch alone, in process: forward() of one vf0 -> vf1 frame (no client
    attached, so vf1 counts it as missed), spoofchk on vs off."""
    from vfnic.device.nic import Nic

    nic = Nic(2)
    src, dst = nic.vfs
    frame = dst.rx_mac + src.rx_mac + ETH_TEST.to_bytes(2, "big") + bytes(46)
    res: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(7):
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            nic.set_vf(0, {"spoofchk": mode})
            t = time.perf_counter()
            for _ in range(n):
                nic.switch.forward(src, frame)
            res[mode].append((time.perf_counter() - t) / n * 1e9)
    on, off = statistics.median(res["on"]), statistics.median(res["off"])
    sec.data["switch"] = res
    sec.add(f"Switch alone (in process, `Switch.forward` of a vf0 -> vf1 frame, {n} per run, "
            f"7 interleaved runs): spoofchk on {stat_text(res['on'], '{:.0f}')} ns, off "
            f"{stat_text(res['off'], '{:.0f}')} ns per frame ({on - off:+.0f} ns).")


def bench_dma_access(sec: Section, n: int) -> None:
    fd = os.memfd_create("vfb-dma")
    os.ftruncate(fd, 0x10000)
    dma = DmaController()
    dma.map(0x10000, 0x10000, 3, 0, os.dup(fd))
    view = mmap.mmap(fd, 0x10000)
    rows = []
    try:
        for size in (16, 1514):
            data = bytes(size)
            res: dict[str, list[float]] = {"pread": [], "pwrite": [], "mmap read": [],
                                           "mmap write": []}
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(n):
                    dma.read(0x10100, size)
                res["pread"].append((time.perf_counter() - t) / n * 1e9)
                t = time.perf_counter()
                for _ in range(n):
                    dma.write(0x10100, data)
                res["pwrite"].append((time.perf_counter() - t) / n * 1e9)
                t = time.perf_counter()
                for _ in range(n):
                    dma.find(0x10100, size)
                    bytes(view[0x100:0x100 + size])
                res["mmap read"].append((time.perf_counter() - t) / n * 1e9)
                t = time.perf_counter()
                for _ in range(n):
                    dma.find(0x10100, size)
                    view[0x100:0x100 + size] = data
                res["mmap write"].append((time.perf_counter() - t) / n * 1e9)
            rows.append([f"{size} B", *(stat_text(v, "{:.0f}") for v in res.values())])
    finally:
        view.close()
        dma.unmap_all()
        os.close(fd)
    sec.add(f"### One DMA access: pread/pwrite on the fd vs an mmap\n\n"
            f"In process, {n} accesses per run, 5 runs, ns per access (median, min–max); "
            f"both columns include the mapping lookup. pwrite includes the fstat that keeps "
            f"it from growing a shrunk file.")
    sec.add(table(["size", "pread", "pwrite (+fstat)", "mmap read (before)",
                   "mmap write (before)"], rows))


LINK = 20  # Mbit/s: the uplink's line rate in the min_tx_rate rows
RATE_CONFIGS: dict[str, dict[int, dict[str, int]]] = {
    "no rate settings": {},
    "vf0 min_tx_rate 12": {0: {"min_tx_rate": 12}},
    "vf0 min_tx_rate 12, vf2 max_tx_rate 2": {0: {"min_tx_rate": 12}, 2: {"max_tx_rate": 2}},
}


def _blast(drv: VfDriver, frame: bytes, stop: threading.Event, errors: list[str]) -> None:
    """Keep the VF's TX ring full (the device holds what the uplink cannot take yet)."""
    try:
        while not stop.is_set():
            if not drv.tx_batch([frame] * 16):
                time.sleep(0.002)
    except Exception as exc:  # reported by the bench
        errors.append(f"{drv.bus.name}: {exc}")


def _gotc(d: Path, vf: int) -> int:
    regs = {r["name"]: r["value"] for r in control_call(d, {"op": "regs", "function": f"vf{vf}"})}
    return int(regs["GOTCH"]) << 32 | int(regs["GOTCL"])


def bench_min_rate(sec: Section, rounds: int, window: float) -> None:
    from vfnic.device.egress import allocate, mbit

    nvf = 3
    rates: dict[str, list[list[float]]] = {k: [[] for _ in range(nvf)] for k in RATE_CONFIGS}
    totals: dict[str, list[float]] = {k: [] for k in RATE_CONFIGS}
    errors: list[str] = []
    stop = threading.Event()
    with short_tmpdir("vfb-rate") as tmp, serve(tmp / "nic", vfs=nvf, link_speed=LINK) as d:
        drivers = [VfDriver(HostBus(str(d / f"vf{i}.sock"), fd_backed=True), 64)
                   for i in range(nvf)]
        threads = []
        try:
            for drv in drivers:
                drv.init()
                far = bytes.fromhex("02aaaaaaaa01")  # on no function: out of the uplink
                frame = far + drv.mac + ETH_TEST.to_bytes(2, "big") + bytes(1500)
                threads.append(threading.Thread(target=_blast, args=(drv, frame, stop, errors),
                                                daemon=True))
            for t in threads:
                t.start()
            keys = list(RATE_CONFIGS)
            for r in range(rounds):
                for name in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotated
                    for vf in range(nvf):
                        settings = {"min_tx_rate": 0, "max_tx_rate": 0,
                                    **RATE_CONFIGS[name].get(vf, {})}
                        control_call(d, {"op": "vf-set", "vf": vf, "settings": settings})
                    time.sleep(0.7)  # the scheduler settles on the new shares
                    before = [_gotc(d, vf) for vf in range(nvf)]
                    t0 = time.monotonic()
                    time.sleep(window)
                    after = [_gotc(d, vf) for vf in range(nvf)]
                    dt = time.monotonic() - t0
                    got = [(a - b) * 8 / dt / 1e6 for a, b in zip(after, before, strict=True)]
                    for vf in range(nvf):
                        rates[name][vf].append(got[vf])
                    totals[name].append(sum(got))
                    log(f"isolation: rates round {r + 1}/{rounds}, {name}: "
                        + ", ".join(f"vf{i} {x:.2f}" for i, x in enumerate(got)) + " Mbit/s")
        finally:
            stop.set()
            for t in threads:
                t.join(5)
            for drv in drivers:
                drv.bus.close()
    if errors:
        raise RuntimeError("; ".join(errors))
    rows = []
    ok = True
    for name, conf in RATE_CONFIGS.items():
        flows = []
        for vf in range(nvf):
            c = conf.get(vf, {})
            cap = mbit(c.get("max_tx_rate", 0)) or mbit(LINK)
            flows.append((mbit(c.get("min_tx_rate", 0)), cap))
        want = [x * 8 / 1e6 for x in allocate(mbit(LINK), flows)]
        for vf in range(nvf):
            med = statistics.median(rates[name][vf])
            floor = conf.get(vf, {}).get("min_tx_rate", 0)
            ceil = conf.get(vf, {}).get("max_tx_rate", 0)
            ok &= med >= floor * 0.95 and (not ceil or med <= ceil * 1.05)
        rows.append([name, *(stat_text(rates[name][vf], "{:.2f}") for vf in range(nvf)),
                     stat_text(totals[name], "{:.2f}"),
                     " / ".join(f"{w:.2f}" for w in want)])
    sec.data["min_rate"] = {"rates": rates, "totals": totals, "link_speed": LINK}
    sec.add(f"### min_tx_rate and max_tx_rate under contention\n\n"
            f"`vfnic serve --vfs 3 --link-speed {LINK}`; three host-side VF drivers (memfd "
            f"memory, one thread each) keep their TX rings full of 1514-byte frames for the "
            f"uplink; each VF's achieved rate is its GOTC register (octets sent) over "
            f"{window:g} s, read through control.sock. {rounds} rounds, the settings "
            f"interleaved (order rotated each round), medians (min–max) in Mbit/s; the last "
            f"column is the scheduler's allocation (max-min fair with the min_tx_rate floors "
            f"and max_tx_rate caps). Target: each min_tx_rate and max_tx_rate holds within "
            f"5 %: {met(ok)}.")
    sec.add(table(["settings", "vf0", "vf1", "vf2", "sum", "allocation vf0 / vf1 / vf2"], rows))


def _tx_loop(link_speed: int, uplink: bool, n: int, runs: int) -> list[float]:
    """ns per frame of DataPath.transmit (+ the switch) of vf0, batches of 32
    60-byte frames, in process (no client: frames for vf1 are counted as missed)."""
    from vfnic.device import pci
    from vfnic.device.nic import Nic
    from vfnic.regs import descriptors as D

    nic = Nic(2, link_speed=link_speed)
    src, dst = nic.vfs
    ring = 64
    fd = os.memfd_create("vfb-tx")
    os.ftruncate(fd, 0x30000)
    src.dma.map(0x100000, 0x30000, 3, 0, os.dup(fd))
    src.config.set(pci.COMMAND, 2, pci.COMMAND_MASTER | pci.COMMAND_MEMORY)
    to = bytes.fromhex("02aaaaaaaa01") if uplink else dst.rx_mac
    frame = to + src.rx_mac + ETH_TEST.to_bytes(2, "big") + bytes(46)
    os.pwrite(fd, b"".join(D.TX_DESC.pack(0x110000 + i * 2048, len(frame), 0,
                                          D.CMD_EOP | D.CMD_RS, 0, 0, 0)
                           for i in range(ring)), 0)
    for i in range(ring):
        os.pwrite(fd, frame, 0x10000 + i * 2048)
    os.close(fd)
    bank = src.bank
    for reg, value in ((T.TDBAL(0), 0x100000), (T.TDLEN(0), ring * 16),
                       (T.TXDCTL(0), T.QCTL_ENABLE), (T.CTRL, T.CTRL_SLU)):
        bank.set(reg, value)
    nic._update_link(src)
    tail, out = 0, []
    with nic.lock:
        for _ in range(runs):
            sent = 0
            t = time.perf_counter()
            while sent < n:
                tail = (tail + 32) % ring
                bank.set(T.TDT(0), tail)
                k = src.datapath.transmit(0)
                if not k:
                    raise RuntimeError("the transmit loop sent nothing")
                sent += k
            out.append((time.perf_counter() - t) / sent * 1e9)
    src.dma.unmap_all()
    return out


def bench_tx_cost(sec: Section, n: int) -> None:
    kinds = {"no link speed (unscheduled)": (0, True),
             "--link-speed 100000, frames for the uplink": (100_000, True),
             "--link-speed 100000, vf0 -> vf1 inside the NIC": (100_000, False)}
    res: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(7):
        for k in list(kinds)[r % 3:] + list(kinds)[:r % 3]:
            res[k] += _tx_loop(*kinds[k], n, 1)
    sec.data["tx_cost"] = res
    sec.add("Transmit path alone (in process, `DataPath.transmit` + switch of vf0's 60-byte "
            f"frames in batches of 32, {n} per run, 7 interleaved runs; 100000 Mbit/s never "
            "holds a frame back, so this is the scheduler's bookkeeping): "
            + "; ".join(f"{k} {stat_text(v, '{:.0f}')} ns" for k, v in res.items())
            + " per frame.")


def run(quick: bool = False) -> Section:
    sec = Section("isolation", "5. Isolation and hardening")
    sec.attempt("stalled client", lambda: bench_stall(sec, 2 if quick else 5))
    sec.attempt("spoofchk", lambda: bench_spoofchk(sec, 2 if quick else 9,
                                                   1000 if quick else 20000))
    sec.attempt("switch", lambda: bench_switch(sec, 2000 if quick else 20000))
    sec.attempt("dma access", lambda: bench_dma_access(sec, 2000 if quick else 20000))
    sec.attempt("min_tx_rate", lambda: bench_min_rate(sec, 2 if quick else 3,
                                                      2.0 if quick else 4.0))
    sec.attempt("tx cost", lambda: bench_tx_cost(sec, 2000 if quick else 20000))
    return sec
