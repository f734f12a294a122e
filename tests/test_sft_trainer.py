"""AlpsSFTTrainer: restricted training (mask and delta), drop-in use, merged checkpoints, gradient equality."""

import os

import pytest
import torch
from trainer_helpers import (
    assert_restricted,
    full_snapshot,
    non_attention_changed,
    qkv_snapshot,
    save_tiny_model,
    selected_row_mask,
    sft_config,
    sft_dataset,
    tiny_model,
    tiny_tokenizer,
)
from transformers import TrainerCallback

from alps_trl.localization.selection import HeadSelection
from alps_trl.trainers.private_api import enable_activation_checkpointing
from alps_trl.trainers.sft import AlpsSFTTrainer

# ALPS's promises (unselected rows bit-identical, selected rows train) hold under AdamW decay, gradient
# accumulation and clipping.
HARD = dict(weight_decay=0.1, gradient_accumulation_steps=2, max_grad_norm=1.0, max_steps=3)


class LogRecorder(TrainerCallback):
    """Stands in for a tracker integration (wandb, TensorBoard): records what `on_log` receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _trainer(model, out, head_selection=None, callbacks=None, **overrides):
    args = sft_config(str(out), **{**HARD, **overrides})
    return AlpsSFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
        head_selection=head_selection,
        callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    """llama, mask mode, heads from the default probe, everything else training."""
    out = tmp_path_factory.mktemp("sft_mask")
    model = tiny_model("llama")
    before, qkv = full_snapshot(model), qkv_snapshot(model)
    recorder = LogRecorder()
    trainer = _trainer(model, out, callbacks=[recorder])
    trainer.train()
    trainer.recorder = recorder
    return trainer, before, qkv, out


@pytest.fixture(scope="module")
def delta_run(tmp_path_factory):
    """qwen2 (q/k/v biases), delta mode, only the selected heads train; saved with save_model."""
    out = tmp_path_factory.mktemp("sft_delta")
    model = tiny_model("qwen2")
    before, qkv = full_snapshot(model), qkv_snapshot(model)
    trainer = _trainer(model, out, alps_mode="delta", alps_train_non_attention=False, alps_probe_steps=1)
    trainer.train()
    trainer.save_model(str(out / "final"))
    return trainer, before, qkv, out


@pytest.mark.compat
def test_mask_freezes_unselected_rows_and_trains_the_rest(mask_run):
    trainer, before, qkv, _ = mask_run
    assert trainer.restriction.mode == "mask"
    assert trainer.head_source == "probe"
    assert_restricted(qkv, trainer.model, trainer.head_selection)
    assert non_attention_changed(before, trainer.model)


def test_mask_run_writes_selection_files_and_model_card(mask_run):
    trainer, _, _, out = mask_run
    assert os.path.isfile(out / "alps_heads.json") and os.path.isfile(out / "alps_heads.png")
    assert HeadSelection.load(out / "alps_heads.json") == trainer.head_selection
    trainer.create_model_card()
    card = (out / "README.md").read_text()
    assert "2505.18799" in card and "alps" in card and "SFT with ALPS" in card


def test_selection_summary_reaches_the_trackers(mask_run):
    trainer, _, _, _ = mask_run
    first = trainer.recorder.logs[0]
    assert first["alps/heads_selected"] == 2 and first["alps/heads_total"] == 16
    assert 0 < first["alps/pct_of_qkv"] < 100 and "alps/score_max" in first


def test_startup_summary_counts(mask_run):
    trainer, _, _, _ = mask_run
    summary = trainer.alps_summary
    assert summary["heads_selected"] == len(trainer.head_selection.heads) == 2  # ceil(0.1 * 16)
    assert 0 < summary["trainable_qkv_params"] < summary["qkv_params_total"]


@pytest.mark.compat
def test_delta_qwen2_biases_stay_frozen_outside_selection(delta_run):
    trainer, before, qkv, _ = delta_run
    assert trainer.restriction.mode == "delta"
    params = dict(trainer.model.named_parameters())
    assert any(name.endswith(".bias") for name in qkv)
    for name, old in qkv.items():  # the base tensors never change in delta mode
        assert torch.equal(params[name].detach(), old), name
    assert not non_attention_changed(before, trainer.model)
    assert any(p.detach().abs().sum() > 0 for n, p in params.items() if ".alps_delta." in n)


@pytest.mark.compat
def test_delta_merged_checkpoint_loads_and_matches_logits(delta_run):
    from transformers import AutoModelForCausalLM

    trainer, _, qkv, out = delta_run
    merged = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    state = merged.state_dict()
    assert not any("alps_delta" in k for k in state)
    changed = False
    for name, old in qkv.items():
        mask = selected_row_mask(merged, trainer.head_selection, name)
        assert torch.equal(state[name][~mask], old[~mask]), name
        changed |= not torch.equal(state[name][mask], old[mask])
    assert changed
    ids = torch.tensor([[5, 17, 33, 101, 7, 250, 3]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    assert os.path.isfile(out / "final" / "alps_heads.json")


def test_drop_in_trl_docs_script(tmp_path):
    """TRL's SFT quickstart, only the class name changed (model given as a path, plain SFTConfig)."""
    from trl import SFTConfig

    model_dir = save_tiny_model(str(tmp_path / "base"))
    dataset = sft_dataset()

    training_args = SFTConfig(output_dir=str(tmp_path / "out"), bf16=False, report_to="none", max_steps=2,
                              per_device_train_batch_size=2, use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = AlpsSFTTrainer(model=model_dir, args=training_args, train_dataset=dataset)
    trainer.train()

    assert trainer.state.global_step == 2
    assert len(trainer.head_selection.heads) == 2
    assert os.path.isfile(tmp_path / "out" / "alps_heads.json")


def _one_step_grads(trainer, batch):
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(trainer.model, dict(batch))
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_mask_gradients_equal_full_finetuning_on_selected_rows(tmp_path):
    from trl import SFTTrainer

    selection = HeadSelection(2, 8, 2, [(0, 1), (1, 6)], head_dim=8, hidden_size=64, model_type="llama")
    alps = _trainer(tiny_model("llama"), tmp_path / "a", head_selection=selection)
    alps.restriction.attach(alps.model)
    full = SFTTrainer(
        model=tiny_model("llama"),
        args=sft_config(str(tmp_path / "f"), alps=False, **HARD),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
    )
    batch = next(iter(full.get_train_dataloader()))
    g_alps, g_full = _one_step_grads(alps, batch), _one_step_grads(full, batch)
    qkv = qkv_snapshot(alps.model)
    for name, g in g_full.items():
        if name in qkv:
            mask = selected_row_mask(alps.model, selection, name)
            torch.testing.assert_close(g_alps[name][mask], g[mask], atol=0, rtol=0)
            assert not g_alps[name][~mask].any(), name
        else:
            torch.testing.assert_close(g_alps[name], g, atol=0, rtol=0)


@pytest.mark.compat
@pytest.mark.parametrize("mode", ["mask", "delta"])
def test_reentrant_checkpointing_keeps_gradients(mode, tmp_path):
    """Only layer-0 heads train and everything else is frozen: reentrant checkpointing must not cut gradients."""
    selection = HeadSelection(2, 8, 2, [(0, 1), (0, 5)], head_dim=8, hidden_size=64, model_type="llama")
    grads = []
    for kwargs in (None, {"use_reentrant": True}):
        trainer = _trainer(tiny_model("llama"), tmp_path / str(kwargs is None), head_selection=selection,
                           alps_mode=mode, alps_train_non_attention=False, gradient_checkpointing=kwargs is not None,
                           gradient_checkpointing_kwargs=kwargs)  # fmt: skip
        trainer.restriction  # noqa: B018 - install
        if kwargs is not None:  # what Trainer.train() does with these arguments
            enable_activation_checkpointing(trainer.model, kwargs)
            assert trainer.model.model.gradient_checkpointing
        batch = next(iter(trainer.get_train_dataloader()))
        grads.append(_one_step_grads(trainer, batch))
    assert grads[0] and sorted(grads[0]) == sorted(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=0, rtol=0)


def test_probe_leaves_no_trace(tmp_path):
    """Weights, RNG, optimizer/scheduler and metric buffers are as before the probe."""
    model = tiny_model("llama")
    before = full_snapshot(model)
    trainer = _trainer(model, tmp_path, alps_probe_steps=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    trainer.head_selection  # noqa: B018 - runs the probe
    assert trainer.head_source == "probe"
    assert torch.equal(torch.get_rng_state(), rng)
    assert trainer.optimizer is None and trainer.lr_scheduler is None
    assert not any(trainer._metrics["train"].values()) and trainer._total_train_tokens == 0
    restricted = trainer.restriction.decay_exempt_parameter_names(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.grad is None
        if name not in restricted:
            assert p.requires_grad == flags[name], name


def test_task_model_localizes_the_heads_it_moved(tmp_path):
    """alps_task_model: the heads whose q/k/v the task model changed are the ones selected."""
    base = tiny_model("llama")
    task = tiny_model("llama")
    with torch.no_grad():
        attn = task.model.layers[1].self_attn
        attn.q_proj.weight[3 * 8 : 4 * 8] += 0.5  # query head 3 of layer 1
        attn.q_proj.weight[6 * 8 : 7 * 8] += 0.3  # query head 6 of layer 1
    task.save_pretrained(str(tmp_path / "task"))
    trainer = _trainer(base, tmp_path / "out", alps_task_model=str(tmp_path / "task"))
    assert trainer.head_selection.heads == [(1, 3), (1, 6)]
    assert trainer.head_source == "alps_task_model"


def test_precedence_argument_over_file_over_task_model(tmp_path):
    from_arg = HeadSelection(2, 8, 2, [(0, 0), (0, 1)], head_dim=8, hidden_size=64, model_type="llama")
    from_file = HeadSelection(2, 8, 2, [(1, 0), (1, 1)], head_dim=8, hidden_size=64, model_type="llama")
    from_file.save(tmp_path / "heads.json")
    task = str(tmp_path / "task")
    tiny_model("llama", seed=1).save_pretrained(task)
    common = dict(alps_heads=str(tmp_path / "heads.json"), alps_task_model=task)
    assert _trainer(tiny_model("llama"), tmp_path / "a", head_selection=from_arg, **common).head_selection == from_arg
    assert _trainer(tiny_model("llama"), tmp_path / "b", **common).head_selection == from_file


@pytest.mark.parametrize(
    ("args", "trainer_kwargs"),
    [
        # TRL's own SFTConfig defaults on CPU (bf16 autocast, activation checkpointing, adamw_torch_fused).
        (dict(), {}),
        (dict(optim="adafactor", bf16=False, max_grad_norm=0.0), {}),  # no clipping
        (dict(optim="adamw_bnb_8bit", bf16=False, gradient_checkpointing=False, weight_decay=0.0), {}),
        # Coupled weight decay and momentum of SGD; fp16 grad scaling; warmup; uneven last accumulation window.
        (dict(fp16=True, bf16=False, max_steps=-1, num_train_epochs=1, gradient_accumulation_steps=3,
              per_device_train_batch_size=3, warmup_steps=1, lr_scheduler_type="cosine"),
         dict(optimizer_cls_and_kwargs=(torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.1)))),
    ],
    ids=["trl-defaults", "adafactor", "adamw-8bit", "sgd-fp16-uneven-accumulation"],
)  # fmt: skip
def test_frozen_rows_with_other_optimizers_and_precisions(args, trainer_kwargs, tmp_path):
    from trl import SFTConfig

    model = tiny_model("llama")
    qkv = qkv_snapshot(model)
    selection = HeadSelection(2, 8, 2, [(0, 1), (1, 6)], head_dim=8, hidden_size=64, model_type="llama")
    args = {"max_steps": 2, "weight_decay": 0.1, **args}
    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True, learning_rate=1e-2,
                       save_strategy="no", **args)  # fmt: skip
    data, tokenizer = sft_dataset(10), tiny_tokenizer()
    trainer = AlpsSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             head_selection=selection, **trainer_kwargs)  # fmt: skip
    trainer.train()
    assert trainer.state.global_step >= 2
    assert_restricted(qkv, trainer.model, selection)


