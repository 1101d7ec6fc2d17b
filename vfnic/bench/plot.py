"""The bench's plots: docs/bench/migration.png and virsh.png (migration time, VM
downtime and network downtime by configuration, log scale), kmod.png and datapath.png
(guest packets/s by direction and frame, and the ping's RTT, by guest NIC); grouped
bars of medians with min–max whiskers."""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WHISKERS = "#333333"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar(ax: Any, x: float, vals: Sequence[float], width: float, color: str,
         text: Callable[[float], str], floor: float = 0.0, above: float = 1.02) -> float:
    """One bar: the median of ``vals`` (at least ``floor``) with min–max whiskers and
    ``text(median)`` written above; returns the highest value."""
    med = max(statistics.median(vals), floor)
    ax.bar(x, med, width, color=color, yerr=[[med - max(min(vals), floor)], [max(vals) - med]],
           capsize=2, ecolor=WHISKERS)
    ax.text(x, max(vals) * above, text(med), ha="center", va="bottom", fontsize=6.5)
    return max(vals)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)


def migration_plot(results: dict[str, Any], configs: Sequence[Any], path: Path,
                   window: float,
                   title: str = "Live migration of a TCG guest: vfnic VF vs virtio-net vs no NIC"
                   ) -> None:
    plt = _pyplot()
    metrics = (("total_ms", "migration time", "#4c72b0"),
               ("vm_downtime_ms", "VM downtime (QEMU)", "#dd8452"),
               ("net_downtime_ms", "network downtime (ping)", "#55a868"))
    labels = []
    for c in configs:
        labels.append(c.label.replace(", ", ",\n"))
    n = len(metrics)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(11, 5.2), dpi=110)
    ymax = 1.0
    for j, (attr, _, color) in enumerate(metrics):
        for i, c in enumerate(configs):
            runs = [r for r in results.get(c.key, []) if r.ok]
            x = i - 0.4 + width * (j + 0.5)
            if attr == "net_downtime_ms":
                if c.guest == "none":
                    ax.text(x, 1.2, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
                    continue
                lost = sum(1 for r in runs if r.recovered is False)
                if lost and 2 * lost <= len(runs):  # a minority: the bar is the others'
                    ax.text(x, 0.6, f"{lost}/{len(runs)} no\nrecovery", ha="center",
                            va="bottom", fontsize=5.5, color="black",
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
                elif lost:  # most runs never recovered: a hatched bar up to the window
                    h = window * 1000
                    ax.bar(x, h, width, color="white", edgecolor=color, hatch="//",
                           label=None)
                    ax.text(x, h * 1.08, f"no recovery\nin {window:.0f} s\n"
                            f"({lost}/{len(runs)} runs)", ha="center", va="bottom",
                            fontsize=6, color=color)
                    ymax = max(ymax, h * 4)
                    continue
            vals = [float(getattr(r, attr)) for r in runs if getattr(r, attr) is not None]
            if not vals:
                ax.text(x, 1.2, "failed" if not runs else "–", ha="center", va="bottom",
                        fontsize=7, rotation=90)
                continue
            top = _bar(ax, x, vals, width, color, "{:.0f}".format, floor=0.5, above=1.08)
            ymax = max(ymax, top * 3)
    # one legend entry per metric even if its first configuration had no bar
    handles = [plt.Rectangle((0, 0), 1, 1, color=col) for _, _, col in metrics]
    ax.legend(handles, [m[1] for m in metrics], loc="upper left", fontsize=8, ncols=3)
    ax.set_yscale("log")
    ax.set_ylim(0.5, ymax)
    ax.set_ylabel("ms (log scale; median, whiskers min–max)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    _save(fig, path)


def rate_plot(path: Path, rows: Sequence[str], nics: Sequence[tuple[str, str]],
              received: dict[str, dict[str, list[float]]], ping: dict[str, list[float]],
              title: str) -> None:
    """Received packets/s per row (direction and frame) and guest NIC, and beside them
    the ping's average RTT per guest NIC. ``nics``: (key, label) in plot order;
    ``received[key][row]`` and ``ping[key]``: the values of the rounds (one or more)."""
    plt = _pyplot()
    colors = ("#55a868", "#8172b2", "#4c72b0", "#dd8452", "#c44e52")
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110,
                                  gridspec_kw={"width_ratios": [3.2, 1]})
    width = 0.8 / max(len(nics), 1)
    top = 1.0
    for j, (key, _) in enumerate(nics):
        color = colors[j % len(colors)]
        for i, row in enumerate(rows):
            vals = received.get(key, {}).get(row, [])
            x = i - 0.4 + width * (j + 0.5)
            if not vals:
                ax.text(x, 0, "–", ha="center", va="bottom", fontsize=7)
                continue
            top = max(top, _bar(ax, x, vals, width, color, lambda m: f"{m / 1000:.1f}k"))
        if ping.get(key):
            _bar(axp, j, ping[key], 0.6, color, "{:.2f}".format)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[j % len(colors)])
               for j in range(len(nics))]
    ax.legend(handles, [n for _, n in nics], loc="upper right", fontsize=8)
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("received packets/s (median, whiskers min–max)")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    axp.set_xticks(range(len(nics)))
    axp.set_xticklabels([textwrap.fill(n, 13) for _, n in nics], fontsize=6.5)
    axp.set_ylabel("ping RTT avg, ms")
    axp.set_title("ping, peer → guest", fontsize=10)
    axp.grid(axis="y", alpha=0.3)
    _save(fig, path)
