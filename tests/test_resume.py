"""Resuming from a checkpoint reuses the saved head selection (no re-localization) and stays restricted."""

import os

import pytest
import torch
from trainer_helpers import assert_restricted, qkv_snapshot, sft_config, sft_dataset, tiny_model, tiny_tokenizer

from alps_trl import probe
from alps_trl.selection import HeadSelection
from alps_trl.sft_trainer import AlpsSFTTrainer

RUN = dict(weight_decay=0.1, gradient_accumulation_steps=2, max_grad_norm=1.0, max_steps=4, save_strategy="steps",
           save_steps=2, alps_probe_steps=1)  # fmt: skip


def _trainer(arch, out, **overrides):
    return AlpsSFTTrainer(
        model=tiny_model(arch),
        args=sft_config(str(out), **{**RUN, **overrides}),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
    )


@pytest.mark.parametrize(("arch", "mode"), [("llama", "mask"), ("qwen2", "delta")])
def test_resume_reuses_selection_and_matches_uninterrupted_run(arch, mode, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = _trainer(arch, out, alps_mode=mode)
    first.train()
    checkpoint = out / "checkpoint-2"
    assert first._alps_source == "probe"
    assert HeadSelection.load(checkpoint / "alps_heads.json") == first.head_selection
    if mode == "delta":
        assert os.path.isfile(checkpoint / "alps_delta.safetensors")

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran again on resume")

    monkeypatch.setattr(probe, "run_probe", no_probe)
    base = qkv_snapshot(tiny_model(arch))
    resumed = _trainer(arch, tmp_path / "resumed", alps_mode=mode)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed._alps_source == "checkpoint"
    assert resumed.head_selection == first.head_selection
    assert resumed.state.global_step == 4
    if mode == "mask":
        assert_restricted(base, resumed.model, resumed.head_selection)
    else:  # the frozen base tensors are the original ones, not the merged checkpoint's
        params = dict(resumed.model.named_parameters())
        for name, old in base.items():
            assert torch.equal(params[name].detach(), old), name
    for (n, a), (_, b) in zip(first.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=n)
