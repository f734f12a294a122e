"""Trained heads as a PEFT LoRA adapter (tiny models): exact round trips, PEFT's own file layout, the uniform
rank, bias rows, o_proj columns, mask mode, a 4-bit base, `alps-merge --to-peft` and the trainer option."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from restriction_helpers import batch, selection_for, train
from safetensors import safe_open

from alps_trl.restriction import build_restriction
from alps_trl.restriction.peft_export import ADAPTER_CONFIG, ADAPTER_HEADS, ADAPTER_WEIGHTS, AdapterInfo, save_adapter
from alps_trl.testing import tiny_model

peft = pytest.importorskip("peft")


def _logits(model, seed: int = 21) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch(seed)["input_ids"]).logits


def _trained(arch: str, mode: str, restrict_o_proj: bool = False):
    """(untouched base copy, trained model, restriction) after 3 steps of head-only training."""
    model = tiny_model(arch, seed=0)
    base = copy.deepcopy(model)
    restriction = build_restriction(
        model, selection_for(model), mode, restrict_o_proj=restrict_o_proj, train_non_attention=False
    )
    restriction.install(model)
    train(model, restriction)
    return base, model, restriction


def _export(model, restriction, directory, **kwargs):
    o_bias = model.model.layers[0].self_attn.o_proj.bias is not None
    return save_adapter(
        restriction.trained_deltas(model),
        restriction.layout,
        restriction.selection,
        directory,
        base_model="tiny",
        o_proj_has_bias=o_bias,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("arch", "mode", "o_proj"),
    [("qwen2", "delta", False), ("llama", "delta", True), ("llama", "mask", True), ("qwen2", "mask", False)],
    ids=str,
)
def test_peft_model_computes_the_trained_model(tmp_path, arch, mode, o_proj):
    """qwen2 has q/k/v biases (lora_bias), llama trains o_proj columns (the transposed case); mask mode exports
    trained rows minus base rows. Disabling the adapter gives the base back; merge_and_unload the trained weights."""
    base, model, restriction = _trained(arch, mode, restrict_o_proj=o_proj)
    info = _export(model, restriction, tmp_path / "adapter")
    assert sorted(os.listdir(info.directory)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_HEADS])
    base_logits = _logits(base)
    peft_model = peft.PeftModel.from_pretrained(base, info.directory)
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=0, atol=1e-5)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model), base_logits)
    if mode == "delta":
        restriction.merge(model)
    trained = model.state_dict()
    merged = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(trained)
    for name, tensor in trained.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_file_layout_is_peft_own(tmp_path):
    """The tensor names and shapes are those PeftModel.save_pretrained writes for the same LoraConfig."""
    base, model, restriction = _trained("qwen2", "delta")
    info = _export(model, restriction, tmp_path / "adapter")
    config = peft.LoraConfig.from_pretrained(info.directory)
    assert config.base_model_name_or_path == "tiny" and config.lora_bias
    assert config.rank_pattern == config.alpha_pattern  # scaling alpha / r = 1 for every module
    reference = peft.get_peft_model(base, config)
    reference.save_pretrained(tmp_path / "peft_own")

    def shapes(directory):
        with safe_open(os.path.join(directory, ADAPTER_WEIGHTS), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert shapes(info.directory) == shapes(tmp_path / "peft_own")
    assert info.ranks == {
        "model.layers.0.self_attn.q_proj": 16,  # heads 1 and 2, head_dim 8
        "model.layers.0.self_attn.k_proj": 8,  # their kv group
        "model.layers.0.self_attn.v_proj": 8,
        "model.layers.1.self_attn.q_proj": 8,
        "model.layers.1.self_attn.k_proj": 8,
        "model.layers.1.self_attn.v_proj": 8,
    }


def test_uniform_rank_is_the_same_update(tmp_path):
    base, model, restriction = _trained("llama", "delta")
    per_module = _export(model, restriction, tmp_path / "per_module")
    uniform = _export(model, restriction, tmp_path / "uniform", uniform_rank=True)
    config = json.loads((tmp_path / "uniform" / ADAPTER_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] == per_module.max_rank == 16 and not config["rank_pattern"]
    assert uniform.vllm_max_lora_rank == 16 and uniform.bytes_on_disk > per_module.bytes_on_disk
    too_wide = AdapterInfo("dir", {"model.layers.0.self_attn.q_proj": 640}, True, 0)  # 5 heads of 128 rows
    assert (
        too_wide.vllm_max_lora_rank is None and "exceeds vLLM's largest --max-lora-rank (512)" in too_wide.vllm_hint()
    )
    one = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), per_module.directory))
    torch.testing.assert_close(
        _logits(peft.PeftModel.from_pretrained(base, uniform.directory)), one, rtol=0, atol=1e-6
    )


def test_adapter_over_a_4bit_base(tmp_path):
    """A delta-mode run on a 4-bit base gives a QLoRA-style adapter: the 4-bit base + adapter is the trained model.
    (bitsandbytes' CPU path must stay in train mode; see tests/test_trainer_quantized.py.)"""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = str(tmp_path / "base")
    tiny_model("llama", seed=0).save_pretrained(path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load():
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").train()

    model = load()
    restriction = build_restriction(model, selection_for(model), "delta")
    restriction.install(model)
    train(model, restriction, steps=2)
    info = _export(model, restriction, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(load(), info.directory).train()
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=0, atol=1e-5)


def _alps_merge(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from alps_trl.cli.merge import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)


def test_alps_merge_to_peft_converts_a_delta_file(tmp_path):
    base, model, restriction = _trained("qwen2", "delta")
    base.save_pretrained(tmp_path / "base")
    restriction.save_delta(model, tmp_path / "alps_delta.safetensors")
    out = tmp_path / "adapter"
    proc = _alps_merge(str(tmp_path / "base"), str(tmp_path / "alps_delta.safetensors"), str(out), "--to-peft")
    assert proc.returncode == 0, proc.stderr
    assert "largest rank 16" in proc.stdout and "--max-lora-rank 16" in proc.stdout
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    torch.testing.assert_close(
        _logits(peft.PeftModel.from_pretrained(base, str(out))), _logits(model), rtol=0, atol=1e-5
    )


def test_alps_merge_to_peft_bad_input_is_one_line(tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    (tmp_path / "plain.safetensors").write_bytes(b"not a safetensors file")
    proc = _alps_merge(str(base), str(tmp_path / "plain.safetensors"), str(tmp_path / "out"), "--to-peft")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("alps-merge: error:") and len(proc.stderr.strip().splitlines()) == 1
    proc = _alps_merge(str(base), str(tmp_path / "plain.safetensors"), str(tmp_path / "out"), "--uniform-rank")
    assert proc.returncode == 2 and "add --to-peft" in proc.stderr and "Traceback" not in proc.stderr


def test_alps_merge_to_peft_refuses_a_run_that_trained_the_rest(tmp_path):
    """A delta-mode run with alps_train_non_attention=True moved the MLP too: its delta file is not all it changed."""
    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "base")
    restriction = build_restriction(model, selection_for(model), "delta", train_non_attention=True)
    restriction.install(model)
    train(model, restriction, steps=1)
    restriction.save_delta(model, tmp_path / "alps_delta.safetensors")
    proc = _alps_merge(str(tmp_path / "base"), str(tmp_path / "alps_delta.safetensors"), str(tmp_path / "out"),
                       "--to-peft")  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "also trained the rest of the network" in proc.stderr and "the MLP" in proc.stderr
    assert not (tmp_path / "out").exists()


def _sft(tmp_path, **overrides):
    from trainer_helpers import sft_config, sft_dataset, tiny_tokenizer

    from alps_trl.trainers.sft import AlpsSFTTrainer

    args = sft_config(str(tmp_path / "out"), alps_save_adapter=True, alps_strategy="random", **overrides)
    return AlpsSFTTrainer(
        model=tiny_model("llama"), args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer()
    )


def test_trainer_refuses_export_when_the_rest_trains(tmp_path):
    with pytest.raises(ValueError, match="the MLP, norms and embeddings move too") as err:
        _sft(tmp_path, alps_train_non_attention=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["delta", "mask"])
def test_trainer_saves_the_adapter_that_transformers_loads(tmp_path, mode):
    """alps_save_adapter writes output_dir/adapter at save_model (not in checkpoints); transformers' own
    model.load_adapter gives the trained model's logits; the recipes' summary names the directory."""
    from transformers import AutoModelForCausalLM

    from alps_trl.recipes.report import output_lines

    trainer = _sft(tmp_path, alps_train_non_attention=False, alps_mode=mode, save_steps=2, max_steps=2)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert (out / "adapter" / ADAPTER_WEIGHTS).is_file() and not (out / "checkpoint-2" / "adapter").exists()
    assert json.loads((out / "adapter" / ADAPTER_HEADS).read_text())["heads"] == [
        list(h) for h in trainer.head_selection.heads
    ]
    expected = _logits(trainer.model)
    base = tiny_model("llama")
    base.load_adapter(str(out / "adapter"))
    torch.testing.assert_close(_logits(base), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out)), expected, rtol=0, atol=1e-5)
    assert f"PEFT adapter: {out / 'adapter'}" in output_lines(str(out))


