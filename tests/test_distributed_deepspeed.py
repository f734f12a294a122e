"""DeepSpeed ZeRO-2 / ZeRO-3 with ALPS delta mode, through the repo's deepspeed_zero{2,3}.yaml, on CPU (gloo).

Runs only where `deepspeed` is installed (it is not a dependency of alps_trl). DeepSpeed 0.19 runs on the CPU
with its CPU accelerator; tests/distributed/train_tiny.py --deepspeed lets the ranks set up on the CPU and then
lets accelerate build the DeepSpeed state, and makes ZeRO-3 partition even the tiny model's parameters.
"""

from __future__ import annotations

import pytest
import torch
from distributed_helpers import accelerate_launch, assert_run_exact, make_tiny_base, read_reports, state_digest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("config, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_delta_mode_keeps_unselected_rows_and_saves_merged(tmp_path, config, stage):
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    base = make_tiny_base(tmp_path / "base")
    out = tmp_path / "out"
    accelerate_launch(config, 2, ["--base", str(base), "--out", str(out), "--scenarios", "sft-delta", "--deepspeed",
                                  "--save"])  # fmt: skip
    reports = read_reports(out, "sft-delta", 2)
    assert_run_exact(reports, world_size=2, distributed_type="DEEPSPEED", fsdp=False, wrapper="DeepSpeedEngine")
    for r in reports:
        assert r["mode"] == "delta" and r["base_qkv_untouched"] and r["deltas_trained"]
        assert r["zero3_partitioned"] == (stage == 3)
    model = AutoModelForCausalLM.from_pretrained(out / "sft-delta" / "final", dtype=torch.float32)
    assert state_digest({n: p.detach() for n, p in model.named_parameters()}) == reports[0]["digest"]
