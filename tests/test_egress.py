"""The uplink's line rate and its egress scheduler (issue 10, item 3: min_tx_rate and
max_tx_rate under contention): VF drivers on the host blast frames at a real
`NicServer` whose uplink is a real TAP with a low link speed; what each VF achieved
is read from its statistics registers (GOTC), what the wire carried from the TAP's
own counters."""

from __future__ import annotations

import heapq
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tapnic import tap_nic_server

from vfnic.device.egress import EgressScheduler, allocate
from vfnic.device.nic import Nic, NicServer, control_call
from vfnic.device.policy import VfPolicy
from vfnic.errors import PolicyError, UsageError
from vfnic.guestdriver.bus import HostBus
from vfnic.guestdriver.driver import VfDriver
from vfnic.regs import table as T

ETH_TEST = 0x88B5
LINK = 10  # Mbit/s: low enough for a Python NIC on a loaded machine to saturate
WINDOW = 3.0  # seconds measured, after WARMUP
WARMUP = 0.7
FAR_MAC = bytes.fromhex("02aaaaaaaa01")  # on no function: out of the uplink
FRAME = 1514



def mbps(octets: int, seconds: float) -> float:
    return octets * 8 / seconds / 1e6


# -- the allocation: max-min fair with floors and caps -----------------------------------


flows_st = st.lists(
    st.tuples(st.integers(0, 100), st.integers(0, 100)).map(
        lambda fc: (float(min(fc)), float(max(fc)))), min_size=1, max_size=9)


@given(flows_st, st.integers(1, 400))
def test_allocation_is_max_min_fair_with_floors_and_caps(
        flows: list[tuple[float, float]], capacity: int) -> None:
    floors = sum(f for f, _ in flows)
    if floors > capacity:  # refused by the settings' check: never asked
        return
    rates = allocate(float(capacity), flows)
    eps = 1e-6 * (capacity + 1)
    for (f, c), r in zip(flows, rates, strict=True):
        assert f - eps <= r <= c + eps
    # work-conserving: the whole line, or every cap
    assert abs(sum(rates) - min(float(capacity), sum(c for _, c in flows))) <= eps * len(flows)
    # max-min fair: no flow below its cap has less than a flow above its floor
    for (_, ci), ri in zip(flows, rates, strict=True):
        for (fj, _), rj in zip(flows, rates, strict=True):
            if ri < ci - eps and rj > fj + eps:
                assert ri >= rj - eps


def test_allocation_examples() -> None:
    assert allocate(10, [(0, 10)] * 3) == pytest.approx([10 / 3] * 3)
    assert allocate(10, [(6, 10), (0, 10), (0, 10)]) == pytest.approx([6, 2, 2])
    assert allocate(10, [(6, 10), (0, 10), (0, 1)]) == pytest.approx([6, 3, 1])
    assert allocate(10, [(2, 10), (0, 10), (0, 10)]) == pytest.approx([10 / 3] * 3)
    assert allocate(10, [(0, 2), (0, 3)]) == [2, 3]  # caps below the line: no contention


# -- the scheduler in simulated time: what each backlogged function gets --------------------


class SimQueue:
    def __init__(self, backlogged: bool) -> None:
        self.backlogged = backlogged

    def tx_backlogged(self) -> bool:
        return self.backlogged


class SimFunction:
    """What the scheduler looks at: the host's settings and whether frames wait."""

    def __init__(self, min_rate: int, max_rate: int, backlogged: bool) -> None:
        self.policy = VfPolicy(min_tx_rate=min_rate, max_tx_rate=max_rate)
        self.policy.bucket.configure(max_rate, now=0.0)
        self.datapath = SimQueue(backlogged)


