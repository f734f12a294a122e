"""A 4-bit NF4 base trains through AlpsSFTTrainer (delta mode) and merges back into the full-precision base.

bitsandbytes runs NF4 on CPU. Its CPU path repacks the weights on the first forward that is in eval
mode without gradients (and then asserts for out_features % 32 != 0), so the trained 4-bit model is
only ever run in train mode here (the tiny models have no dropout).
"""

import os

import pytest
import torch
from trainer_helpers import save_tiny_model, sft_config, sft_dataset, tiny_model, tiny_tokenizer

from alps_trl.localization.selection import HeadSelection
from alps_trl.trainers.sft import AlpsSFTTrainer

bnb = pytest.importorskip("bitsandbytes")

SELECTION = HeadSelection(2, 8, 2, [(0, 2), (1, 5)], head_dim=8, hidden_size=64, model_type="llama")


def _load_4bit(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


def _nf4_exact_base(directory) -> str:
    """A full-precision checkpoint whose 4-bit quantization is lossless (its Linear weights are NF4-dequantized).

    With it, "4-bit base + deltas" and "full-precision base + merged deltas" are the same function, so the
    merge can be checked against the trained 4-bit model itself.
    """
    import bitsandbytes.functional as F

    quantized = _load_4bit(save_tiny_model(os.path.join(directory, "raw")))
    model = tiny_model("llama")
    state = model.state_dict()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".weight"] = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    model.load_state_dict(state)
    path = os.path.join(directory, "base")
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("q4")
    base_dir = _nf4_exact_base(str(root))
    model = _load_4bit(base_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    absmax = {n: m.weight.quant_state.absmax.clone() for n, m in model.named_modules() if hasattr(m, "weight")
              and getattr(m.weight, "quant_state", None) is not None}  # fmt: skip
    trainer = AlpsSFTTrainer(
        model=model,
        args=sft_config(str(root / "out"), max_steps=6, learning_rate=1e-2, weight_decay=0.1),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
        head_selection=SELECTION,
    )
    grads = {}
    trainer.restriction  # noqa: B018 - install the deltas before hooking their gradients
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().abs().sum().item()))
    trainer.train()
    trainer.save_model(str(root / "final"))
    return trainer, before, absmax, grads, base_dir, root


def test_quantized_base_trains_deltas_only(quantized_run):
    trainer, _, _, grads, _, _ = quantized_run
    assert trainer.restriction.mode == "delta"
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".alps_delta." in n for n in trainable)
    assert sorted(grads) == sorted(trainable) and all(v > 0 for v in grads.values())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_quantized_base_is_byte_identical(quantized_run):
    trainer, before, absmax, _, _, _ = quantized_run
    params = dict(trainer.model.named_parameters())
    for name, old in before.items():
        assert params[name].dtype == old.dtype and torch.equal(params[name].detach(), old), name
    modules = dict(trainer.model.named_modules())
    for name, old in absmax.items():
        assert torch.equal(modules[name].weight.quant_state.absmax, old), name


def test_saved_deltas_merge_into_the_full_precision_base(quantized_run):
    from transformers import AutoModelForCausalLM

    from alps_trl.restriction.delta import merge_delta_checkpoint

    trainer, _, _, _, base_dir, root = quantized_run
    final = root / "final"
    assert {"alps_delta.safetensors", "alps_heads.json", "ALPS_MERGE.md"} <= set(os.listdir(final))
    assert "alps-merge" in (final / "ALPS_MERGE.md").read_text()
    merge_delta_checkpoint(base_dir, str(final / "alps_delta.safetensors"), str(root / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(root / "merged"))
    ids = torch.tensor([[5, 17, 33, 101, 7, 250, 3]])
    trainer.model.train()
    trained = trainer.model(input_ids=ids).logits.detach()
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    # well within bf16 resolution (2**-8 relative) of logits of magnitude < 1
    torch.testing.assert_close(out, trained, atol=2e-3, rtol=0)


def test_mask_mode_on_quantized_base_is_refused(tmp_path):
    model = _load_4bit(save_tiny_model(str(tmp_path / "b")))
    with pytest.raises(ValueError, match='alps_mode="delta"'):
        AlpsSFTTrainer(
            model=model,
            args=sft_config(str(tmp_path / "o"), alps_mode="mask"),
            train_dataset=sft_dataset(),
            processing_class=tiny_tokenizer(),
            head_selection=SELECTION,
        )


def test_probe_on_quantized_base_is_refused(tmp_path):
    model = _load_4bit(save_tiny_model(str(tmp_path / "b")))
    with pytest.raises(ValueError, match="quantized base cannot"):
        AlpsSFTTrainer(
            model=model,
            args=sft_config(str(tmp_path / "o")),
            train_dataset=sft_dataset(),
            processing_class=tiny_tokenizer(),
        )


def test_task_model_needs_the_full_precision_base_checkpoint(tmp_path):
    model = _load_4bit(save_tiny_model(str(tmp_path / "b")))
    model.config._name_or_path = str(tmp_path / "moved-away")
    task = save_tiny_model(str(tmp_path / "task"), seed=1)
    with pytest.raises(ValueError, match="full-precision checkpoint"):
        AlpsSFTTrainer(
            model=model,
            args=sft_config(str(tmp_path / "o"), alps_task_model=task),
            train_dataset=sft_dataset(),
            processing_class=tiny_tokenizer(),
        )


def test_task_model_is_scored_against_the_base_checkpoint(tmp_path):
    base_dir = save_tiny_model(str(tmp_path / "b"))
    task = tiny_model("llama")
    with torch.no_grad():
        task.model.layers[0].self_attn.q_proj.weight[5 * 8 : 6 * 8] += 0.5
        task.model.layers[1].self_attn.q_proj.weight[2 * 8 : 3 * 8] += 0.3
    task.save_pretrained(str(tmp_path / "task"))
    trainer = AlpsSFTTrainer(
        model=_load_4bit(base_dir),
        args=sft_config(str(tmp_path / "o"), alps_task_model=str(tmp_path / "task")),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
    )
    assert trainer.head_selection.heads == [(0, 5), (1, 2)]
    assert trainer.restriction.mode == "delta"


def test_importance_localizes_on_a_quantized_base(tmp_path):
    """alps_metric="importance" needs no trainable base weight: the gates sit on o_proj's input. Scoring runs in
    training mode, so bitsandbytes' CPU repack never happens and the deltas still receive gradients afterwards."""
    model = _load_4bit(save_tiny_model(str(tmp_path / "b")))
    trainer = AlpsSFTTrainer(
        model=model,
        args=sft_config(str(tmp_path / "o"), max_steps=2, alps_metric="importance", alps_importance_batches=2),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
    )
    selection = trainer.head_selection
    assert trainer.head_source == "importance" and selection.metric == "importance"
    assert selection.scores.max() > 0 and trainer.restriction.mode == "delta"
    trainer.train()
    deltas = {n: p for n, p in trainer.model.named_parameters() if ".alps_delta." in n}
    assert deltas and all(p.detach().abs().sum() > 0 for p in deltas.values())
