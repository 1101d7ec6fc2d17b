"""BENCHMARKS.md: a fixed header, then one block per section between markers, so
that `--only SECTION` replaces that section and keeps the others (each block says
when, how and on what it was measured)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from vfnic.bench.common import Section

ORDER = ("regs", "datapath", "migration", "virsh", "isolation", "kmod")
TITLES = {"regs": "1. Register access", "datapath": "2. Datapath",
          "migration": "3. Live migration", "virsh": "4. virsh migrate (libvirt)",
          "isolation": "5. Isolation and hardening",
          "kmod": "6. Guest kernel driver (vfnic_vf) vs Python driver vs virtio-net"}

HEADER = """# vfnic benchmarks

Produced by `make bench` (`python -m vfnic.bench`; one section alone:
`python -m vfnic.bench --only regs|datapath|migration|virsh|isolation|kmod`). Every number below was
measured by `vfnic/bench/` in the run named at the top of its section, on the
machine described there; nothing is copied from elsewhere. Guests run under TCG
(no KVM), so absolute guest numbers are those of an emulated CPU; what matters
is the comparison between rows measured in the same run.
"""


def begin(key: str) -> str:
    return f"<!-- bench:{key}:begin -->"


def end(key: str) -> str:
    return f"<!-- bench:{key}:end -->"


def machine_line(m: dict[str, str]) -> str:
    return (f"{m['nproc']} CPUs (`nproc`) × {m['cpu']} (`/proc/cpuinfo`), Linux "
            f"{m['kernel']}, Debian {m['debian']}, Python {m['python']}, {m['qemu']}, "
            f"accelerator **{m['accel']}**")


def render(sec: Section, machine: dict[str, str], command: str, load_end: str) -> str:
    out = [begin(sec.key), f"## {TITLES.get(sec.key, sec.title)}", "",
           f"Measured {machine['date']} by `{command}` in {sec.seconds:.0f} s "
           f"(this section), on {machine_line(machine)}; load average "
           f"{machine['load']} at the start of the run, {load_end} at the end of this "
           f"section" + (f"; {sec.foreign}" if sec.foreign else "") + ".", ""]
    for part in sec.parts:
        out += [part, ""]
    if sec.failures:
        out += ["**Failed in this run** (the rest went on):", ""]
        out += [f"- {f}" for f in sec.failures]
        out.append("")
    out.append(end(sec.key))
    return "\n".join(out)


def placeholder(key: str) -> str:
    return "\n".join([begin(key), f"## {TITLES[key]}", "",
                      f"Not measured yet: `python -m vfnic.bench --only {key}`.", "", end(key)])


def existing_blocks(text: str) -> dict[str, str]:
    blocks = {}
    for key in ORDER:
        m = re.search(re.escape(begin(key)) + r".*?" + re.escape(end(key)), text, re.S)
        if m:
            blocks[key] = m.group(0)
    return blocks


def write(path: Path, sections: Sequence[tuple[Section, str]], machine: dict[str, str],
          command: str) -> None:
    """Write BENCHMARKS.md: the new sections replace their blocks; the other blocks and
    all text outside the markers (the fixed prose that explains the numbers) stay."""
    text = path.read_text() if path.exists() else HEADER
    new = {sec.key: render(sec, machine, command, load) for sec, load in sections}
    blocks = existing_blocks(text)
    for i, key in enumerate(ORDER):
        if key in blocks:
            if key in new:
                text = text.replace(blocks[key], new[key])
            continue
        prev = [k for k in ORDER[:i] if k in blocks]
        after = text.index(end(prev[-1])) + len(end(prev[-1])) if prev else len(text)
        text = text[:after] + "\n\n" + (new.get(key) or placeholder(key)) + text[after:]
        blocks = existing_blocks(text)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)
