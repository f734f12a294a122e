"""Figures of RESULTS_REAL.md: exact match per arm, exact match against forgetting (all families, and one figure per
family with the head-only and rest-training arms), the heads' scores."""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    """Write `fig` to `path` (PNG, 100 dpi) and free it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw(store: Any, data: dict, meta: dict) -> list[str]:
    """Write the figures that the data allows into <output>/figures; returns their paths."""
    out = store.path("figures")
    os.makedirs(out, exist_ok=True)
    fams = {f: d for f, d in data["families"].items() if any(d["runs"].values())}
    paths = []
    if fams:
        paths.append(_exact_match(fams, meta, os.path.join(out, "exact_match_by_arm.png")))
        paths.append(_forgetting(fams, meta, os.path.join(out, "exact_match_vs_knowledge.png")))
    table1 = ((data.get("ablations") or {}).get("table1") or {}).get("families", {})
    for fam, d in fams.items():
        paths.append(tradeoff(fam, d, table1.get(fam, []), meta, os.path.join(out, f"tradeoff_{fam}.png")))
    paths += _heads(store, data, out)
    ratio = (data.get("ablations") or {}).get("ratio")
    if ratio and any(runs for row in ratio["rows"] for runs in row["runs"].values()):
        paths.append(ratio_curve(ratio, os.path.join(out, "ratio_curve.png")))
    return paths


def ratio_curve(d: dict, path: str) -> str:
    """Exact match against the share of trained heads: mean over seeds (line) and every seed (dots)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labels = {"alps": "ALPS (PAD)", "random": "Random", "importance": "Importance"}
    for i, (src, label) in enumerate(labels.items()):
        xs, means = [], []
        for row in d["rows"]:
            ems = [100 * r["test"]["exact_match"] for r in row["runs"].get(src, [])]
            if not ems:
                continue
            x = 100 * row["ratio"] * (1 + 0.04 * (i - 1))  # a small offset per arm keeps the dots apart
            ax.scatter([x] * len(ems), ems, color=f"C{i}", s=12, alpha=0.7)
            xs.append(x)
            means.append(statistics.mean(ems))
        if xs:
            ax.plot(xs, means, marker="o", color=f"C{i}", label=label)
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks = [100 * row["ratio"] for row in d["rows"]]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}%" for t in ticks])
    ax.set_xlabel("share of heads trained (head-only)")
    ax.set_ylabel("test exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{d['family']}: exact match vs head share (line: mean, dots: seeds)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _exact_match(fams: dict, meta: dict, path: str) -> str:
    plt = _plt()
    arms = meta["arms"]
    fig, axes = plt.subplots(1, len(fams), figsize=(6.5 * len(fams), 4.2), squeeze=False)
    for ax, (fam, d) in zip(axes[0], fams.items()):
        for i, arm in enumerate(d["runs"]):  # the arms that run on this family
            ems = [100 * r["test"]["exact_match"] for r in d["runs"][arm]]
            if not ems:
                continue
            sd = statistics.stdev(ems) if len(ems) > 1 else 0.0
            ax.bar(
                i, statistics.mean(ems), yerr=sd, capsize=3, color="C0" if arms[arm]["lr_family"] == "heads" else "C7"
            )
            offsets = np.linspace(-0.2, 0.2, len(ems)) if len(ems) > 1 else np.zeros(1)
            ax.scatter(i + offsets, ems, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(d["runs"])))
        ax.set_xticklabels([arms[a]["label"] for a in d["runs"]], rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test exact match (%)")
        ax.set_title(f"{fam}: mean ± std over seeds, dots = seeds")
    return _save(plt, fig, path)


def _forgetting(fams: dict, meta: dict, path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, len(fams), figsize=(6 * len(fams), 4.2), squeeze=False)
    for ax, (fam, d) in zip(axes[0], fams.items()):
        for i, (arm, spec) in enumerate(meta["arms"].items()):
            runs = d["runs"].get(arm, [])
            if not runs:
                continue
            x = statistics.mean(100 * r["knowledge"]["accuracy"] for r in runs)
            y = statistics.mean(100 * r["test"]["exact_match"] for r in runs)
            ax.scatter(x, y, color=f"C{i}", label=spec["label"])
        ax.set_xlabel("knowledge accuracy after training (%, base 100)")
        ax.set_ylabel("test exact match (%)")
        ax.set_title(f"{fam}: task gain vs forgetting (means over seeds)")
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def tradeoff(fam: str, d: dict, table1_rows: list[dict], meta: dict, path: str) -> str:
    """One family: test exact match against knowledge accuracy for every arm, head-only (circles) and with the rest
    of the network training (triangles), Full (square); large marker: mean over seeds, small dots: seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = [(meta["arms"][arm]["label"], runs, "o") for arm, runs in d["runs"].items() if arm != "full"]
    points += [
        (r["label"], r["runs"], "^")
        for r in table1_rows
        if not r["label"].startswith("Full") and not r["label"].endswith("(head-choice arm)")
    ]
    full = next((r["runs"] for r in table1_rows if r["label"] == "Full"), None) or d["runs"].get("full", [])
    points.append(("Full", full, "s"))
    colors = plt.get_cmap("tab20").colors
    for i, (label, runs, marker) in enumerate(p for p in points if p[1]):
        xs = [100 * r["knowledge"]["accuracy"] for r in runs]
        ys = [100 * r["test"]["exact_match"] for r in runs]
        color = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        ax.scatter(xs, ys, color=color, marker=marker, s=10, alpha=0.35)
        ax.scatter(
            statistics.mean(xs),
            statistics.mean(ys),
            color=color,
            marker=marker,
            s=70,
            label=label,
            edgecolors="k",
            linewidths=0.5,
        )
    ax.set_xlabel("knowledge accuracy after training (%, base 100)")
    ax.set_ylabel("test exact match (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(
        f"{fam}: task vs forgetting (o head-only, ^ rest trains, ■ Full; large: mean, small: seeds)", fontsize=9
    )
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, path)


def _heads(store: Any, data: dict, out: str) -> list[str]:
    from alps_trl.localization.selection import HeadSelection

    paths = []
    for fam, d in data["families"].items():
        sels = d["selections"]
        if sels["alps"]:
            path = os.path.join(out, f"alps_heads_{fam}.png")
            HeadSelection.from_dict(sels["alps"]).plot_heatmap(path, title=f"{fam}: ALPS 10% (PAD, task model)")
            paths.append(path)
        first = min(sels["importance"], default=None)
        if first is not None:
            path = os.path.join(out, f"importance_heads_{fam}.png")
            title = f"{fam}: Importance-10% (seed {first})"
            HeadSelection.from_dict(sels["importance"][first]).plot_heatmap(path, title=title)
            paths.append(path)
    return paths
