"""What every benchmark section shares: progress lines, statistics, the machine's
description, a `vfnic serve` child process, and the results a section hands to the
report (markdown tables plus the raw numbers)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vfnic.host.process import stop_process

T = TypeVar("T")
_T0 = time.monotonic()


def log(msg: str) -> None:
    """One progress line on stderr, with the time since the bench started."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- statistics ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Stat | None:
        vals = [v for v in values if v is not None]
        if not vals:
            return None
        return Stat(statistics.median(vals), min(vals), max(vals), len(vals))

    def text(self, fmt: str = "{:.1f}") -> str:
        if self.n == 1:
            return fmt.format(self.median)
        return f"{fmt.format(self.median)} ({fmt.format(self.min)}–{fmt.format(self.max)})"


def stat_text(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    s = Stat.of(values)
    return "–" if s is None else s.text(fmt)


def percentile(values: Sequence[float], p: float) -> float:
    vals = sorted(values)
    if not vals:
        return float("nan")
    k = min(len(vals) - 1, max(0, round(p / 100 * (len(vals) - 1))))
    return vals[k]


def rotated_rounds(configs: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """(round, configuration): every round has each configuration once, its order
    rotated round by round, so that configurations share the machine's moments and
    none is always first (e.g. always the one migrating a -> b)."""
    for i in range(rounds):
        k = i % len(configs)
        for cfg in [*configs[k:], *configs[:k]]:
            yield i, cfg


def met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**not met**")


# -- tables and section results ------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One section of BENCHMARKS.md: markdown body, raw numbers, failures."""

    key: str
    title: str
    parts: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    foreign: str = ""  # ForeignCpu.text() over the section

    def add(self, text: str) -> None:
        self.parts.append(text.strip("\n"))

    def fail(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {type(exc).__name__}: {exc}"
        self.failures.append(msg)
        log(f"FAILED {msg}")
        traceback.print_exc(file=sys.stderr)

    def attempt(self, what: str, fn: Callable[[], T]) -> T | None:
        """Run one measurement; a failure is recorded and the section goes on."""
        try:
            return fn()
        except Exception as exc:  # reported; the rest must go on
            self.fail(what, exc)
            return None


# -- the machine ---------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, str]:
    from vfnic.host import runtime
    from vfnic.host.vm import accel as vm_accel

    try:
        qemu = runtime.qemu_version()
        accel = vm_accel()
    except Exception as exc:  # described, not fatal here
        qemu, accel = f"unavailable ({exc})", "?"
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = "?"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "debian": debian,
        "python": platform.python_version(),
        "qemu": qemu,
        "accel": accel.upper(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


# -- processes -----------------------------------------------------------------------


@contextlib.contextmanager
def short_tmpdir(prefix: str) -> Iterator[Path]:
    """A temporary folder with a short path (UNIX socket paths hold 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serve(directory: Path, vfs: int = 2, cpus: str | None = None,
          nic_id: int = 0, busy_poll_us: int = 0, link_speed: int = 0) -> Iterator[Path]:
    """`python -m vfnic.cli serve` as a separate process (optionally pinned with taskset)."""
    directory.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "vfnic.cli", "serve", "--dir", str(directory),
            "--vfs", str(vfs), "--nic-id", str(nic_id), "--busy-poll", str(busy_poll_us)]
    if link_speed:
        argv += ["--link-speed", str(link_speed)]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    logf = open(directory / "serve.log", "wb")  # closed below
    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not (directory / "control.sock").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vfnic serve did not start (see {directory}/serve.log)")
            time.sleep(0.02)
        yield directory
    finally:
        stop_process(proc)
        logf.close()


def worker_argv(*args: str, netns: str | None = None) -> list[str]:
    """argv of `python -m vfnic.bench.worker ...`, optionally inside a network namespace."""
    argv = [sys.executable, "-m", "vfnic.bench.worker", *args]
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def wait_console(vm: Any, pattern: str, timeout: float, what: str) -> str:
    """Wait until a regex shows up in a VM's console log; returns the log text."""
    import re

    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = ""
        if vm.console_log.exists():
            text = vm.console_log.read_text(errors="replace")
        if rx.search(text):
            return text
        if not vm.running():
            raise RuntimeError(f"QEMU exited while waiting for {what} "
                               f"(console: {vm.console_log})")
        if time.monotonic() > deadline:
            tail = text[-400:].replace("\r", "")
            raise RuntimeError(f"no {what} within {timeout:.0f} s; console tail: {tail!r}")
        time.sleep(0.2)


class Worker:
    """A `vfnic.bench.worker` child: JSON lines on stdout, stopped by pid."""

    def __init__(self, argv: list[str], ready_timeout: float | None = 60.0,
                 show_stderr: bool = False) -> None:
        import json

        self.argv = argv
        # Unbuffered: the ready line is read byte by byte, nothing is held back
        # from communicate() later. show_stderr: its progress goes to our stderr.
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                     stderr=None if show_stderr else subprocess.PIPE,
                                     bufsize=0)
        self.ready: dict[str, Any] = {}
        self._json = json
        if ready_timeout is not None:
            self._wait_ready(ready_timeout)

    def _readline(self, timeout: float) -> str:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return ""
        return bytes(self.proc.stdout.readline()).decode()

    def _wait_ready(self, timeout: float) -> None:
        line = self._readline(timeout)
        if not line:
            err = self._stderr()
            self.kill()
            raise RuntimeError(f"worker {' '.join(self.argv[-6:])} not ready: {err[-600:]}")
        self.ready = dict(self._json.loads(line))

    def _stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        assert self.proc.stderr is not None
        return bytes(self.proc.stderr.read()).decode(errors="replace")

    def result(self, stop: bool = True, timeout: float = 60.0) -> dict[str, Any]:
        """Stop the worker (SIGTERM) if asked, and return its result line."""
        if stop and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out_b, err_b = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"worker {self.argv[-6:]} did not finish in {timeout:.0f} s") \
                from None
        out, err = out_b.decode(errors="replace"), (err_b or b"").decode(errors="replace")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if self.proc.returncode != 0 or not lines:
            raise RuntimeError(f"worker {' '.join(self.argv[-6:])} failed "
                               f"(status {self.proc.returncode}): {err.strip()[-800:]}")
        return dict(self._json.loads(lines[-1]))

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 5.0)


# -- other load on the machine -----------------------------------------------------------

_PF_KTHREAD = 0x00200000


def _proc_table() -> dict[int, tuple[int, int, int, int]]:
    """pid -> (ppid, flags, start time, utime + stime) in clock ticks, from /proc."""
    out: dict[int, tuple[int, int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(")") + 2 :].split()
        # fields[0] is field 3 (state): ppid 4, flags 9, utime 14, stime 15, starttime 22
        out[int(entry)] = (int(fields[1]), int(fields[6]), int(fields[19]),
                           int(fields[11]) + int(fields[12]))
    return out


class ForeignCpu:
    """CPU time used by processes outside this process tree (kernel threads left out),
    so that a result disturbed by something else running on the machine shows it."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.start = self._foreign()

    @staticmethod
    def _foreign() -> dict[tuple[int, int], int]:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _flags, _st, _cpu) in table.items():
            children.setdefault(ppid, []).append(pid)
        mine = {os.getpid()}
        todo = [os.getpid()]
        while todo:
            for c in children.get(todo.pop(), []):
                if c not in mine:
                    mine.add(c)
                    todo.append(c)
        return {(pid, st): cpu for pid, (ppid, flags, st, cpu) in table.items()
                if pid not in mine and not flags & _PF_KTHREAD and pid != 2 and ppid != 2}

    def text(self) -> str:
        now = self._foreign()
        ticks = sum(cpu - self.start.get(key, 0) for key, cpu in now.items())
        secs = max(0, ticks) / os.sysconf("SC_CLK_TCK")
        wall = max(time.monotonic() - self.t0, 1e-3)
        share = secs / wall
        return (f"{secs:.1f} CPU-s ({100 * share:.0f} % of one CPU on average) "
                f"used by other processes meanwhile"
                + (" (**more than 5 %: these results may be disturbed**)"
                   if share > 0.05 else ""))
