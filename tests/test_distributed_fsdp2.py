"""FSDP2 on CPU (gloo) through `accelerate launch` with recipes/accelerate_configs/fsdp2.yaml and fsdp2_qlora.yaml.

accelerate turns only GPU-type states into FSDP; tests/distributed/train_tiny.py --fsdp applies the CPU switch from
docs/platform.md (state marked MULTI_GPU before the trainer builds its Accelerator), so these are real fully_shard
runs: every test asserts FSDP2 DTensor parameters and the world size it meant. Checks run on the gathered full
tensors (deltas merged in delta mode).
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed_helpers import (
    accelerate_launch,
    assert_run_exact,
    make_tiny_base,
    read_reports,
    state_digest,
)

pytestmark = pytest.mark.distributed

TWO_RANK = [
    "sft-mask",
    "sft-delta",
    "dpo-mask",
    "sft-mask-resume",
    "sft-delta-resume",
    "sft-delta-bf16",
    "grpo-mask",
    "grpo-delta",
]
THREE_RANK = ["sft-mask", "sft-delta"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="module")
def fsdp2_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    # --writer-only-save: the final save_model calls _save on rank 0 only (the delta gather happens before).
    args = ["--base", str(tiny_base), "--out", str(out), "--scenarios", ",".join(TWO_RANK), "--fsdp", "--save",
            "--writer-only-save"]  # fmt: skip
    accelerate_launch("fsdp2.yaml", 2, args)
    return out


@pytest.mark.parametrize("scenario", TWO_RANK)
def test_fsdp2_two_ranks_unselected_rows_exact(fsdp2_run, scenario):
    reports = read_reports(fsdp2_run, scenario, 2)
    assert_run_exact(reports, world_size=2, distributed_type="FSDP", fsdp=True)
    if scenario.startswith("dpo"):
        # Sharded backends precompute the reference log-probs instead of swapping rows inside the sharded policy.
        assert reports[0]["reference_kind"] == "precomputed"
    elif scenario == "grpo-mask":  # mask mode, the rest training: a frozen copy, sharded like the policy
        assert reports[0]["reference_kind"] == "copy"
    elif scenario == "grpo-delta":  # delta mode, heads only: the deltas switched off, even under FSDP2
        assert reports[0]["reference_kind"] == "parameter-free"


def test_fsdp2_bf16_base_delta_mode_takes_the_trainable_dtype(fsdp2_run):
    """A bf16 base with trainable MLP/norms: fp32 deltas beside bf16 weights in one FSDP2 layer would fail ("FSDP
    expects uniform original parameter dtype"); the deltas are bf16 there, and the unselected rows stay exact."""
    reports = read_reports(fsdp2_run, "sft-delta-bf16", 2)
    assert_run_exact(reports, world_size=2, distributed_type="FSDP", fsdp=True)
    for r in reports:
        assert r["delta_dtypes"] == ["torch.bfloat16"] and r["deltas_trained"] and r["base_qkv_untouched"]
        assert len(r["losses"]) == 3 and all(loss == loss for loss in r["losses"])  # no NaN
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(fsdp2_run / "sft-delta-bf16" / "final", dtype=torch.bfloat16)
    assert state_digest({n: p.detach() for n, p in final.named_parameters()}) == reports[0]["digest"]


@pytest.mark.parametrize("scenario", ["sft-mask", "sft-delta", "dpo-mask"])
def test_fsdp2_final_save_is_a_standard_checkpoint(fsdp2_run, scenario):
    """fsdp2.yaml saves SHARDED_STATE_DICT checkpoints, yet the final save_model gathers a full, loadable model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    final = fsdp2_run / scenario / "final"
    rank0 = read_reports(fsdp2_run, scenario, 2)[0]
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "alps" in k]
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert state_digest({n: p.detach() for n, p in model.named_parameters()}) == rank0["digest"]
    assert json.loads((final / "alps_heads.json").read_text())["fingerprint"] == rank0["fingerprint"]


@pytest.mark.parametrize("scenario", ["sft-mask-resume", "sft-delta-resume"])
def test_fsdp2_checkpoint_resumes_with_the_same_selection(fsdp2_run, scenario):
    """A sharded checkpoint resumes with the heads it was trained with, not the ones the new config would pick."""
    from transformers import AutoModelForCausalLM

    from alps_trl.localization.selection import HeadSelection, num_selected, select_random

    run = fsdp2_run / scenario
    checkpoint = run / "checkpoint-2"
    assert list(checkpoint.glob("pytorch_model_fsdp_0")), "intermediate checkpoints should be sharded"
    saved = HeadSelection.load(checkpoint / "alps_heads.json")
    for r in read_reports(fsdp2_run, scenario, 2):
        assert r["first_run_fingerprint"] == r["fingerprint"] == saved.fingerprint()
    # The resumed trainer was configured with alps_strategy="random", alps_seed=123: it would have picked these.
    k = num_selected(0.1, 2, 8)
    would_pick = HeadSelection(2, 8, 2, select_random(2, 8, k, 123))
    assert would_pick.fingerprint() != saved.fingerprint()
    model = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    assert saved.check_compatible(model) is None


@pytest.fixture(scope="module")
def fsdp2_three_rank_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_3")
    args = ["--base", str(tiny_base), "--out", str(out), "--scenarios", ",".join(THREE_RANK), "--fsdp"]
    accelerate_launch("fsdp2.yaml", 3, args)
    return out


@pytest.mark.parametrize("scenario", THREE_RANK)
def test_fsdp2_three_ranks_uneven_shards_exact(fsdp2_three_rank_run, scenario):
    reports = read_reports(fsdp2_three_rank_run, scenario, 3)
    assert_run_exact(reports, world_size=3, distributed_type="FSDP", fsdp=True)
    rows = [shape[0] for shape in reports[0]["shapes"].values()]
    assert any(n % 3 for n in rows), f"no restricted tensor is sharded unevenly over 3 ranks: {rows}"


def test_fsdp2_four_bit_base_trains_deltas_only(tiny_base, tmp_path):
    """NF4 base with bf16 quant storage (fsdp2_qlora.yaml) sharded by FSDP2 on CPU: deltas train, base stays."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from alps_trl.restriction.delta import merge_delta_checkpoint

    out = tmp_path / "out"
    args = ["--base", str(tiny_base), "--out", str(out), "--scenarios", "sft-delta-4bit", "--fsdp", "--save"]
    accelerate_launch("fsdp2_qlora.yaml", 2, args)
    reports = read_reports(out, "sft-delta-4bit", 2)
    assert_run_exact(reports, world_size=2, distributed_type="FSDP", fsdp=True)
    for r in reports:
        assert r["mode"] == "delta"
        assert r["base_untouched"], r["changed_base_tensors"]
        assert r["deltas_trained"] and r["num_deltas"] == 6  # q/k/v of both layers carry a selected head
    final = out / "sft-delta-4bit" / "final"
    merged = tmp_path / "merged"
    merge_delta_checkpoint(tiny_base, final / "alps_delta.safetensors", merged)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).named_parameters())
    changed = {n for n in base if not torch.equal(base[n], after[n])}
    hd, selected_q = 8, {0: [1], 1: [6]}
    for layer, heads in selected_q.items():
        prefix = f"model.layers.{layer}.self_attn"
        q_rows = [r for h in heads for r in range(h * hd, (h + 1) * hd)]
        kv_rows = [r for g in sorted({h // 4 for h in heads}) for r in range(g * hd, (g + 1) * hd)]
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            name = f"{prefix}.{proj}.weight"
            frozen = torch.ones(base[name].shape[0], dtype=torch.bool)
            frozen[rows] = False
            assert torch.equal(base[name][frozen], after[name][frozen]), name
            assert (base[name][~frozen] != after[name][~frozen]).any(dim=-1).all(), name
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkv"}
    assert all(torch.isfinite(p.detach()).all() for p in after.values())
