"""HeadSelection and the strategies: counts, ties, masks, persistence and compatibility checks."""

import json

import numpy as np
import pytest
import torch

from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.localization.selection import (
    FORMAT_VERSION,
    HeadSelection,
    HeadSelectionError,
    num_selected,
    select_layer_consistent,
    select_random,
    select_top_k,
    validate_ratio,
)
from alps_trl.testing import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _selection(**kw):
    scores = torch.arange(16, dtype=torch.float64).reshape(2, 8) / 100
    args = dict(num_layers=2, num_heads=8, num_kv_heads=2, heads=[(1, 7), (0, 1), (1, 6)], scores=scores)
    args.update(head_dim=8, hidden_size=64, model_type="llama", provenance={"base": "b", "task": "t"})
    args.update(kw)
    return HeadSelection(**args)


def test_scores_are_held_as_numpy_float64_whatever_was_given():
    from_torch = _selection()
    from_numpy = _selection(scores=np.arange(16, dtype=np.float32).reshape(2, 8) / 100)
    from_lists = _selection(scores=(torch.arange(16, dtype=torch.float64).reshape(2, 8) / 100).tolist())
    for sel in (from_torch, from_numpy, from_lists):
        assert isinstance(sel.scores, np.ndarray) and sel.scores.dtype == np.float64 and sel.scores.shape == (2, 8)
    assert np.array_equal(from_torch.scores, from_lists.scores)
    needs_grad = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    assert _selection(scores=needs_grad).scores.sum() == 0


def test_top_k_takes_numpy_and_torch_scores_alike():
    scores = torch.tensor([[0.0, 5.0, 1.0, 1.0], [1.0, 0.0, 5.0, 0.0]], dtype=torch.float64)
    assert select_top_k(scores, 3) == select_top_k(scores.numpy(), 3) == [(0, 1), (0, 2), (1, 2)]
    assert select_top_k(scores.to(torch.float32), 3) == select_top_k(scores.numpy().astype(np.float32), 3)


def test_num_selected_rounds_before_ceil():
    assert 0.1 * 3 * 20 > 6 and 0.1 * 6 * 10 > 6  # the floating-point trap
    assert num_selected(0.1, 6, 10) == 6 and num_selected(0.1, 3, 20) == 6
    assert num_selected(0.1, 16, 32) == 52  # Llama-3.2-1B: ceil(51.2)
    assert num_selected(1.0, 2, 8) == 16
    assert num_selected(1e-9, 2, 8) == 1


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.0001, 2, float("nan"), "abc", None])
def test_validate_ratio_refuses(bad):
    with pytest.raises(ValueError, match="ratio must be"):
        validate_ratio(bad)


def test_top_k_is_global_and_breaks_ties_by_layer_then_head():
    scores = torch.tensor([[0.0, 5.0, 1.0, 1.0], [1.0, 0.0, 5.0, 0.0]], dtype=torch.float64)
    assert select_top_k(scores, 2) == [(0, 1), (1, 2)]
    assert select_top_k(scores, 4) == [(0, 1), (0, 2), (0, 3), (1, 2)]
    assert select_top_k(torch.zeros(2, 4), 3) == [(0, 0), (0, 1), (0, 2)]


def test_random_strategies_are_seeded_and_sized():
    assert select_random(4, 8, 5, seed=1) == select_random(4, 8, 5, seed=1)
    assert select_random(4, 8, 5, seed=1) != select_random(4, 8, 5, seed=2)
    assert len(select_random(4, 8, 5, seed=1)) == 5
    torch.manual_seed(0)
    a = select_random(4, 8, 5, seed=1)
    torch.manual_seed(123)
    assert select_random(4, 8, 5, seed=1) == a  # independent of the global RNG
    lc = select_layer_consistent(4, 8, 8, seed=0)
    assert [sum(1 for ly, _ in lc if ly == layer) for layer in range(4)] == [2, 2, 2, 2]


