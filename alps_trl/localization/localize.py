"""`localize_heads`: base + task model -> the `HeadSelection` that ALPS trains.

Layer 3 entry point: opens both models for streaming (layer 2), checks their shapes, scores the heads
and applies a selection strategy. Errors (bad ratio, strategy, metric, mismatching models) are raised
before any scoring work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from alps_trl.localization.scoring import open_pair, resolve_device, score_array, validate_metric, validate_temperature
from alps_trl.localization.selection import (
    STRATEGIES,
    HeadSelection,
    num_selected,
    select_layer_consistent,
    select_random,
    select_top_k,
    selection_for_layout,
    validate_ratio,
)

if TYPE_CHECKING:
    import torch

PRECISIONS = ("mixed", "float64")
# Bound on the relative error of scores from float32 products (precision="mixed"), with margin: the largest
# measured is 9e-5 (an 8B-shaped bf16 pair, `python -m benchmarks.cost.localization --model llama-3.1-8b-shape`).
MIXED_RTOL = 1e-3


def boundary_layers(scores: np.ndarray, k: int, rtol: float = MIXED_RTOL) -> list[int]:
    """Layers holding a head whose score, known to relative error `rtol`, might fall on either side of the top-k.

    scores: [L, H] float64. A head whose score lies within 2 * rtol of the k-th or (k+1)-th score could swap
    places with one of them; heads above or below that band keep their side whatever their exact values.
    """
    flat = scores.ravel()
    if k >= flat.size:
        return []
    ranked = np.sort(flat)[::-1]
    low, high = ranked[k] * (1 - 2 * rtol), ranked[k - 1] * (1 + 2 * rtol)
    band = (scores >= low) & (scores <= high)
    return sorted({int(layer) for layer in np.nonzero(band)[0]})


def validate_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    return precision


def validate_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown ALPS strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    return strategy


def localize_heads(
    base: Any,
    task: Any,
    *,
    ratio: float = 0.1,
    metric: str = "pad",
    strategy: str = "top_k",
    temperature: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    precision: str = "mixed",
) -> HeadSelection:
    """Select the task-sensitive attention heads.

    Args:
        base, task: checkpoint dirs, cached hub ids, loaded models or `WeightSource`s of the same
            architecture and shape.
        ratio: fraction of all L*H heads to select, in (0, 1]; K = ceil(ratio * L * H).
        metric: score for "top_k" ("pad", "kl", "js", "cosine", "euclidean").
        strategy: "top_k" (highest scores over the whole model, ties by (layer, head)), "random"
            (K uniformly random heads, seeded) or "layer_consistent" (the same number of random heads in
            every layer). The random strategies compute no scores but still check that shapes match.
        temperature: softmax temperature of the score.
        seed: seed of the random strategies.
        device: where scores are computed (None -> CUDA if available, else CPU).
        progress: tqdm bar over layers while scoring.
        precision: "float64" computes every score in float64. "mixed" (default, several times less time in the
            matrix products) computes them with float32 products (`score_layer`), then recomputes in float64 the
            layers whose heads lie near the top-k boundary (`boundary_layers`): the selected heads are those of
            float64, and the scores of the heads away from the boundary carry a relative error below MIXED_RTOL.
    Returns:
        HeadSelection with scores (numpy float64 [L, H], top_k only), the model shape and provenance. On CPU
        with checkpoint inputs and strategy top_k, torch is not imported.
    """
    ratio = validate_ratio(ratio)
    strategy = validate_strategy(strategy)
    metric = validate_metric(metric)
    temperature = validate_temperature(temperature)
    precision = validate_precision(precision)
    device = resolve_device(device)
    src_b, src_t = open_pair(base, task, trust_remote_code)
    layout = src_b.layout
    k = num_selected(ratio, layout.num_layers, layout.num_heads)
    scores = None
    if strategy == "top_k":
        options = dict(metric=metric, temperature=temperature, device=device, workspace={})
        matmul_dtype = "float32" if precision == "mixed" else "float64"
        scores = score_array(src_b, src_t, progress=progress, matmul_dtype=matmul_dtype, **options)
        if precision == "mixed":
            exact_layers = boundary_layers(scores, k)
            if exact_layers:
                scores[exact_layers] = score_array(src_b, src_t, layers=exact_layers, **options)[exact_layers]
        heads = select_top_k(scores, k)
    elif strategy == "random":
        heads = select_random(layout.num_layers, layout.num_heads, k, seed)
    else:
        heads = select_layer_consistent(layout.num_layers, layout.num_heads, k, seed)
    provenance: dict[str, Any] = {"base": src_b.name, "task": src_t.name}
    if strategy == "top_k":
        provenance["temperature"] = temperature
    else:
        provenance["seed"] = int(seed)
    return selection_for_layout(
        layout, heads, scores=scores, metric=metric, ratio=ratio, strategy=strategy, provenance=provenance
    )
