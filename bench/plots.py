"""PNG plots of one results dict (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_all(res: dict[str, Any], out: Path) -> list[Path]:
    made: list[Path] = []
    if "consume" in res:
        made.append(_consume(res["consume"], out / "consume.png"))
    if "latency" in res:
        made.append(_latency(res["latency"], out / "latency.png"))
    if "publish" in res:
        made.append(_publish(res["publish"], out / "publish.png"))
    if "footprint" in res:
        made.append(_footprint(res["footprint"], out / "footprint.png"))
    return made


def _consume(c: dict[str, Any], path: Path) -> Path:
    keys = ["base_each", "base_multi50", "sc_b1", "sc_b10", "sc_b50", "sc_each"]
    labels = [
        "direct\nack each",
        "direct\nack x50",
        "sidecar\nbatch 1",
        "sidecar\nbatch 10",
        "sidecar\nbatch 50",
        "sidecar 1-by-1\nmessages()",
    ]
    fig, axes = plt.subplots(1, len(c), figsize=(5.5 * len(c), 4), squeeze=False)
    for ax, (size, data) in zip(axes[0], c.items(), strict=True):
        vals = [data["median_rates"][k] for k in keys]
        colors = ["#888", "#555", "#4a8", "#2a6", "#184", "#18a"]
        ax.bar(labels, vals, color=colors)
        for pair in data["pairs"]:
            ax.plot(labels, [pair["rates"][k] for k in keys], "k.", alpha=0.6)
        ax.set_title(f"consume, {size}-byte messages (median; dots = pairs)")
        ax.set_ylabel("msg/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _latency(lat: dict[str, Any], path: Path) -> Path:
    rates = list(lat)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, pct in zip(axes, ("p50", "p99", "p999"), strict=True):
        x = range(len(rates))
        d = [lat[r]["median"]["direct"][pct] for r in rates]
        s = [lat[r]["median"]["sidecar"][pct] for r in rates]
        ax.bar([i - 0.2 for i in x], d, 0.4, label="direct aiormq", color="#777")
        ax.bar([i + 0.2 for i in x], s, 0.4, label="via sidecar, batch 10", color="#2a6")
        ax.set_xticks(list(x), [f"{r} msg/s" for r in rates])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"publish -> receive latency, {pct}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _publish(pub: dict[str, Any], path: Path) -> Path:
    sizes = list(pub)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(sizes))
    ax.bar(
        [i - 0.2 for i in x],
        [pub[s]["median"]["direct"] for s in sizes],
        0.4,
        label="direct aiormq, window 256",
        color="#777",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [pub[s]["median"]["sidecar"] for s in sizes],
        0.4,
        label="agent via sidecar, window 256",
        color="#2a6",
    )
    ax.set_xticks(list(x), [f"{s} B" for s in sizes])
    ax.set_ylabel("confirmed msg/s")
    ax.set_title("publish with confirms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _footprint(fp: dict[str, Any], path: Path) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    a1.bar(
        ["idle", "1000 msg/s"],
        [100 * fp["idle"]["cpu_share"], 100 * fp["load"]["cpu_share"]],
        color=["#999", "#2a6"],
    )
    a1.axhline(10, color="r", ls="--", label="target 10%")
    a1.set_ylabel("% of one core")
    a1.set_title("sidecar CPU")
    a1.legend()
    a2.bar(
        ["idle", "1000 msg/s (peak)"],
        [fp["idle"]["rss_mb"], fp["load"]["rss_peak_mb"]],
        color=["#999", "#2a6"],
    )
    a2.axhline(60, color="r", ls="--", label="target 60 MB")
    a2.set_ylabel("MB")
    a2.set_title("sidecar RSS")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