def simulate(link: int, flows: list[tuple[int, int, bool]], jitter: list[float],
             seconds: float = 4.0, skip: float = 1.0, size: int = 1514) -> list[float]:
    """Mbit/s each function sends over [skip, seconds] when every backlogged one asks
    for its next frame as soon as the scheduler lets it (plus a timer's lateness,
    cycling through ``jitter``)."""
    clock = [0.0]
    egress = EgressScheduler(link, clock=lambda: clock[0])
    fns = [SimFunction(*f) for f in flows]
    sent = [0] * len(fns)
    due = [(0.0, i) for i, f in enumerate(fns) if f.datapath.backlogged]
    heapq.heapify(due)
    late = 0
    while due:
        t, i = heapq.heappop(due)
        if t > seconds:
            break
        clock[0] = t
        wait = egress.take(cast(Any, fns[i]), size, True)
        if not wait:
            if t >= skip:
                sent[i] += size
            heapq.heappush(due, (t, i))
        else:
            late += 1
            # a timer fires 1 us late at best (and float time must move on)
            heapq.heappush(due, (t + max(wait, 1e-6) + jitter[late % len(jitter)], i))
    return [mbps(n, seconds - skip) for n in sent]


sim_flow = st.tuples(st.integers(0, 20), st.integers(0, 40), st.booleans()).map(
    lambda f: (f[0], max(f[0], f[1]) if f[1] else 0, f[2]))


@settings(max_examples=25, deadline=None)
@example(38, [(0, 13, True)], [0.0037])  # a 2 ms max_tx_rate burst gave 5.4 Mbit/s here
@example(20, [(12, 0, True), (0, 0, True), (0, 2, True), (5, 0, False)], [0.002, 0.0])
@given(st.integers(5, 40), st.lists(sim_flow, min_size=1, max_size=4),
       st.lists(st.floats(0, 0.004), min_size=1, max_size=5))
def test_simulated_contention_gives_each_its_allocation(
        link: int, flows: list[tuple[int, int, bool]], jitter: list[float]) -> None:
    if sum(f[0] for f in flows) > link:  # refused by the settings' check
        return
    rates = simulate(link, flows, jitter)
    active = [i for i, f in enumerate(flows) if f[2]]
    want = allocate(float(link), [(float(flows[i][0]), float(flows[i][1] or link))
                                  for i in active])
    for i, w in zip(active, want, strict=True):
        mn, mx, _ = flows[i]
        assert rates[i] >= mn * 0.98, (rates, want)  # the guarantee
        if mx:
            assert rates[i] <= mx * 1.02, (rates, want)  # the cap
        assert rates[i] == pytest.approx(w, rel=0.05, abs=0.1), (rates, want)
    assert all(rates[i] == 0 for i in range(len(flows)) if i not in active)
    assert sum(rates) <= link * 1.02  # the line
    assert sum(rates) >= min(link, sum(w for w in want)) * 0.98  # work-conserving


# -- the settings' checks -------------------------------------------------------------------


def test_min_rates_must_fit_in_the_link_speed() -> None:
    nic = Nic(3, link_speed=100)
    nic.set_vf(0, {"min_tx_rate": 60})
    nic.set_vf(1, {"min_tx_rate": 40})
    with pytest.raises(PolicyError, match="sum to 101 Mbit/s, more than the link speed"):
        nic.set_vf(2, {"min_tx_rate": 1})
    nic.set_vf(0, {"min_tx_rate": 50})  # lowering one makes room
    nic.set_vf(2, {"min_tx_rate": 10})
    with pytest.raises(PolicyError, match="exceeds max_tx_rate"):
        nic.set_vf(2, {"max_tx_rate": 5})
    assert [v.policy.min_tx_rate for v in nic.vfs] == [50, 40, 10]
    for bad in ("-1", "x", "100001", True):
        with pytest.raises(PolicyError, match="min_tx_rate must be between"):
            nic.set_vf(2, {"min_tx_rate": bad})
    for bad_speed in (-1, 100_001):
        with pytest.raises(UsageError, match="link speed"):
            Nic(1, link_speed=bad_speed)
    # without a line rate nothing contends: any min rate (each <= 100000) is kept
    free = Nic(2)
    free.set_vf(0, {"min_tx_rate": 90_000})
    free.set_vf(1, {"min_tx_rate": 90_000})
    assert free.egress.rate == 0


# -- a real server, blasting VFs -----------------------------------------------------------


