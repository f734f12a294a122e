"""Control selections of the benchmarks, derived from a scored selection: its lowest-scoring heads, and random
heads with its kv-group footprint (under grouped-query attention a selected query head also trains its group's k/v
rows, so the footprint fixes the trainable parameter count)."""

from __future__ import annotations

import dataclasses

import torch

from alps_trl.localization.selection import HeadSelection, select_top_k


def _derived(template: HeadSelection, heads, strategy: str, **provenance) -> HeadSelection:
    """A selection of `heads` with the shape, metric and ratio of `template`, without scores."""
    return dataclasses.replace(template, heads=heads, scores=None, strategy=strategy, provenance=dict(provenance))


def lowest_k(scored: HeadSelection) -> HeadSelection:
    """Control: the K lowest-scoring heads of `scored` (K = its number of heads; ties by (layer, head))."""
    if scored.scores is None:
        raise ValueError("lowest_k needs a selection with scores (a top_k selection).")
    heads = select_top_k(-scored.scores, len(scored.heads))
    return _derived(scored, heads, "top_k", control="lowest-scoring heads")


def random_same_footprint(scored: HeadSelection, seed: int) -> HeadSelection:
    """Control: random heads with the same number of heads and of kv groups as `scored` (same trainable count).

    Draws as many random kv groups as `scored` touches, then spreads the same number of query heads over them at
    random, every drawn group getting at least one.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    size = scored.group_size
    n_groups = int(scored.kv_mask().sum())
    groups = torch.randperm(scored.num_layers * scored.num_kv_heads, generator=gen)[:n_groups].tolist()
    heads = []
    for flat in groups:
        layer, g = divmod(flat, scored.num_kv_heads)
        first = int(torch.randint(size, (1,), generator=gen))
        heads.append((layer, g * size + first))
    spare = [
        (flat // scored.num_kv_heads, (flat % scored.num_kv_heads) * size + j)
        for flat in groups
        for j in range(size)
        if (flat // scored.num_kv_heads, (flat % scored.num_kv_heads) * size + j) not in heads
    ]
    order = torch.randperm(len(spare), generator=gen).tolist()
    heads += [spare[i] for i in order[: len(scored.heads) - len(heads)]]
    return _derived(scored, heads, "random", control="random, same kv-group footprint", seed=seed)


def random_from_upper_half(scored: HeadSelection, seed: int) -> HeadSelection:
    """Random heads from the more important half: as many heads as `scored` has, drawn uniformly (seeded) from the
    half of all heads that score highest (the library's top-k order and tie-break)."""
    if scored.scores is None:
        raise ValueError("random_from_upper_half needs a selection with scores (a top_k selection).")
    upper = select_top_k(scored.scores, scored.num_layers * scored.num_heads // 2)
    gen = torch.Generator().manual_seed(20_000 + seed)
    order = torch.randperm(len(upper), generator=gen).tolist()
    heads = sorted(upper[i] for i in order[: len(scored.heads)])
    return _derived(scored, heads, "random", control="random from the upper half by score", seed=seed)
