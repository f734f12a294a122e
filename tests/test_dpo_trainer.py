"""AlpsDPOTrainer: restricted training, the reference model it keeps (or does not), drop-in use."""

import copy

import pytest
import torch
from trainer_helpers import (
    assert_restricted,
    dpo_config,
    dpo_dataset,
    full_snapshot,
    non_attention_changed,
    qkv_snapshot,
    save_tiny_model,
    tiny_model,
    tiny_tokenizer,
)

from alps_trl.localization.selection import HeadSelection
from alps_trl.trainers.dpo import AlpsDPOTrainer
from alps_trl.trainers.reference import AlpsReferenceModel

HARD = dict(weight_decay=0.1, gradient_accumulation_steps=2, max_grad_norm=1.0, max_steps=3)
SELECTION = HeadSelection(2, 8, 2, [(0, 2), (1, 5)], head_dim=8, hidden_size=64, model_type="llama")


def _run(out, model, ref_model=None, head_selection=SELECTION, **overrides):
    trainer = AlpsDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=dpo_config(str(out), **{**HARD, **overrides}),
        train_dataset=dpo_dataset(),
        processing_class=tiny_tokenizer(),
        head_selection=head_selection,
    )
    trainer.train()
    return trainer


def _losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


@pytest.fixture(scope="module")
def attention_only_runs(tmp_path_factory):
    """Mask mode, only the selected heads train: parameter-free reference vs an explicit deepcopy reference."""
    out = tmp_path_factory.mktemp("dpo_attn")
    model = tiny_model("llama")
    before, qkv = full_snapshot(model), qkv_snapshot(model)
    copy_ref = copy.deepcopy(model)
    free = _run(out / "free", model, alps_train_non_attention=False)
    explicit = _run(out / "copy", tiny_model("llama"), ref_model=copy_ref, alps_train_non_attention=False)
    return free, explicit, before, qkv


def test_parameter_free_reference_holds_no_copy(attention_only_runs):
    free, explicit, _, _ = attention_only_runs
    assert free.reference_kind == "parameter-free" and explicit.reference_kind == "user"
    assert isinstance(free.ref_model, AlpsReferenceModel)
    assert sum(p.numel() for p in free.ref_model.parameters()) == 0
    assert sum(p.numel() for p in explicit.ref_model.parameters()) == sum(p.numel() for p in free.model.parameters())


def test_parameter_free_reference_gives_the_copy_reference_losses(attention_only_runs):
    free, explicit, _, _ = attention_only_runs
    torch.testing.assert_close(_losses(free), _losses(explicit), atol=1e-6, rtol=0)
    assert len(_losses(free)) == 3
    for (n, a), (_, b) in zip(free.model.named_parameters(), explicit.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=n)


@pytest.mark.compat
def test_attention_only_dpo_is_restricted(attention_only_runs):
    free, _, before, qkv = attention_only_runs
    assert_restricted(qkv, free.model, free.head_selection)
    assert not non_attention_changed(before, free.model)


@pytest.fixture(scope="module")
def full_delta_runs(tmp_path_factory):
    """qwen2 delta mode with the rest of the network training: precomputed reference vs a deepcopy reference."""
    out = tmp_path_factory.mktemp("dpo_delta")
    selection = HeadSelection(2, 8, 2, [(0, 6), (1, 1)], head_dim=8, hidden_size=64, model_type="qwen2")
    model = tiny_model("qwen2")
    before, qkv = full_snapshot(model), qkv_snapshot(model)
    copy_ref = copy.deepcopy(model)
    pre = _run(out / "pre", model, head_selection=selection, alps_mode="delta")
    explicit = _run(out / "copy", tiny_model("qwen2"), ref_model=copy_ref, head_selection=selection, alps_mode="delta")
    return pre, explicit, before, qkv


@pytest.mark.compat
def test_precomputed_reference_when_everything_else_trains(full_delta_runs):
    pre, explicit, before, qkv = full_delta_runs
    assert pre.reference_kind == "precomputed" and pre.ref_model is None and pre.args.precompute_ref_log_probs
    torch.testing.assert_close(_losses(pre), _losses(explicit), atol=1e-6, rtol=0)
    params = dict(pre.model.named_parameters())
    for name, old in qkv.items():  # frozen base tensors, biases included
        assert torch.equal(params[name].detach(), old), name
    assert any(p.abs().sum() > 0 for n, p in params.items() if ".alps_delta." in n)
    assert non_attention_changed(before, pre.model)


def test_drop_in_trl_docs_script(tmp_path):
    """TRL's DPO quickstart, only the class name changed (model given as a path, plain DPOConfig)."""
    from trl import DPOConfig

    model_dir = save_tiny_model(str(tmp_path / "base"))
    train_dataset = dpo_dataset()

    training_args = DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to="none", max_steps=2,
                              per_device_train_batch_size=2, use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = AlpsDPOTrainer(model=model_dir, args=training_args, train_dataset=train_dataset)
    trainer.train()

    assert trainer.state.global_step == 2
    assert trainer.reference_kind == "precomputed" and trainer.ref_model is None


def test_sync_ref_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync_ref_model"):
        AlpsDPOTrainer(
            model=tiny_model("llama"),
            args=dpo_config(str(tmp_path), sync_ref_model=True),
            train_dataset=dpo_dataset(),
            processing_class=tiny_tokenizer(),
        )


def test_precompute_needs_map_style_data():
    """In-memory data precomputes with any number of processes (kept in memory, see test_distributed_ddp);
    only an IterableDataset, for training or evaluation, falls back to a reference copy."""
    from types import SimpleNamespace

    from datasets import Dataset

    from alps_trl.trainers.dpo import _can_precompute

    in_memory = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    streamed = in_memory.to_iterable_dataset()
    assert _can_precompute(SimpleNamespace(world_size=1), in_memory)
    assert _can_precompute(SimpleNamespace(world_size=2), in_memory, {"eval": in_memory})
    assert not _can_precompute(SimpleNamespace(world_size=1), streamed)
    assert not _can_precompute(SimpleNamespace(world_size=2), in_memory, streamed)
    assert not _can_precompute(SimpleNamespace(world_size=2), in_memory, {"a": in_memory, "b": streamed})
