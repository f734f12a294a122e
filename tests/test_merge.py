"""Delta files and `alps-merge`: applying saved head deltas to a full-precision base checkpoint on disk."""

import json
import os
import subprocess
import sys

import pytest
import torch
from restriction_helpers import batch, selection_for, train
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from alps_trl.restriction import build_restriction
from alps_trl.restriction.delta import load_delta_file, merge_delta_checkpoint
from alps_trl.testing import tiny_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer):
    """A qwen2 base checkpoint (sharded, with tokenizer) and a delta-mode run on it: (base_dir, delta, logits)."""
    root = tmp_path_factory.mktemp("merge")
    base_dir = root / "base"
    base = tiny_model("qwen2", seed=0)
    base.save_pretrained(base_dir, max_shard_size="100KB")
    tokenizer.save_pretrained(base_dir)
    model = tiny_model("qwen2", seed=0)
    restriction = build_restriction(model, selection_for(model), "delta", train_non_attention=False)
    restriction.install(model)
    train(model, restriction)
    delta_path = root / "delta" / "alps_delta.safetensors"
    restriction.save_delta(model, delta_path, base_model="tiny-qwen2")
    with torch.no_grad():
        logits = model(**batch(21)).logits
    return base_dir, delta_path, logits


def _logits(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        return model(**batch(21)).logits


def test_delta_file_metadata(trained):
    _, delta_path, _ = trained
    tensors, selection, metadata = load_delta_file(delta_path)
    assert selection.heads == [(0, 1), (0, 2), (1, 7)]
    assert metadata["base_model"] == "tiny-qwen2"
    assert json.loads(metadata["selection"])["format"] == "alps_trl.head_selection"
    assert set(tensors) >= {
        "model.layers.0.self_attn.q_proj.weight.alps_delta",
        "model.layers.0.self_attn.q_proj.weight.alps_rows",
        "model.layers.1.self_attn.v_proj.bias.alps_delta",
    }
    # 3 heads x 8 rows of q plus 2 kv groups x 8 rows of k and v, each 64 wide, + biases: small.
    assert sum(t.numel() for k, t in tensors.items() if k.endswith("alps_delta")) == (24 + 32) * 64 + 24 + 32


def test_merge_delta_checkpoint_reproduces_trained_logits(trained, tmp_path):
    base_dir, delta_path, logits = trained
    out = merge_delta_checkpoint(base_dir, delta_path, tmp_path / "merged")
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files and "config.json" in files
    assert sorted(f for f in files if f.endswith(".safetensors")) == sorted(
        f for f in os.listdir(base_dir) if f.endswith(".safetensors")
    )
    torch.testing.assert_close(_logits(out), logits, rtol=1e-5, atol=1e-5)
    base_sd = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    merged_sd = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert list(base_sd) == list(merged_sd)
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed == {
        f"model.layers.{i}.self_attn.{p}_proj.{w}" for i in (0, 1) for p in "qkv" for w in ("weight", "bias")
    }


def test_merge_keeps_checkpoint_dtype(tmp_path):
    base = tiny_model("llama", seed=0).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    model = tiny_model("llama", seed=0)
    restriction = build_restriction(model, selection_for(model), "delta")
    restriction.install(model)
    with torch.no_grad():
        for d in [m for m in model.modules() if type(m).__name__ == "HeadDelta"]:
            d.weight.fill_(0.25)
    restriction.save_delta(model, tmp_path / "d.safetensors")
    merge_delta_checkpoint(tmp_path / "base", tmp_path / "d.safetensors", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16
    expected = (base.model.layers[0].self_attn.q_proj.weight[8:24].float() + 0.25).to(torch.bfloat16)
    assert torch.equal(q[8:24], expected)
    assert torch.equal(q[:8], base.model.layers[0].self_attn.q_proj.weight[:8])


def test_alps_merge_cli(trained, tmp_path):
    base_dir, delta_path, logits = trained
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "alps_trl.cli.merge", str(base_dir), str(delta_path), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Merged" in result.stdout
    torch.testing.assert_close(_logits(out), logits, rtol=1e-5, atol=1e-5)


def test_alps_merge_cli_errors(trained, tmp_path, capsys):
    from alps_trl.cli.merge import main

    base_dir, _, _ = trained
    assert main([str(base_dir), str(base_dir / "config.json"), str(tmp_path / "x")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_merge_refuses_wrong_inputs(trained, tmp_path):
    base_dir, delta_path, _ = trained
    with pytest.raises(ValueError, match="must differ"):
        merge_delta_checkpoint(base_dir, delta_path, base_dir)
    other = tmp_path / "other"
    tiny_model("qwen2", seed=0, num_hidden_layers=3).save_pretrained(other)
    with pytest.raises(ValueError, match="num_layers"):
        merge_delta_checkpoint(other, delta_path, tmp_path / "o1")
    quant = tmp_path / "quant"
    tiny_model("qwen2", seed=0).save_pretrained(quant)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quant / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="full-precision"):
        merge_delta_checkpoint(quant, delta_path, tmp_path / "o2")
    with pytest.raises(FileNotFoundError):
        merge_delta_checkpoint(tmp_path / "missing", delta_path, tmp_path / "o3")


def test_merge_bin_checkpoint(trained, tmp_path):
    base_dir, delta_path, logits = trained
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    base.config.save_pretrained(bin_dir)
    torch.save(base.state_dict(), bin_dir / "pytorch_model.bin")
    out = merge_delta_checkpoint(bin_dir, delta_path, tmp_path / "from_bin")
    assert "model.safetensors" in os.listdir(out)
    torch.testing.assert_close(_logits(out), logits, rtol=1e-5, atol=1e-5)