def test_masks_and_trainable_params():
    sel = _selection()
    assert sel.heads == [(0, 1), (1, 6), (1, 7)]
    mask = sel.mask()
    assert mask.dtype == torch.bool and mask.shape == (2, 8) and int(mask.sum()) == 3 and mask[1, 7]
    assert sel.kv_mask().tolist() == [[True, False], [False, True]] and sel.kv_mask().dtype == torch.bool
    assert sel.mask_array().tolist() == mask.tolist() and sel.kv_mask_array().tolist() == sel.kv_mask().tolist()
    # 3 query heads + k and v rows of 2 kv groups, 8 rows each, 64 columns.
    assert sel.trainable_qkv_params() == (3 * 8 + 2 * 2 * 8) * 64
    assert HeadSelection(2, 8, 2, [(0, 1)]).trainable_qkv_params(head_dim=8, hidden_size=64) == 3 * 8 * 64
    with pytest.raises(ValueError, match="head_dim and hidden_size are unknown"):
        HeadSelection(2, 8, 2, [(0, 1)]).trainable_qkv_params()


def test_invalid_construction():
    with pytest.raises(HeadSelectionError, match=r"Head \(2, 0\) is outside"):
        HeadSelection(2, 8, 2, [(2, 0)])
    with pytest.raises(HeadSelectionError, match="not a multiple"):
        HeadSelection(2, 8, 3, [])
    with pytest.raises(HeadSelectionError, match="scores have shape"):
        HeadSelection(2, 8, 2, [], scores=torch.zeros(8, 2))


def test_save_load_roundtrip(tmp_path):
    sel = _selection()
    sel.save(tmp_path / "sub" / "heads.json")
    again = HeadSelection.load(tmp_path / "sub" / "heads.json")
    assert again == sel and again.fingerprint() == sel.fingerprint()
    assert isinstance(again.scores, np.ndarray) and again.scores.dtype == np.float64
    assert np.array_equal(again.scores, sel.scores)
    assert (again.head_dim, again.hidden_size, again.model_type) == (8, 64, "llama")
    assert again.provenance == {"base": "b", "task": "t"}
    data = json.loads((tmp_path / "sub" / "heads.json").read_text())
    assert data["format_version"] == FORMAT_VERSION and data["heads"] == [[0, 1], [1, 6], [1, 7]]
    no_scores = HeadSelection(2, 8, 2, [(0, 0)], strategy="random")
    no_scores.save(tmp_path / "r.json")
    assert HeadSelection.load(tmp_path / "r.json").scores is None


def test_load_errors(tmp_path):
    with pytest.raises(HeadSelectionError, match="does not exist"):
        HeadSelection.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(HeadSelectionError, match="not valid JSON"):
        HeadSelection.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(HeadSelectionError, match="not an ALPS head selection"):
        HeadSelection.load(tmp_path / "list.json")
    data = _selection().to_dict()
    (tmp_path / "v.json").write_text(json.dumps({**data, "format_version": 0}))
    with pytest.raises(HeadSelectionError, match="format_version 0"):
        HeadSelection.load(tmp_path / "v.json")
    (tmp_path / "edited.json").write_text(json.dumps({**data, "heads": [[0, 2]]}))
    with pytest.raises(HeadSelectionError, match="fingerprint"):
        HeadSelection.load(tmp_path / "edited.json")
    broken = {k: v for k, v in data.items() if k != "num_heads"}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(HeadSelectionError, match="malformed"):
        HeadSelection.load(tmp_path / "broken.json")
    (tmp_path / "outside.json").write_text(json.dumps({**data, "heads": [[5, 0]], "fingerprint": None}))
    with pytest.raises(HeadSelectionError, match="inconsistent"):
        HeadSelection.load(tmp_path / "outside.json")


def test_check_compatible(tiny_llama):
    sel = _selection()
    sel.check_compatible(tiny_llama)
    sel.check_compatible(tiny_llama.config)
    sel.check_compatible(AttentionLayout.from_model(tiny_llama))
    with pytest.raises(HeadSelectionError, match="num_heads=8, but the model has num_heads=4"):
        sel.check_compatible(tiny_config("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(HeadSelectionError, match="hidden_size=64, but the model has hidden_size=32"):
        sel.check_compatible(tiny_config("llama", hidden_size=32, head_dim=8))


def test_heatmap_and_summary(tmp_path):
    sel = _selection()
    sel.plot_heatmap(tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC
    HeadSelection(2, 8, 2, [(0, 0)], strategy="random").plot_heatmap(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    text = sel.summary(top=2)
    assert "3/16 heads selected" in text and "per layer: L0:1 L1:2" in text
    assert "top heads: (1,7)=1.500e-01, (1,6)=1.400e-01" in text and "scores: min" in text
