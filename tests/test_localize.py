"""localize_heads finds planted task heads, on every supported family of attention layouts."""

import math

import numpy as np
import pytest
import torch
from localize_helpers import copy_model, perturb_kv_group, perturb_query_heads

from alps_trl.localization.localize import localize_heads
from alps_trl.localization.selection import HeadSelection
from alps_trl.testing import tiny_model

# (arch, overrides): GQA llama, MHA llama (KV == H), qwen2 (q/k/v biases), phi3 (fused qkv_proj), qwen3 (q/k norms).
LAYOUTS = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 8}),
    "qwen2-bias": ("qwen2", {}),
    "phi3-fused": ("phi3", {}),
    "qwen3": ("qwen3", {}),
}
PLANTED = [(0, 2), (1, 0), (1, 5)]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planted_query_heads_are_found_exactly(name):
    arch, overrides = LAYOUTS[name]
    base = tiny_model(arch, seed=0, **overrides)
    task = copy_model(base)
    perturb_query_heads(task, PLANTED, scale=0.05)
    if arch == "qwen2":
        with torch.no_grad():  # biases move too in a real fine-tune; they are not part of the score
            for layer in task.model.layers:
                layer.self_attn.q_proj.bias.add_(0.5)
                layer.self_attn.k_proj.bias.add_(0.5)
    # 16 heads, ratio 3/16 -> K = 3: exactly the planted ones.
    sel = localize_heads(base, task, ratio=3 / 16, device="cpu")
    assert sel.heads == PLANTED
    assert sel.scores.shape == (2, 8)
    assert sel.model_type == arch and sel.num_kv_heads == base.config.num_key_value_heads
    others = [sel.scores[ly, h] for ly in range(2) for h in range(8) if (ly, h) not in PLANTED]
    assert max(others) == 0.0 and min(sel.scores[ly, h] for ly, h in PLANTED) > 0


@pytest.mark.parametrize("name", ["llama-gqa", "phi3-fused"])
def test_planted_kv_group_selects_its_query_heads(name):
    arch, overrides = LAYOUTS[name]
    base = tiny_model(arch, seed=0, **overrides)
    task = copy_model(base)
    perturb_kv_group(task, layer=1, group=0, which="v")
    sel = localize_heads(base, task, ratio=4 / 16, device="cpu")
    assert sel.heads == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert sel.kv_mask().tolist() == [[False, False], [True, False]]


def test_selection_fields_and_provenance(tmp_path, tiny_llama):
    task = copy_model(tiny_llama)
    perturb_query_heads(task, [(1, 3)])
    tiny_llama.save_pretrained(tmp_path / "base")
    task.save_pretrained(tmp_path / "task")
    sel = localize_heads(str(tmp_path / "base"), str(tmp_path / "task"), ratio=0.1, metric="pad")
    assert (sel.metric, sel.ratio, sel.strategy) == ("pad", 0.1, "top_k")
    assert (sel.head_dim, sel.hidden_size, sel.model_type) == (8, 64, "llama")
    assert sel.provenance["base"] == str(tmp_path / "base") and sel.provenance["task"] == str(tmp_path / "task")
    assert len(sel.heads) == math.ceil(0.1 * 16) and (1, 3) in sel.heads
    sel.save(tmp_path / "heads.json")
    again = HeadSelection.load(tmp_path / "heads.json")
    assert again == sel and np.array_equal(again.scores, sel.scores) and again.provenance == sel.provenance
    sel.check_compatible(tiny_llama)


def test_ratio_edge_selects_exactly_ceil_of_rounded_product():
    # L*H = 60: 0.1 * 60 == 6.000000000000001 in floating point; K must be 6, not 7.
    base = tiny_model("llama", seed=0, num_hidden_layers=3, num_attention_heads=20, num_key_value_heads=5,
                      hidden_size=40, head_dim=2)  # fmt: skip
    task = tiny_model("llama", seed=1, num_hidden_layers=3, num_attention_heads=20, num_key_value_heads=5,
                      hidden_size=40, head_dim=2)  # fmt: skip
    assert len(localize_heads(base, task, ratio=0.1).heads) == 6
    assert len(localize_heads(base, task, ratio=1.0).heads) == 60
    assert len(localize_heads(base, task, ratio=1e-6).heads) == 1


