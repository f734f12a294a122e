"""Scoring streams q/k/v rows: its peak memory stays far below loading the model.

The checkpoint (~290 MB, float32) is dominated by embeddings, lm_head and wide MLPs, as real LLMs are.
Peak RSS is the kernel's high-water mark (VmHWM), measured in fresh subprocesses as the increment
over the current RSS after the imports. "Loading" is from_pretrained followed by reading every
parameter once: transformers memory-maps safetensors lazily, so a model costs its full size once it
runs a forward pass, not at from_pretrained time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
DIMS = dict(vocab_size=32000, hidden_size=512, intermediate_size=8192, num_hidden_layers=3)
HEADS, KV, HEAD_DIM = 8, 2, 64

# VmHWM (this process's peak RSS), not ru_maxrss: ru_maxrss survives exec and would report the parent's peak.
MEMORY = r"""
def status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
"""

SCORE = (
    MEMORY
    + r"""
import json, sys
import torch
from alps_trl.localization.scoring import score_heads
before = status_kb("VmRSS")
scores = score_heads(sys.argv[1], sys.argv[2], device="cpu")
after = status_kb("VmHWM")
print(json.dumps({"before_kb": before, "after_kb": after, "shape": list(scores.shape)}))
"""
)

LOAD = (
    MEMORY
    + r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
before = status_kb("VmRSS")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())
after = status_kb("VmHWM")
print(json.dumps({"before_kb": before, "after_kb": after}))
"""
)


def _write_checkpoint(path: Path, seed: int) -> int:
    """A float32 llama checkpoint whose non-attention weights dominate; returns its size in bytes."""
    path.mkdir()
    d, inter, vocab = DIMS["hidden_size"], DIMS["intermediate_size"], DIMS["vocab_size"]
    gen = torch.Generator().manual_seed(seed)

    def filled(*shape):  # content is irrelevant to memory; filling is much faster than sampling
        return torch.empty(*shape).fill_(0.01)

    state = {"model.embed_tokens.weight": filled(vocab, d), "lm_head.weight": filled(vocab, d)}
    state["model.norm.weight"] = torch.ones(d)
    for i in range(DIMS["num_hidden_layers"]):
        p = f"model.layers.{i}"
        state[f"{p}.self_attn.q_proj.weight"] = 0.02 * torch.randn(HEADS * HEAD_DIM, d, generator=gen)
        state[f"{p}.self_attn.k_proj.weight"] = 0.02 * torch.randn(KV * HEAD_DIM, d, generator=gen)
        state[f"{p}.self_attn.v_proj.weight"] = 0.02 * torch.randn(KV * HEAD_DIM, d, generator=gen)
        state[f"{p}.self_attn.o_proj.weight"] = filled(d, HEADS * HEAD_DIM)
        state[f"{p}.mlp.gate_proj.weight"] = filled(inter, d)
        state[f"{p}.mlp.up_proj.weight"] = filled(inter, d)
        state[f"{p}.mlp.down_proj.weight"] = filled(d, inter)
        state[f"{p}.input_layernorm.weight"] = torch.ones(d)
        state[f"{p}.post_attention_layernorm.weight"] = torch.ones(d)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        head_dim=HEAD_DIM,
        tie_word_embeddings=False,
        dtype="float32",
        **DIMS,
    )
    (path / "config.json").write_text(json.dumps(config))
    return os.path.getsize(path / "model.safetensors")


def _run(script: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    size = _write_checkpoint(root / "base", seed=0)
    _write_checkpoint(root / "task", seed=1)
    return root, size


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc (Linux)")
def test_scoring_peak_memory_is_far_below_loading(big_pair):
    root, size = big_pair
    assert size > 250 * 2**20
    scoring = _run(SCORE, str(root / "base"), str(root / "task"))
    loading = _run(LOAD, str(root / "base"))
    assert scoring["shape"] == [DIMS["num_hidden_layers"], HEADS]
    score_mb = (scoring["after_kb"] - scoring["before_kb"]) / 1024
    load_mb = (loading["after_kb"] - loading["before_kb"]) / 1024
    print(f"peak RSS increment: scoring base+task {score_mb:.1f} MB, loading base {load_mb:.1f} MB")
    # Loading one model costs about its size; scoring two reads only a few MB of q/k/v rows per layer.
    assert load_mb > 0.8 * size / 2**20
    assert score_mb < load_mb / 3
    assert score_mb < 64
