"""Resuming from a checkpoint reuses the saved head selection (no re-localization) and stays restricted."""

import os

import pytest
import torch
from trainer_helpers import (
    assert_restricted,
    qkv_snapshot,
    save_tiny_model,
    sft_config,
    sft_dataset,
    tiny_model,
    tiny_tokenizer,
)

from alps_trl.localization.selection import HeadSelection
from alps_trl.trainers import probe
from alps_trl.trainers.sft import AlpsSFTTrainer

RUN = dict(weight_decay=0.1, gradient_accumulation_steps=2, max_grad_norm=1.0, max_steps=4, save_strategy="steps",
           save_steps=2, alps_probe_steps=1)  # fmt: skip


def _trainer(arch, out, **overrides):
    return AlpsSFTTrainer(
        model=tiny_model(arch),
        args=sft_config(str(out), **{**RUN, **overrides}),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
    )


@pytest.mark.compat
@pytest.mark.parametrize(("arch", "mode"), [("llama", "mask"), ("qwen2", "delta")])
def test_resume_reuses_selection_and_matches_uninterrupted_run(arch, mode, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = _trainer(arch, out, alps_mode=mode)
    first.train()
    checkpoint = out / "checkpoint-2"
    assert first.head_source == "probe"
    assert HeadSelection.load(checkpoint / "alps_heads.json") == first.head_selection
    if mode == "delta":
        assert os.path.isfile(checkpoint / "alps_delta.safetensors")

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran again on resume")

    monkeypatch.setattr(probe, "run_probe", no_probe)
    base = qkv_snapshot(tiny_model(arch))
    # As TRL's scripts resume: the checkpoint in the arguments (the constructor restores its heads) and in train().
    resumed = _trainer(arch, tmp_path / "resumed", alps_mode=mode, resume_from_checkpoint=str(checkpoint))
    assert resumed.head_selection == first.head_selection
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.head_source == "checkpoint"
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


def test_load_best_model_at_end_in_delta_mode(tmp_path):
    """A day-one setup (model path, no processing_class, evaluation, save_total_limit, load_best_model_at_end):
    the best delta-mode checkpoint (merged weights) loads as base + its deltas, not merged weights + final deltas."""
    from safetensors.torch import load_file

    from alps_trl.restriction.delta import merge_state_dict

    model_dir = save_tiny_model(str(tmp_path / "base"), "llama")
    base = qkv_snapshot(tiny_model("llama"))
    args = sft_config(str(tmp_path / "out"), alps_mode="delta", alps_probe_steps=1, max_steps=3, eval_strategy="steps",
                      eval_steps=1, save_strategy="steps", save_steps=1, save_total_limit=1,
                      load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)  # fmt: skip
    trainer = AlpsSFTTrainer(model=model_dir, args=args, train_dataset=sft_dataset(8), eval_dataset=sft_dataset(4))
    trainer.train()

    best = trainer.state.best_model_checkpoint
    checkpoints = sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) <= 2 and os.path.basename(best) in checkpoints
    for name in ["", *checkpoints]:
        assert os.path.isfile(tmp_path / "out" / name / "alps_heads.json"), name
        assert os.path.isfile(tmp_path / "out" / name / "alps_heads.png"), name
    params = dict(trainer.model.named_parameters())
    for name, old in base.items():  # the frozen base stays the original model
        assert torch.equal(params[name].detach(), old), name
    effective = merge_state_dict(trainer.model.state_dict(), trainer.restriction.delta_state_dict(trainer.model))
    saved = load_file(os.path.join(best, "model.safetensors"))
    for name in base:
        torch.testing.assert_close(effective[name], saved[name], atol=1e-6, rtol=0, msg=name)


def test_resume_with_other_alps_options_keeps_the_saved_heads_and_warns(tmp_path):
    from transformers.testing_utils import CaptureLogger

    from alps_trl.localization.anatomy import AttentionLayout
    from alps_trl.trainers import head_sources
    from alps_trl.trainers.config import AlpsArguments

    model = tiny_model("llama")
    layout = AttentionLayout.from_model(model)
    saved = HeadSelection(2, 8, 2, [(0, 1), (1, 6)], ratio=0.1, strategy="top_k", metric="pad", head_dim=8,
                          hidden_size=64, model_type="llama")  # fmt: skip
    saved.save(tmp_path / "alps_heads.json")
    with CaptureLogger(head_sources.logger) as same:
        assert head_sources.selection_from_checkpoint(str(tmp_path), layout, None, AlpsArguments()) == saved
    assert "ignored" not in same.out
    asked = AlpsArguments(alps_ratio=0.5, alps_metric="kl")
    with CaptureLogger(head_sources.logger) as other:
        assert head_sources.selection_from_checkpoint(str(tmp_path), layout, None, asked) == saved
    assert "alps_ratio=0.1 (now 0.5)" in other.out and "alps_metric='pad' (now 'kl')" in other.out
    assert "new run" in other.out


def test_resume_in_another_alps_mode_is_refused_before_loading(tmp_path):
    from alps_trl.trainers.checkpoints import DELTA_FILE, check_resume_mode

    delta_run, mask_run, sharded = tmp_path / "delta", tmp_path / "mask", tmp_path / "sharded"
    for directory in (delta_run, mask_run, sharded / "pytorch_model_fsdp_0"):
        directory.mkdir(parents=True)
    (delta_run / DELTA_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match="Resume with alps_mode='delta'"):
        check_resume_mode(str(delta_run), "mask")
    with pytest.raises(ValueError, match="alps_mode='mask' for a full-weight checkpoint"):
        check_resume_mode(str(mask_run), "delta")
    check_resume_mode(str(delta_run), "delta")
    check_resume_mode(str(mask_run), "mask")
    check_resume_mode(str(sharded), "delta")  # FSDP sharded checkpoints keep the deltas by parameter name


@pytest.mark.parametrize("mode", ["mask", "delta"])
def test_train_resume_swaps_in_the_checkpoint_selection(mode, tmp_path):
    """A trainer built without the checkpoint in its arguments (here: random heads) and then
    train(resume_from_checkpoint=...) trains the checkpoint's heads, restricted as they were."""
    out = tmp_path / "run"
    first = _trainer("llama", out, alps_mode=mode)
    first.train()
    base = qkv_snapshot(tiny_model("llama"))
    resumed = _trainer("llama", tmp_path / "resumed", alps_mode=mode, alps_strategy="random", alps_seed=7)
    constructed = resumed.head_selection
    assert constructed != first.head_selection
    trainable_before = sum(p.numel() for p in resumed.model.parameters() if p.requires_grad)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.head_source == "checkpoint"
    assert resumed.head_selection == first.head_selection
    assert HeadSelection.load(tmp_path / "resumed" / "alps_heads.json") == first.head_selection
    assert not [n for n, _ in resumed.model.named_modules() if n.count("alps_delta") > 1]
    if mode == "mask":
        assert_restricted(base, resumed.model, resumed.head_selection)
    else:
        assert trainable_before > 0


def test_selection_of_a_trained_trainer_cannot_be_swapped(tmp_path):
    first = _trainer("llama", tmp_path / "run", max_steps=2)
    first.train()
    other = _trainer("llama", tmp_path / "other", alps_strategy="random", alps_seed=7, max_steps=2)
    other.train()
    with pytest.raises(ValueError, match="Build a new trainer"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