@pytest.mark.parametrize("mode", ["mask", "delta"])
def test_construction_localizes_and_installs(mode, tmp_path, monkeypatch):
    """After the constructor: the selection is there, reading it computes nothing, and counting requires_grad
    parameters (as users check a PEFT setup) gives what will train."""
    from alps_trl.trainers import probe

    args = sft_config(str(tmp_path), alps_mode=mode, alps_train_non_attention=False, alps_probe_steps=1)
    trainer = AlpsSFTTrainer(
        model=tiny_model(), args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer()
    )
    monkeypatch.setattr(probe, "run_probe", lambda *a, **k: pytest.fail("reading head_selection ran the probe"))
    selection = trainer.head_selection
    assert selection is not None and trainer.restriction is not None
    assert (tmp_path / "alps_heads.json").is_file()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    layout = trainer.attention_layout
    if mode == "delta":
        assert trainable == trainer.restriction.trainable_restricted_entries()
    else:  # whole q/k/v tensors that hold a selected row take gradients; the rest of the network is frozen
        qkv = {n for lp in layout.layers for n in lp.qkv_tensor_names()}
        expected = sum(p.numel() for n, p in trainer.model.named_parameters() if n in qkv and p.requires_grad)
        assert trainable == expected > 0
    trainer.train()
    assert trainer.head_selection == selection
