"""Scaled-quantized checkpoints: FP8 with block scales reads as its dequantized weights; other schemes are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from alps_trl.localization.scoring import score_heads
from alps_trl.localization.weights import open_weight_source
from alps_trl.testing import tiny_model

BLOCK = (4, 8)  # rows, columns per scale (FP8 releases use 128 x 128)


def _fp8_checkpoint(src, dst, quant_method="fp8"):
    """Write `src` (a float32 checkpoint) as an FP8 block-scaled one in `dst`; return the dequantized q/k/v."""
    state = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    br, bc = BLOCK
    for name, w in state.items():
        if not any(p in name for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            out[name] = w
            continue
        blocks = w.reshape(w.shape[0] // br, br, w.shape[1] // bc, bc)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # [rows / br, cols / bc]
        full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)
        q = (w / full).to(torch.float8_e4m3fn)
        out[name], out[name + "_scale_inv"] = q, scale
        dequantized[name] = q.to(torch.float32) * full
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method, "weight_block_size": list(BLOCK)}
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


@pytest.fixture
def checkpoints(tmp_path):
    base, task = tmp_path / "base", tmp_path / "task"
    tiny_model("llama", seed=0).save_pretrained(base)
    tiny_model("llama", seed=1).save_pretrained(task)
    return base, task


def test_fp8_block_scaled_task_model_is_scored_on_its_dequantized_weights(checkpoints, tmp_path):
    base, task = checkpoints
    dequantized = _fp8_checkpoint(task, tmp_path / "task_fp8")
    source = open_weight_source(str(tmp_path / "task_fp8"))
    for name, expected in dequantized.items():
        rows = source._store.rows(name, 0, expected.shape[0])
        torch.testing.assert_close(rows, expected, rtol=0, atol=0)
    # A row range inside one block of scales reads the same values.
    name = next(iter(dequantized))
    torch.testing.assert_close(source._store.rows(name, 5, 7), dequantized[name][5:7], rtol=0, atol=0)

    # The reference: the same dequantized weights written as a plain float32 checkpoint.
    plain = tmp_path / "task_plain"
    tiny = tiny_model("llama", seed=1)
    with torch.no_grad():
        for name, param in tiny.named_parameters():
            if name in dequantized:
                param.copy_(dequantized[name])
    tiny.save_pretrained(plain)
    scores = score_heads(str(base), str(tmp_path / "task_fp8"))
    torch.testing.assert_close(scores, score_heads(str(base), str(plain)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_other_quantized_checkpoints_are_refused(checkpoints, tmp_path, method):
    base, task = checkpoints
    _fp8_checkpoint(task, tmp_path / "task_q", quant_method=method)
    with pytest.raises(ValueError, match=rf"quantized checkpoint \(quantization_config quant_method='{method}'\)"):
        score_heads(str(base), str(tmp_path / "task_q"))
