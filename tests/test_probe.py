"""The probe on low-precision weights: float32 master copies keep small updates that bf16 would round away."""

import pytest
import torch
from trainer_helpers import sft_config, sft_dataset, tiny_model, tiny_tokenizer

from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.trainers.sft import AlpsSFTTrainer

PLANTED = [(0, 5), (1, 6)]  # late indices: a probe that learned nothing would pick (0, 0) and (0, 1) on ties


def _planted_model(dtype: torch.dtype) -> torch.nn.Module:
    """A tiny MHA model whose output reads only the PLANTED heads (o_proj columns of the others are zero), with
    every q/k/v weight at least 0.01 in magnitude, where a step of lr 1e-5 is below half a bf16 ulp."""
    model = tiny_model("llama", num_key_value_heads=8)
    layout = AttentionLayout.from_model(model)
    with torch.no_grad():
        for lp in layout.layers:
            attn = model.model.layers[lp.layer].self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                w = proj.weight
                w.copy_(torch.sign(w) * (0.01 + w.abs()))
            keep = torch.zeros_like(attn.o_proj.weight)
            for layer, head in PLANTED:
                if layer == lp.layer:
                    cols = layout.q_rows(head)
                    keep[:, cols.start : cols.stop] = 1
            attn.o_proj.weight.mul_(keep)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_probe_finds_planted_heads_in_bf16_as_in_fp32(dtype, tmp_path):
    model = _planted_model(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = sft_config(
        str(tmp_path), learning_rate=1e-5, alps_probe_steps=2, alps_ratio=len(PLANTED) / 16, max_steps=10
    )
    trainer = AlpsSFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer())
    assert sorted(trainer.head_selection.heads) == PLANTED
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), f"the probe left a trace in {name}"