def test_trainer_uniform_rank_adapter_has_one_rank(tmp_path):
    """alps_adapter_uniform_rank=True through the trainer: adapter_config.json names one rank (the largest
    per-module one) and no rank_pattern, every saved lora_A/lora_B has that rank, and it is the trained update."""
    from trainer_helpers import sft_config, sft_dataset, tiny_tokenizer

    from alps_trl.trainers.sft import AlpsSFTTrainer

    model = tiny_model("llama")
    args = sft_config(str(tmp_path / "out"), alps_save_adapter=True, alps_adapter_uniform_rank=True,
                      alps_train_non_attention=False, max_steps=2)  # fmt: skip
    trainer = AlpsSFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer(),
                             head_selection=selection_for(model))  # fmt: skip
    trainer.train()
    trainer.save_model()
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    per_module = _export(trainer.model, trainer.restriction, tmp_path / "per_module")
    assert len(set(per_module.ranks.values())) > 1  # two query heads in layer 0: q_proj has rank 16, the rest 8
    assert config["r"] == config["lora_alpha"] == per_module.max_rank and not config["rank_pattern"]
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        ranks = {}
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if ".lora_A." in key:
                ranks[key] = shape[0]
            elif ".lora_B." in key:
                ranks[key] = shape[1]
    assert len(ranks) == 2 * len(per_module.ranks) and set(ranks.values()) == {config["r"]}
    base = tiny_model("llama")
    base.load_adapter(str(adapter))
    torch.testing.assert_close(_logits(base), _logits(trainer.model), rtol=0, atol=1e-5)