@pytest.fixture
def nic() -> Iterator[NicServer]:
    with tap_nic_server("vfe", num_vfs=3, link_speed=LINK) as server:
        yield server


class Blaster:
    """A VF driver keeping its TX ring full of frames for the uplink, in a thread."""

    def __init__(self, server: NicServer, vf: int, dst: bytes = FAR_MAC,
                 fd_backed: bool = True) -> None:
        bus = HostBus(str(server.dir / f"vf{vf}.sock"), fd_backed=fd_backed)
        self.drv = VfDriver(bus, 64)
        self.drv.init()
        self.frame = dst + self.drv.mac + ETH_TEST.to_bytes(2, "big") + bytes(FRAME - 14)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.drv.tx_batch([self.frame] * 16):
                    time.sleep(0.002)  # ring full: the device holds our frames
        except BaseException as exc:  # reported by the test
            self.error = exc

    def start(self) -> Blaster:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.drv.bus.close()
        assert self.error is None, self.error


def octets(fn_bank_owner: NicServer, vf: int) -> int:
    fn = fn_bank_owner.nic.vfs[vf]
    with fn.lock:
        return fn.bank.get(T.GOTCH) << 32 | fn.bank.get(T.GOTCL)


def wire_octets(server: NicServer) -> int:
    uplink = server.nic.switch.uplink
    assert uplink is not None
    return int(Path(f"/sys/class/net/{uplink.name}/statistics/rx_bytes").read_text())


def measure(server: NicServer, vfs: list[int], window: float = WINDOW
            ) -> tuple[list[float], float]:
    """Mbit/s each VF sent, and what the wire carried, over ``window`` seconds."""
    time.sleep(WARMUP)
    before = [octets(server, v) for v in vfs]
    wire0, t0 = wire_octets(server), time.monotonic()
    time.sleep(window)
    after = [octets(server, v) for v in vfs]
    wire1, t1 = wire_octets(server), time.monotonic()
    return ([mbps(a - b, t1 - t0) for a, b in zip(after, before, strict=True)],
            mbps(wire1 - wire0, t1 - t0))


Blast = Callable[..., Blaster]


@pytest.fixture
def blast(nic: NicServer) -> Iterator[Blast]:
    started: list[Blaster] = []

    def start(vf: int, dst: bytes = FAR_MAC, fd_backed: bool = True) -> Blaster:
        b = Blaster(nic, vf, dst, fd_backed).start()
        started.append(b)
        return b

    yield start
    for b in started:
        b.close()


# Tolerances, over WINDOW seconds: a guaranteed or capped rate within 10 % (plus a
# 20 ms burst of credit); the line within 10 % (it carries what the VFs sent).
TOL = 0.10


def test_a_vf_with_min_tx_rate_gets_it_and_the_others_share_the_rest(
        nic: NicServer, blast: Blast) -> None:
    for vf in range(3):
        blast(vf)
    fair, wire = measure(nic, [0, 1, 2])
    assert sum(fair) == pytest.approx(LINK, rel=TOL), fair
    assert wire >= sum(fair) * 0.95  # the frames did leave on the TAP (+ nothing else)
    for rate in fair:  # no settings: a third each
        assert rate == pytest.approx(LINK / 3, rel=0.25), fair
    control_call(nic.dir, {"op": "vf-set", "vf": 0, "settings": {"min_tx_rate": 6}})
    rates, wire = measure(nic, [0, 1, 2])
    shares = [v["tx_share"] for v in control_call(nic.dir, {"op": "link-show"})["vfs"]]
    assert shares == pytest.approx([6, 2, 2], abs=0.01)  # all three still blasting
    assert rates[0] >= 6 * (1 - TOL), rates  # its floor, above its fair share
    assert sum(rates) == pytest.approx(LINK, rel=TOL), rates
    assert rates[1] == pytest.approx(rates[2], rel=0.35), rates  # the rest, shared
    assert rates[1] + rates[2] == pytest.approx(LINK - 6, rel=0.3), rates


