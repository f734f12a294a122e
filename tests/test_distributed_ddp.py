"""Two-process DDP (gloo, CPU) through `accelerate launch` with recipes/accelerate_configs/multi_gpu.yaml.

One launch trains four tiny runs in the same processes (SFT mask and delta; DPO mask with attention-only training
and the parameter-free reference; DPO delta with the rest of the network training and precomputed reference
log-probs) and saves each final model; the tests below read what every rank reported.
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

SCENARIOS = [
    "sft-mask",
    "sft-delta",
    "dpo-mask",
    "dpo-delta",
    "dpo-delta-memory",
    "dpo-delta-memory-copyref",
    "sft-probe",
    "grpo-mask",
    "grpo-delta",
]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    base = make_tiny_base(tmp_path_factory.mktemp("tiny_base"))
    out = tmp_path_factory.mktemp("ddp")
    # --writer-only-save: the final save_model calls _save on rank 0 only; every scenario's rank 0 also reads
    # trainer.head_selection alone before train(). Both must finish (no collective started on one rank).
    args = ["--base", str(base), "--out", str(out), "--scenarios", ",".join(SCENARIOS), "--save", "--writer-only-save"]
    accelerate_launch("multi_gpu.yaml", 2, args)
    return base, out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ddp_two_ranks_unselected_rows_exact(ddp_run, scenario):
    _, out = ddp_run
    reports = read_reports(out, scenario, 2)
    # gloo DDP on CPU reports MULTI_CPU; the wrapper proves DDP really ran.
    assert_run_exact(reports, world_size=2, distributed_type="MULTI_CPU", fsdp=False)
    if scenario == "dpo-mask":
        assert reports[0]["reference_kind"] == "parameter-free"
    elif scenario in ("dpo-delta", "dpo-delta-memory"):
        assert reports[0]["reference_kind"] == "precomputed"
    elif scenario == "grpo-mask":
        assert reports[0]["reference_kind"] == "copy"
    elif scenario == "grpo-delta":
        assert reports[0]["reference_kind"] == "parameter-free"


def test_ddp_probe_ranks_train_on_their_own_shares(ddp_run):
    """The probe (no selection given) under 2 ranks: each rank trains on different batches, PROBE_STEPS x
    accumulation of them, and both end with the same selection, computed from the probe."""
    _, out = ddp_run
    reports = read_reports(out, "sft-probe", 2)
    digests = [r["probe_batch_digests"] for r in reports]
    assert len(digests[0]) == len(digests[1]) == 2 * 2  # PROBE_STEPS steps x gradient_accumulation_steps 2
    assert not set(digests[0]) & set(digests[1]), "the ranks trained the probe on the same batches"
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]
    assert "probe" in reports[0]["provenance"]["task"]


def test_ddp_dpo_in_memory_dataset_precomputes_exact_reference(ddp_run):
    """Dataset.from_dict data under 2 ranks: TRL's precompute cache would live in rank 0's temporary directory
    (FileNotFoundError on rank 1); ALPS keeps the reference log-probs in memory instead, no model copy, and the
    losses equal those of an explicit deepcopy reference."""
    _, out = ddp_run
    memory = read_reports(out, "dpo-delta-memory", 2)
    copyref = read_reports(out, "dpo-delta-memory-copyref", 2)
    assert [r["reference_kind"] for r in memory + copyref] == ["precomputed"] * 2 + ["user"] * 2
    assert len(memory[0]["losses"]) == 3 and memory[0]["losses"] == memory[1]["losses"]
    torch.testing.assert_close(
        torch.tensor(memory[0]["losses"]), torch.tensor(copyref[0]["losses"]), atol=1e-6, rtol=0
    )


def test_ddp_final_checkpoint_is_the_trained_model(ddp_run):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, out = ddp_run
    for scenario in SCENARIOS:
        final = out / scenario / "final"
        rank0 = read_reports(out, scenario, 2)[0]
        with safe_open(str(final / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "alps" in k], "deltas must be merged, not saved as extra tensors"
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        state = {n: p.detach() for n, p in model.named_parameters()}
        assert state_digest(state) == rank0["digest"], scenario
        heads = json.loads((final / "alps_heads.json").read_text())
        assert heads["fingerprint"] == rank0["fingerprint"]


def test_ddp_selection_mismatch_fails_loudly(tmp_path):
    base = make_tiny_base(tmp_path / "base")
    args = ["--base", str(base), "--out", str(tmp_path / "out"), "--scenarios", "sft-mask", "--mismatch"]
    proc = accelerate_launch("multi_gpu.yaml", 2, args, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "computed head selection" in output and "main process uses" in output, output[-3000:]
    assert not (tmp_path / "out" / "sft-mask" / "rank0.json").exists(), "training must not start"


def test_ddp_overhead_benchmark_runs_side_by_side():
    """benchmarks/cost/ddp_overhead.py (shrunk): a real 2-rank DDP launch that prints both medians and the ratio."""
    import re
    import subprocess
    import sys

    from distributed_helpers import REPO, child_env

    cmd = [sys.executable, "-m", "benchmarks.cost.ddp_overhead", "--blocks", "2", "--block-steps", "1",
           "--warmup", "1", "--hidden", "64", "--layers", "1", "--vocab", "256", "--seq-len", "32"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "DDP step time, 2 ranks (MULTI_CPU, cpu)" in proc.stdout
    assert re.search(r"\| full fine-tuning \| [\d.]+ \|", proc.stdout) and re.search(
        r"\| ALPS mask \| [\d.]+ \|", proc.stdout
    )
    assert re.search(r"step time \(median\): \d+\.\d{3}", proc.stdout)
