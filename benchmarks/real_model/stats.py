"""Statistics of the real-model report: paired differences between arms over shared seeds (95% t interval over seeds,
95% paired bootstrap over test items), overlaps of head selections against chance, and rank correlations."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def t_interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the 95% t interval of the mean of paired differences (None below 2 pairs)."""
    from scipy import stats

    if len(diffs) < 2:
        return None
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = float(stats.t.ppf(0.975, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return m, m - half, m + half


def bootstrap_interval(diffs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `diffs` (per-item paired differences, pooled over seeds)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(BOOTSTRAP_RESAMPLES, len(diffs)))
    means = diffs[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def overlap_stats(a: list, b: list, total: int) -> dict:
    """Heads shared by two selections, the overlap two uniformly random ones would have, and P(overlap >= seen)."""
    from scipy import stats

    seen = len({tuple(h) for h in a} & {tuple(h) for h in b})
    return {
        "overlap": seen,
        "expected": len(a) * len(b) / total,
        "p": float(stats.hypergeom(total, len(a), len(b)).sf(seen - 1)),
    }


def spearman(a: Any, b: Any) -> float:
    from scipy import stats

    return float(stats.spearmanr(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)).statistic)


def paired(a_runs: list[dict], b_runs: list[dict]) -> dict | None:
    """Paired differences a - b over common seeds: exact match (t and pooled-item bootstrap), knowledge, ppl."""
    b_by_seed = {r["seed"]: r for r in b_runs}
    pairs = [(r, b_by_seed[r["seed"]]) for r in a_runs if r["seed"] in b_by_seed]
    if not pairs:
        return None
    em = [x["test"]["exact_match"] - y["test"]["exact_match"] for x, y in pairs]
    items = np.concatenate(
        [np.array(x["test"]["correct"], float) - np.array(y["test"]["correct"], float) for x, y in pairs]
    )
    boot = bootstrap_interval(items)
    return {
        "seeds": [x["seed"] for x, _ in pairs],
        "em": t_interval(em) or (statistics.mean(em), math.nan, math.nan),
        "em_bootstrap": (float(items.mean()), *boot),
        "knowledge": t_interval([x["knowledge"]["accuracy"] - y["knowledge"]["accuracy"] for x, y in pairs]),
        "ppl": t_interval([x["ppl"] - y["ppl"] for x, y in pairs]),
    }