def test_the_guarantee_holds_with_dma_through_messages(nic: NicServer, blast: Blast) -> None:
    """Guest memory without an fd (QEMU without share=on): the device's DMA goes
    through DMA_READ/DMA_WRITE messages, and a paced queue is resumed by the VF's
    serving thread (its wake), not by the timer."""
    nic.nic.set_vf(0, {"min_tx_rate": 6})
    blast(0, fd_backed=False)
    blast(1, fd_backed=False)
    blast(2)
    rates, _ = measure(nic, [0, 1, 2])
    assert rates[0] >= 6 * (1 - TOL), rates
    assert rates[1] == pytest.approx(2, rel=0.35), rates
    assert sum(rates) == pytest.approx(LINK, rel=TOL), rates


def test_max_tx_rate_alone_on_fd_less_memory_does_not_stall() -> None:
    """Without a link speed: a VF paced by max_tx_rate whose memory has no fd. Its
    serving thread's wake ran DMA messages that read what the socket held; it then
    blocked in recv on the data it had already read (0 Mbit/s before the fix)."""
    folder = tempfile.mkdtemp(prefix="vfegm-", dir="/tmp")
    server = NicServer(folder, num_vfs=1)
    server.start()
    try:
        server.nic.set_vf(0, {"max_tx_rate": 5})
        b = Blaster(server, 0, fd_backed=False).start()
        try:
            (rate,), _ = measure_gotc_only(server)
        finally:
            b.close()
        assert rate == pytest.approx(5, rel=TOL), rate
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def measure_gotc_only(server: NicServer) -> tuple[list[float], None]:
    time.sleep(WARMUP)
    before, t0 = octets(server, 0), time.monotonic()
    time.sleep(WINDOW)
    return [mbps(octets(server, 0) - before, time.monotonic() - t0)], None


def test_max_tx_rate_caps_a_vf_and_its_unused_share_goes_to_the_others(
        nic: NicServer, blast: Blast) -> None:
    nic.nic.set_vf(0, {"min_tx_rate": 5})
    nic.nic.set_vf(2, {"max_tx_rate": 1})
    for vf in range(3):
        blast(vf)
    rates, _ = measure(nic, [0, 1, 2])
    assert rates[0] >= 5 * (1 - TOL), rates
    assert rates[2] <= 1 * (1 + TOL) + 0.1, rates
    # vf1 takes what vf2 may not: 10 - 5 - 1 = 4 (work-conserving)
    assert rates[1] == pytest.approx(LINK - 5 - 1, rel=0.25), rates
    assert sum(rates) == pytest.approx(LINK, rel=TOL), rates


def test_an_idle_vfs_guarantee_is_not_wasted(nic: NicServer, blast: Blast) -> None:
    nic.nic.set_vf(0, {"min_tx_rate": 8})  # vf0 sends nothing
    blast(1)
    blast(2)
    rates, _ = measure(nic, [1, 2])
    assert sum(rates) == pytest.approx(LINK, rel=TOL), rates
    assert rates[0] == pytest.approx(rates[1], rel=0.35), rates


def test_the_line_rate_bounds_a_single_vf_and_vf_to_vf_is_not_scheduled(
        nic: NicServer, blast: Blast) -> None:
    far = blast(0)
    (alone,), wire = measure(nic, [0])
    assert alone == pytest.approx(LINK, rel=TOL), alone
    assert wire == pytest.approx(LINK, rel=TOL), wire
    far.stop.set()
    far.thread.join(5)
    # vf1 -> vf2 is switched inside the NIC: the uplink's line rate does not apply
    d2 = VfDriver(HostBus(str(nic.dir / "vf2.sock"), fd_backed=True), 256)
    d2.init()
    try:
        inner = blast(1, d2.mac)
        deadline = time.monotonic() + WARMUP + WINDOW
        got = 0
        start = octets(nic, 1)
        t0 = time.monotonic()
        while time.monotonic() < deadline:
            got += len(d2.rx_poll())
            time.sleep(0.001)
        internal = mbps(octets(nic, 1) - start, time.monotonic() - t0)
        assert inner.error is None
        assert got > 0 and internal > LINK * 1.5, internal
        assert not nic.nic.egress.shares.get(nic.nic.vfs[1])
    finally:
        d2.bus.close()


