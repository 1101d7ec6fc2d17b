"""The bench's plots: docs/bench/migration.png and virsh.png (migration time, VM
downtime and network downtime by configuration, log scale), kmod.png and datapath.png
(guest packets/s by direction and frame, and the ping's RTT, by guest NIC); grouped
bars of medians with min–max whiskers."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _median(vals: Sequence[float]) -> float:
    v = sorted(vals)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def migration_plot(results: dict[str, Any], configs: Sequence[Any], path: Path,
                   window: float,
                   title: str = "Live migration of a TCG guest: vfnic VF vs virtio-net vs no NIC"
                   ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    for j, (attr, name, color) in enumerate(metrics):
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
            med = max(_median(vals), 0.5)
            err = [[med - max(min(vals), 0.5)], [max(vals) - med]]
            ax.bar(x, med, width, color=color, yerr=err, capsize=2, ecolor="#333333",
                   label=name if i == 0 else None)
            ax.text(x, max(vals) * 1.08, f"{med:.0f}", ha="center", va="bottom", fontsize=6.5)
            ymax = max(ymax, max(vals) * 3)
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def rate_plot(path: Path, rows: Sequence[str], nics: Sequence[tuple[str, str]],
              received: dict[str, dict[str, list[float]]], ping: dict[str, list[float]],
              title: str) -> None:
    """Received packets/s per row (direction and frame) and guest NIC, and beside them
    the ping's average RTT per guest NIC. ``nics``: (key, label) in plot order;
    ``received[key][row]`` and ``ping[key]``: the values of the rounds (one or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("#55a868", "#8172b2", "#4c72b0", "#dd8452", "#c44e52")
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110,
                                  gridspec_kw={"width_ratios": [3.2, 1]})
    width = 0.8 / max(len(nics), 1)
    top = 1.0
    for j, (key, name) in enumerate(nics):
        color = colors[j % len(colors)]
        for i, row in enumerate(rows):
            vals = received.get(key, {}).get(row, [])
            x = i - 0.4 + width * (j + 0.5)
            if not vals:
                ax.text(x, 0, "–", ha="center", va="bottom", fontsize=7)
                continue
            med = _median(vals)
            ax.bar(x, med, width, color=color, yerr=[[med - min(vals)], [max(vals) - med]],
                   capsize=2, ecolor="#333333", label=name if i == 0 else None)
            ax.text(x, max(vals) * 1.02, f"{med / 1000:.1f}k", ha="center", va="bottom",
                    fontsize=6.5)
            top = max(top, max(vals))
        pv = ping.get(key, [])
        if pv:
            med = _median(pv)
            axp.bar(j, med, 0.6, color=color, yerr=[[med - min(pv)], [max(pv) - med]],
                    capsize=2, ecolor="#333333")
            axp.text(j, max(pv) * 1.02, f"{med:.2f}", ha="center", va="bottom", fontsize=7)
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
