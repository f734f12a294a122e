"""AttentionLayout: tensor names, head geometry and fused slices for every supported architecture."""

import pytest
import torch

from alps_trl.localization.anatomy import (
    ARCHITECTURES,
    AttentionLayout,
    UnsupportedArchitectureError,
    supported_architectures,
    unwrap_model,
)
from alps_trl.testing import tiny_config, tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"])
def test_layout_of_each_tiny_architecture(arch):
    model = tiny_model(arch, seed=0)
    layout = AttentionLayout.from_model(model)
    assert (layout.model_type, layout.num_layers, layout.num_heads, layout.num_kv_heads) == (arch, 2, 8, 2)
    assert (layout.head_dim, layout.hidden_size, layout.group_size) == (8, 64, 4)
    assert layout.fused == (arch == "phi3")
    params = dict(model.named_parameters())
    for lp in layout.layers:
        for block, rows in ((lp.q_weight, 64), (lp.k_weight, 16), (lp.v_weight, 16)):
            w = params[block.name]
            assert w.shape[1] == 64 and block.rows == rows and block.offset + rows <= w.shape[0]
        has_bias = arch == "qwen2"
        assert (lp.q_bias is not None) == has_bias and (lp.v_bias is not None) == has_bias
        if has_bias:
            assert params[lp.k_bias.name].shape == (16,)
        mods = layout.modules_of_layer(model, lp.layer)
        assert isinstance(mods["o"], torch.nn.Linear) and params[lp.o_weight].shape == (64, 64)


def test_fused_qkv_blocks_are_consecutive_row_ranges():
    layout = AttentionLayout.from_model(tiny_model("phi3"))
    lp = layout.layers[1]
    assert lp.q_weight.name == lp.k_weight.name == lp.v_weight.name == "model.layers.1.self_attn.qkv_proj.weight"
    assert [(b.offset, b.rows) for b in (lp.q_weight, lp.k_weight, lp.v_weight)] == [(0, 64), (64, 16), (80, 16)]
    assert lp.k_weight.slice(8, 16) == slice(72, 80)
    assert lp.qkv_tensor_names() == ["model.layers.1.self_attn.qkv_proj.weight"]


def test_head_geometry_and_kv_groups():
    layout = AttentionLayout.from_config(tiny_config("llama"))
    assert [layout.kv_group_of(h) for h in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.q_rows(3) == slice(24, 32) and layout.kv_rows(1) == slice(8, 16)
    assert layout.qkv_params_per_layer == (8 + 2 * 2) * 8 * 64
    assert layout.shape_signature() == dict(
        model_type="llama", num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8, hidden_size=64
    )
    mha = AttentionLayout.from_config(tiny_config("llama", num_key_value_heads=8))
    assert [mha.kv_group_of(h) for h in range(8)] == list(range(8))


def test_config_dict_explicit_head_dim_and_nested_text_config():
    cfg = {"model_type": "gemma2", "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg.update(hidden_size=48, head_dim=16)  # head_dim * H != hidden_size, as in Gemma
    layout = AttentionLayout.from_config(cfg)
    assert (layout.head_dim, layout.hidden_size, layout.num_layers) == (16, 48, 3)
    nested = AttentionLayout.from_config({"model_type": "llama", "text_config": {**cfg, "model_type": "llama"}})
    assert nested.num_heads == 4


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as err:
        AttentionLayout.from_config({"model_type": "gpt2", "num_hidden_layers": 1})
    for arch in ("gemma", "gemma2", "llama", "mistral", "phi3", "qwen2", "qwen3"):
        assert arch in str(err.value)
    assert supported_architectures() == sorted(ARCHITECTURES)


def test_missing_tensor_is_named():
    model = tiny_model("llama")
    names = {n for n, _ in model.named_parameters()} - {"model.layers.1.self_attn.v_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        AttentionLayout.from_config(model.config, names)


def test_bad_configs():
    with pytest.raises(ValueError, match="no model_type"):
        AttentionLayout.from_config({"num_hidden_layers": 1})
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        AttentionLayout.from_config({"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 2})
    cfg = dict(model_type="llama", num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=4, hidden_size=48)
    with pytest.raises(ValueError, match="not a multiple"):
        AttentionLayout.from_config(cfg)


def test_unwrap_model_strips_wrappers(tiny_llama):
    """torch.compile around DataParallel (the same unwrapping path as DDP, which needs a process group)."""
    wrapped = torch.compile(torch.nn.DataParallel(tiny_llama))
    assert unwrap_model(wrapped) is tiny_llama
    assert AttentionLayout.from_model(torch.nn.DataParallel(tiny_llama)).num_layers == 2