def test_rates_survive_a_vf_reset_and_a_new_client(nic: NicServer) -> None:
    nic.nic.set_vf(1, {"min_tx_rate": 4, "max_tx_rate": 8})
    d1 = VfDriver(HostBus(str(nic.dir / "vf1.sock"), fd_backed=True), 32)
    d1.init()
    d1.bus.close()  # a guest reboot: a new client resets the VF
    d1 = VfDriver(HostBus(str(nic.dir / "vf1.sock"), fd_backed=True), 32)
    d1.init()
    d1.bus.close()
    info = control_call(nic.dir, {"op": "link-show"})
    assert (info["vfs"][1]["min_tx_rate"], info["vfs"][1]["max_tx_rate"]) == (4, 8)
    assert info["pf"]["speed"] == LINK


def test_a_stale_member_gives_its_share_back() -> None:
    """A VF reset while its frames waited (no transmit notices): pruned."""
    nic = Nic(2, link_speed=LINK)
    egress: EgressScheduler = nic.egress
    a, b = nic.vfs
    egress.join(a)
    egress.join(b)
    assert egress.allocated[b] == pytest.approx(LINK * 1e6 / 8 / 2)
    egress._pruned = 0.0  # due: the next decision looks for members without frames
    assert egress.take(b, 60, True) == 0.0  # neither has frames on its rings (none enabled)
    assert list(egress.shares) == [b]  # a is gone; b asked, so it is back, alone
    assert egress.allocated[b] == pytest.approx(LINK * 1e6 / 8)


# -- the command line -------------------------------------------------------------------------


def vfnic(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vfnic.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_link_speed_and_rate_errors() -> None:
    folder = tempfile.mkdtemp(prefix="vfegc-", dir="/tmp")
    d = Path(folder) / "nic"
    for bad in ("-5", "100001", "fast", "1.5"):
        out = vfnic("serve", "--dir", str(d), "--link-speed", bad)
        assert out.returncode != 0
        assert out.stderr.strip().count("\n") == 0 and "--link-speed" in out.stderr, out.stderr
        assert not d.exists()  # refused before anything was created
    proc = subprocess.Popen([sys.executable, "-m", "vfnic.cli", "serve", "--dir", str(d),
                             "--vfs", "2", "--link-speed", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (d / "control.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        ok = vfnic("link", "set", str(d), "vf", "0", "min_tx_rate", "70", "max_tx_rate", "80")
        assert ok.returncode == 0, ok.stderr
        for words, reason in (
                (("vf", "1", "min_tx_rate", "31"), "more than the link speed (100 Mbit/s)"),
                (("vf", "1", "min_tx_rate", "20", "max_tx_rate", "10"), "exceeds max_tx_rate"),
                (("vf", "1", "min_tx_rate", "fast"), "min_tx_rate must be between"),
                (("vf", "1", "max_tx_rate", "-3"), "max_tx_rate must be between")):
            out = vfnic("link", "set", str(d), *words)
            assert out.returncode != 0, words
            assert reason in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
        shown = vfnic("link", "show", str(d))
        assert shown.returncode == 0
        lines = shown.stdout.splitlines()
        assert "speed 100Mb/s" in lines[0]
        assert "max_tx_rate 80Mbps, min_tx_rate 70Mbps" in lines[1]
        assert "min_tx_rate" not in lines[2]
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_destinations_rates_apply_after_a_migration() -> None:
    from vfnic.migrate import vfstate

    src_nic, dst_nic = Nic(1, nic_id=1, link_speed=100), Nic(1, nic_id=2, link_speed=50)
    src_nic.set_vf(0, {"min_tx_rate": 80, "max_tx_rate": 90})
    dst_nic.set_vf(0, {"min_tx_rate": 20})
    src, dst = src_nic.vfs[0], dst_nic.vfs[0]
    vfstate.load(dst, vfstate.save(src))  # as dbus-vmstate's Save and Load do
    assert (dst.policy.min_tx_rate, dst.policy.max_tx_rate) == (20, 0)  # the host's own
    assert dst_nic.egress.link_speed == 50
