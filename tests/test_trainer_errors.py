"""Bad combinations are refused when the trainer is built, with a message that says what to change."""

from types import SimpleNamespace

import pytest
import torch
from trainer_helpers import save_tiny_model, sft_config, sft_dataset, tiny_model, tiny_tokenizer

from alps_trl.localization.selection import HeadSelection
from alps_trl.trainers.sft import AlpsSFTTrainer


def _build(tmp_path, model=None, head_selection=None, **overrides):
    return AlpsSFTTrainer(
        model=model if model is not None else tiny_model("llama"),
        args=sft_config(str(tmp_path / "out"), **overrides),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
        head_selection=head_selection,
    )


def test_peft_config_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="cannot be combined with PEFT"):
        AlpsSFTTrainer(
            model=tiny_model("llama"),
            args=sft_config(str(tmp_path)),
            train_dataset=sft_dataset(),
            processing_class=tiny_tokenizer(),
            peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_peft_model_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="PEFT"):
        _build(tmp_path, model=model)


def test_heads_file_for_another_model_shape(tmp_path):
    other = HeadSelection(4, 4, 4, [(0, 1), (3, 2)], head_dim=16, hidden_size=64, model_type="llama")
    other.save(tmp_path / "heads.json")
    with pytest.raises(ValueError, match="num_layers=4"):
        _build(tmp_path, alps_heads=str(tmp_path / "heads.json"))


def test_head_selection_argument_for_another_model_shape(tmp_path):
    other = HeadSelection(2, 16, 4, [(0, 1)], head_dim=4, hidden_size=64, model_type="llama")
    with pytest.raises(ValueError, match="num_heads=16"):
        _build(tmp_path, head_selection=other)


def test_task_model_of_another_architecture(tmp_path):
    task_dir = save_tiny_model(str(tmp_path / "task"), arch="qwen2")
    with pytest.raises(ValueError, match="different architectures"):
        _build(tmp_path, alps_task_model=task_dir)


def test_missing_task_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        _build(tmp_path, alps_task_model=str(tmp_path / "nowhere"))


def test_nothing_to_localize_from(tmp_path):
    with pytest.raises(ValueError, match="alps_probe_steps=0"):
        _build(tmp_path, alps_probe_steps=0)


def test_random_strategy_needs_no_probe(tmp_path, monkeypatch):
    from alps_trl.trainers import probe

    monkeypatch.setattr(probe, "run_probe", pytest.fail)
    trainer = _build(tmp_path, alps_probe_steps=0, alps_strategy="random", alps_seed=3)
    assert trainer.head_source == "random"
    assert len(trainer.head_selection.heads) == 2 and trainer.head_selection.strategy == "random"


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=512, n_positions=64))
    with pytest.raises(ValueError, match="not supported by ALPS"):
        _build(tmp_path, model=model)


def test_mask_mode_under_deepspeed_is_refused():
    from alps_trl.trainers.checks import refuse_deepspeed_mask

    args = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(ValueError, match="alps_mode='delta'"):
        refuse_deepspeed_mask(args, "mask")
    refuse_deepspeed_mask(args, "delta")
    refuse_deepspeed_mask(SimpleNamespace(deepspeed_plugin=None), "mask")


def test_resume_with_a_different_selection_is_refused(tmp_path):
    trainer = _build(tmp_path, alps_strategy="random", alps_seed=1)
    checkpoint = tmp_path / "checkpoint-1"
    HeadSelection(2, 8, 2, [(1, 7), (1, 6), (0, 0)], head_dim=8, hidden_size=64, model_type="llama").save(
        checkpoint / "alps_heads.json"
    )
    (checkpoint / "trainer_state.json").write_text('{"global_step": 1}')  # a complete checkpoint
    trainer.state.global_step = 1  # as if it had trained its random heads already
    with pytest.raises(ValueError, match="other ALPS heads"):
        trainer.localize(resume_from_checkpoint=str(checkpoint))


def test_optimizer_instance_is_refused(tmp_path):
    model = tiny_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        AlpsSFTTrainer(
            model=model,
            args=sft_config(str(tmp_path)),
            train_dataset=sft_dataset(),
            processing_class=tiny_tokenizer(),
            optimizers=(optimizer, None),
        )


def test_fsdp1_is_refused():
    from alps_trl.trainers.checks import refuse_fsdp1

    def fake(version):
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version))
        return SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=state))

    with pytest.raises(ValueError, match="FSDP2 only"):
        refuse_fsdp1(fake(1))
    refuse_fsdp1(fake(2))
    refuse_fsdp1(SimpleNamespace(is_fsdp_enabled=False))


def test_row_mixing_optimizers_are_refused_in_mask_mode(tmp_path):
    from alps_trl.trainers.checks import refuse_mask_optimizer

    for optim in ("galore_adamw", "galore_adafactor_layerwise", "apollo_adamw", "adalomo"):
        with pytest.raises(ValueError, match="alps_mode='delta'"):
            refuse_mask_optimizer(SimpleNamespace(optim=optim), "mask")
        refuse_mask_optimizer(SimpleNamespace(optim=optim), "delta")
    for optim in ("adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "paged_lion_8bit"):
        refuse_mask_optimizer(SimpleNamespace(optim=optim), "mask")
    refuse_mask_optimizer(SimpleNamespace(optim="sgd"), "mask", torch.optim.SGD)
    with pytest.raises(ValueError, match="'lomo'"):  # checked when the trainer is built
        _build(tmp_path, optim="lomo", alps_strategy="random")
    with pytest.raises(ValueError, match="'ASGD'"):
        AlpsSFTTrainer(model=tiny_model("llama"), args=sft_config(str(tmp_path), alps_strategy="random"),
                       train_dataset=sft_dataset(), processing_class=tiny_tokenizer(),
                       optimizer_cls_and_kwargs=(torch.optim.ASGD, {}))  # fmt: skip


def test_resume_true_without_checkpoint_fails_before_training(tmp_path):
    trainer = _build(tmp_path)
    with pytest.raises(ValueError, match="No complete checkpoint found"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


def test_resume_true_in_the_arguments_without_checkpoint_localizes_afresh(tmp_path):
    """Scripts pass --resume_from_checkpoint True on every launch; the first launch has nothing to resume yet."""
    trainer = _build(tmp_path, resume_from_checkpoint=True, alps_strategy="random")
    assert trainer.head_source == "random" and trainer.head_selection is not None


def test_scoring_runs_on_the_training_device(tmp_path, monkeypatch):
    from alps_trl.localization import localize

    seen = []
    original = localize.localize_heads

    def recording(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return original(*args, **kwargs)

    monkeypatch.setattr(localize, "localize_heads", recording)
    trainer = _build(tmp_path, alps_probe_steps=1)
    assert seen == [trainer.args.device]


def test_skipped_fp16_step_applies_no_weight_decay(tmp_path):
    """fp16 loss scaling skips a step with an overflowed gradient; the selected rows' own decay must skip it too."""
    from alps_trl.trainers.mixin import AlpsCallback

    trainer = _build(tmp_path, alps_mode="mask", weight_decay=0.5, learning_rate=0.1, alps_probe_steps=1)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    params[0].grad[0, 0] = float("inf")
    callback = AlpsCallback(trainer)
    callback.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} decayed on a skipped step"
    params[0].grad.zero_()  # finite gradients: the decay applies
    callback.on_pre_optimizer_step(trainer.args, trainer.state, trainer.control)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
