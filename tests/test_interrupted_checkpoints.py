"""A checkpoint whose save was interrupted (no trainer_state.json, or one cut short) is never resumed from: resuming
with ``True`` or with the path `get_last_checkpoint` returns takes the newest complete checkpoint, moves the broken
one aside (nothing deleted), and ends with the weights of an uninterrupted run."""

import os
import shutil

import pytest
import torch
from trainer_helpers import sft_config, sft_dataset, tiny_model, tiny_tokenizer
from transformers.trainer_utils import get_last_checkpoint

from alps_trl.trainers import checkpoints
from alps_trl.trainers.sft import AlpsSFTTrainer

RUN = dict(max_steps=6, save_strategy="steps", save_steps=2, alps_probe_steps=1, weight_decay=0.1,
           gradient_accumulation_steps=2, max_grad_norm=1.0)  # fmt: skip


def _trainer(out, mode, **overrides):
    return AlpsSFTTrainer(
        model=tiny_model("llama"),
        args=sft_config(str(out), alps_mode=mode, **{**RUN, **overrides}),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
    )


def _break_save(checkpoint, how):
    """What a kill during Trainer's save leaves: trainer_state.json (written last) missing or cut short."""
    state = os.path.join(checkpoint, "trainer_state.json")
    if how == "missing":
        os.remove(state)
        os.remove(os.path.join(checkpoint, "optimizer.pt"))
    else:
        with open(state, "r+b") as f:
            f.truncate(os.path.getsize(state) // 2)


@pytest.mark.parametrize(("mode", "how", "resume"), [("mask", "missing", "last-path"), ("delta", "truncated", True)])
def test_an_interrupted_checkpoint_is_skipped_and_set_aside(mode, how, resume, tmp_path):
    reference = _trainer(tmp_path / "reference", mode)
    reference.train()
    out = tmp_path / "run"
    first = _trainer(out, mode)
    first.train()
    shutil.rmtree(out / "checkpoint-6")
    _break_save(str(out / "checkpoint-4"), how)
    assert checkpoints.checkpoint_problem(str(out / "checkpoint-4")) is not None
    assert checkpoints.checkpoint_problem(str(out / "checkpoint-2")) is None
    given = get_last_checkpoint(str(out)) if resume == "last-path" else resume
    assert given is True or given.endswith("checkpoint-4")  # what users' scripts find: the broken one

    # As TRL's scripts resume: the same value in the arguments (the constructor restores the heads) and in train().
    resumed = _trainer(out, mode, resume_from_checkpoint=given if isinstance(given, str) else "true")
    resumed.train(resume_from_checkpoint=given)

    assert resumed.head_source == "checkpoint"
    assert resumed.head_selection == first.head_selection
    assert resumed.state.global_step == 6
    assert os.path.isdir(out / "incomplete-checkpoint-4")  # kept, out of get_last_checkpoint's sight
    assert checkpoints.checkpoint_problem(str(out / "checkpoint-4")) is None  # saved again, complete
    assert get_last_checkpoint(str(out)).endswith("checkpoint-6")
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_no_complete_checkpoint_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    _trainer(out, "mask", max_steps=2).train()
    _break_save(str(out / "checkpoint-2"), "missing")
    trainer = _trainer(out, "mask")
    with pytest.raises(ValueError, match=r"checkpoint-2: it has no trainer_state.json.*start over") as err:
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="No complete checkpoint found"):
        trainer.train(resume_from_checkpoint="true")


def test_last_complete_checkpoint_orders_by_step(tmp_path):
    for step, complete in [(2, True), (10, True), (12, False), (9, True)]:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoints.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert checkpoints.last_complete_checkpoint(str(tmp_path), before_step=10) == str(tmp_path / "checkpoint-9")
    moved = checkpoints.set_aside_incomplete(str(tmp_path), after_step=10)
    assert moved == [str(tmp_path / "incomplete-checkpoint-12")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2", "checkpoint-9", "checkpoint-x",
                                            "incomplete-checkpoint-12"]  # fmt: skip