@pytest.mark.parametrize("strategy", ["random", "layer_consistent"])
def test_score_free_strategies(strategy, tiny_llama):
    task = copy_model(tiny_llama)
    a = localize_heads(tiny_llama, task, ratio=0.25, strategy=strategy, seed=3)
    b = localize_heads(tiny_llama, task, ratio=0.25, strategy=strategy, seed=3)
    c = localize_heads(tiny_llama, task, ratio=0.25, strategy=strategy, seed=4)
    assert a.scores is None and a.strategy == strategy and a.provenance["seed"] == 3
    assert a.heads == b.heads and len(a.heads) == 4
    assert a.heads != c.heads
    if strategy == "layer_consistent":
        assert [len(a.heads_in_layer(i)) for i in range(2)] == [2, 2]


@pytest.mark.parametrize("strategy", ["random", "layer_consistent"])
def test_score_free_strategies_still_check_shapes(strategy, tiny_llama):
    with pytest.raises(ValueError, match="differ"):
        localize_heads(tiny_llama, tiny_model("llama", num_key_value_heads=4), strategy=strategy)


def test_bad_arguments_fail_before_any_work(tiny_llama):
    for ratio in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
            localize_heads(tiny_llama, tiny_llama, ratio=ratio)
    with pytest.raises(ValueError, match="Unknown ALPS strategy 'best'.*top_k, random, layer_consistent"):
        localize_heads(tiny_llama, tiny_llama, strategy="best")
    with pytest.raises(ValueError, match="Unknown ALPS metric"):
        localize_heads(tiny_llama, tiny_llama, metric="l2")


def test_ablation_metrics_rank_planted_heads_first(tiny_llama):
    task = copy_model(tiny_llama)
    perturb_query_heads(task, PLANTED)
    for metric in ("kl", "js", "cosine", "euclidean"):
        sel = localize_heads(tiny_llama, task, ratio=3 / 16, metric=metric)
        assert sel.heads == PLANTED and sel.metric == metric


def test_boundary_layers_are_those_near_the_kth_score():
    from alps_trl.localization.localize import boundary_layers

    scores = np.array([[9.0, 1.0, 0.5], [5.0, 4.999, 0.1], [8.0, 0.2, 0.3]])
    # k = 3: the 3rd score is 5.0, the 4th 4.999: only layer 1 holds heads within the band.
    assert boundary_layers(scores, 3, rtol=1e-3) == [1]
    assert boundary_layers(scores, 2, rtol=1e-3) == [1, 2]  # 8.0 | 5.0: the 9.0 of layer 0 is safely above
    assert boundary_layers(scores, 9) == []


@pytest.mark.parametrize("metric", ["pad", "kl"])
def test_mixed_precision_selects_the_float64_heads(metric):
    """Many small, close scores: float32 products may reorder some, the float64 boundary layers fix the selection."""
    from alps_trl.localization.localize import MIXED_RTOL

    base = tiny_model("llama", seed=0, num_hidden_layers=4)
    task = copy_model(base)
    with torch.no_grad():  # every q/k/v row moves a little: no clear gap between the heads
        gen = torch.Generator().manual_seed(3)
        for p in task.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen))
    exact = localize_heads(base, task, ratio=0.25, metric=metric, device="cpu", precision="float64")
    mixed = localize_heads(base, task, ratio=0.25, metric=metric, device="cpu", precision="mixed")
    assert mixed.heads == exact.heads
    np.testing.assert_allclose(mixed.scores, exact.scores, rtol=MIXED_RTOL)
    with pytest.raises(ValueError, match="Unknown precision 'half'"):
        localize_heads(base, task, device="cpu", precision="half")
