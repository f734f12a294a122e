"""AlpsGRPOTrainer: the drop-in swap, exactness, the reference without a second copy, vLLM pushes, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import assert_restricted, common_args, qkv_snapshot, save_tiny_model, tiny_model, tiny_tokenizer

from alps_trl import AlpsGRPOConfig, AlpsGRPOTrainer

PAIRS = [(a, b) for a in range(8) for b in range(2)]
PROMPTS = [f"Question: what is {a} plus {b}? Answer:" for a, b in PAIRS]


def grpo_dataset(answers: bool = True):
    """TRL's GRPO example shape: a "prompt" column, plus the reference "solution" (as trl-lib/DeepMath-103K)."""
    from datasets import Dataset

    rows = {"prompt": PROMPTS}
    if answers:
        rows["solution"] = [f" {a + b}." for a, b in PAIRS]
    return Dataset.from_dict(rows)


def length_reward(completions, **kwargs):
    """A verifiable reward: shorter completions score higher."""
    return [1.0 / (1 + len(c)) for c in completions]


def digit_reward(completions, **kwargs):
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def grpo_config(output_dir, plain: bool = False, **overrides):
    from trl import GRPOConfig

    args = common_args(str(output_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=6)
    args.pop("gradient_checkpointing")
    args.update(max_steps=2, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.5, alps_probe_steps=1)
    args.update(overrides)
    if plain:
        args = {k: v for k, v in args.items() if not k.startswith("alps_")}
        return GRPOConfig(**args)
    return AlpsGRPOConfig(**args)


def build(tmp_path, model=None, dataset=None, reward_funcs=(length_reward,), plain=False, **overrides):
    return AlpsGRPOTrainer(
        model=model if model is not None else tiny_model(),
        reward_funcs=list(reward_funcs),
        args=grpo_config(tmp_path / "out", plain=plain, **overrides),
        train_dataset=dataset if dataset is not None else grpo_dataset(),
        processing_class=tiny_tokenizer(),
    )


def test_drop_in_swap_with_a_plain_grpo_config(tmp_path):
    """TRL's documented shape: prompts, reward functions as callables, a plain GRPOConfig (default ALPS options:
    10% of heads by a probe on the reference solutions)."""
    from trl import GRPOConfig

    trainer = build(tmp_path, reward_funcs=(length_reward, digit_reward), plain=True)
    assert isinstance(trainer.args, GRPOConfig) and trainer.head_source == "probe"
    before = qkv_snapshot(trainer.model)
    trainer.train()
    assert_restricted(before, trainer.model, trainer.head_selection)
    assert any("rewards/digit_reward/mean" in h for h in trainer.state.log_history)


@pytest.mark.parametrize(
    ("mode", "rest"), [("mask", True), ("mask", False), ("delta", True), ("delta", False)], ids=str
)
@pytest.mark.compat
def test_unselected_rows_bit_identical(tmp_path, mode, rest):
    """beta > 0, weight decay, clipping, gradient accumulation: unselected q/k/v rows come out bit-identical."""
    trainer = build(
        tmp_path, alps_mode=mode, alps_train_non_attention=rest, beta=0.1, gradient_accumulation_steps=2, max_steps=2
    )
    before = qkv_snapshot(trainer.model)
    trainer.train()
    if mode == "delta":
        trainer.restriction.merge(trainer.model)
    assert_restricted(before, trainer.model, trainer.head_selection)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


@pytest.mark.parametrize(("mode", "rest", "kind", "cast"), [("delta", False, "parameter-free", False), ("mask", False,
                         "parameter-free", False), ("delta", True, "copy", False), ("delta", True, "copy", True)],
                         ids=str)  # fmt: skip
@pytest.mark.compat
def test_reference_equals_a_frozen_copy_before_and_after_a_step(tmp_path, mode, rest, kind, cast):
    """The reference's KL term: the no-copy reference (and ALPS's own frozen copy) compute as the untouched base,
    at step 0 and after training; the policy has moved. With cast_lm_head_to_fp32, TRL's patched LM head of the copy
    must be the copy's own (the policy's head trains)."""
    model = tiny_model()
    frozen = copy.deepcopy(model).eval()
    trainer = build(tmp_path, model=model, alps_mode=mode, alps_train_non_attention=rest, beta=0.1, max_steps=1,
                    cast_lm_head_to_fp32=cast)  # fmt: skip
    assert trainer.reference_kind == kind
    if kind == "parameter-free":
        assert not list(trainer.ref_model.parameters()), "the parameter-free reference holds no weights"
    ids = tiny_tokenizer()(PROMPTS[:3], return_tensors="pt", padding=True)["input_ids"]

    def kl(policy_logits, ref_logits):
        p = torch.log_softmax(policy_logits, -1)
        return (p.exp() * (p - torch.log_softmax(ref_logits, -1))).sum(-1).mean()

    torch.testing.assert_close(_logits(trainer.ref_model, ids), _logits(frozen, ids), rtol=0, atol=1e-5)
    trainer.train()
    ref, base = _logits(trainer.ref_model, ids), _logits(frozen, ids)
    torch.testing.assert_close(ref, base, rtol=0, atol=1e-5)
    policy = _logits(trainer.model, ids)
    assert kl(policy, ref) > 0
    torch.testing.assert_close(kl(policy, ref), kl(policy, base), rtol=1e-4, atol=1e-7)


def test_beta_with_a_model_from_a_path_loads_it_once(tmp_path, monkeypatch):
    """TRL would load the model a second time by name for the reference; ALPS copies it in memory."""
    import trl.trainer.grpo_trainer as grpo

    loads = []
    original = grpo.create_model_from_path
    monkeypatch.setattr(grpo, "create_model_from_path", lambda *a, **k: loads.append(a) or original(*a, **k))
    path = save_tiny_model(str(tmp_path / "base"))
    trainer = build(tmp_path, model=path, beta=0.1, alps_train_non_attention=True)
    assert len(loads) == 1 and trainer.reference_kind == "copy"
    trainer.train()


def test_beta_with_a_model_built_in_memory(tmp_path):
    """A model with no name to reload (TRL: OSError) trains with a KL term."""
    model = tiny_model()
    model.config._name_or_path = ""
    trainer = build(tmp_path, model=model, beta=0.1, alps_train_non_attention=True)
    trainer.train()
    assert any(h.get("kl", 0) > 0 for h in trainer.state.log_history)


def test_no_source_of_heads_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no reference answers"):
        build(tmp_path, dataset=grpo_dataset(answers=False))
    # A heads source that needs no answers works on the same data.
    trainer = build(tmp_path, dataset=grpo_dataset(answers=False), alps_strategy="random")
    assert trainer.head_source == "random"


def test_reward_function_returning_the_wrong_length_is_refused(tmp_path):
    trainer = build(tmp_path, reward_funcs=(lambda completions, **kw: [1.0, 2.0, 3.0],))
    before = qkv_snapshot(trainer.model)
    with pytest.raises(ValueError, match="returned 3 rewards"):
        trainer.train()
    after = qkv_snapshot(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before), "a step ran before the refusal"


@pytest.mark.parametrize("vllm_mode", ["server", "colocate"])
@pytest.mark.parametrize("mode", ["delta", "mask"])
def test_vllm_receives_the_effective_weights(tmp_path, mode, vllm_mode):
    trainer = build(tmp_path, alps_mode=mode, alps_train_non_attention=False, max_steps=1)
    trainer.train()
    from alps_trl.testing import RecordingVLLM, RecordingVLLMClient, recording_vllm_generation

    recorder = RecordingVLLMClient() if vllm_mode == "server" else RecordingVLLM()
    recording_vllm_generation(trainer, recorder, vllm_mode).sync_weights()
    merged = copy.deepcopy(trainer.model)
    if mode == "delta":
        trainer.restriction.merge(merged)  # the weights the policy computes with, as a plain model
    expected = dict(merged.named_parameters())
    assert set(recorder.pushed) == set(expected), "delta tensors must not reach vLLM; every weight must"
    for name, tensor in expected.items():
        assert torch.equal(recorder.pushed[name], tensor.detach()), name
    if vllm_mode == "server":
        assert [m[0] for m in recorder.metadata] == list(recorder.pushed)


def _effective_weights(trainer) -> dict[str, torch.Tensor]:
    """The weights the policy computes with, by parameter name (delta mode: base + delta, as saving merges them)."""
    from alps_trl.restriction.delta import merge_state_dict

    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return merge_state_dict(params, trainer.restriction.delta_state_dict(trainer.model))


def push_steps(trainer, vllm_mode: str):
    """TRL's step-0 push onto an engine holding stale weights, one training step, the next push.

    Returns (recorder, effective weights before the step, after the step)."""
    from alps_trl.testing import RecordingVLLM, RecordingVLLMClient, recording_vllm_generation

    recorder = RecordingVLLMClient() if vllm_mode == "server" else RecordingVLLM()
    before = _effective_weights(trainer)
    recorder.held = {name: torch.full_like(t, 7.0) for name, t in before.items()}  # an earlier run's weights
    generation = recording_vllm_generation(trainer, recorder, vllm_mode)
    generation.sync_weights()
    trainer.train()
    generation.sync_weights()
    return recorder, before, _effective_weights(trainer)


@pytest.mark.parametrize("vllm_mode", ["server", "colocate"])
@pytest.mark.parametrize(("mode", "rest"), [("delta", False), ("mask", False), ("delta", True)], ids=str)
def test_push_after_the_first_sends_only_what_changed(tmp_path, mode, rest, vllm_mode):
    """Head-only: the first push is complete (vLLM may hold anything), later ones only the q/k/v tensors with a
    selected row; after each, what vLLM holds equals the policy's effective weights. With the rest training,
    every push is complete."""
    trainer = build(tmp_path, alps_mode=mode, alps_train_non_attention=rest, max_steps=1)
    recorder, before, after = push_steps(trainer, vllm_mode)
    first, second = recorder.pushes
    assert set(first.names) == set(before) and first.bytes == sum(t.numel() * t.element_size() for t in after.values())
    changed = {t.name for t in trainer.restriction.targets if t.num_selected}
    assert set(second.names) == (set(after) if rest else changed)
    assert set(recorder.held) == set(after)
    for name, tensor in after.items():
        assert torch.equal(recorder.held[name], tensor), name
    moved = [n for n in changed if not torch.equal(recorder.pushed[n], before[n])]
    assert moved, "the push after a step carries the trained rows"
    if vllm_mode == "server":
        assert [m[0] for m in recorder.metadata] == second.names
