"""Delta restriction on a bitsandbytes NF4 4-bit base (CPU; the `gpu` variant runs the same on CUDA).

CPU trap (bitsandbytes 0.50): an eval-mode forward without grad repacks the 4-bit weights in place and breaks
backward afterwards. These tests therefore never run the quantized model in eval mode: logits are taken in
train mode under no_grad (the tiny configs have no dropout).
"""

import pytest
import torch
from restriction_helpers import batch, selection_for

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from alps_trl.restriction import DeltaRestriction, MaskRestriction, build_restriction, resolve_mode  # noqa: E402
from alps_trl.restriction.delta import merge_delta_checkpoint  # noqa: E402
from alps_trl.testing import tiny_model  # noqa: E402


def _load_4bit(path, device):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device)


def _logits(model, data, device):
    model.train()  # see module docstring: no eval-mode forward on a 4-bit CPU model
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in data.items()}).logits.float().cpu()


def _run(tmp_path, device):
    """Train deltas on a 4-bit base; return everything the assertions need."""
    base_dir = tmp_path / "fp_base"
    tiny_model("llama", seed=0).save_pretrained(base_dir)  # d=64, every out_features a multiple of 64
    model = _load_4bit(base_dir, device)
    assert getattr(model, "is_quantized", False)
    assert resolve_mode("auto", model) == "delta"
    with pytest.raises(ValueError, match='alps_mode="delta"'):
        resolve_mode("mask", model)
    with pytest.raises(ValueError, match="quantized"):
        MaskRestriction(*_layout_and_selection(model)).install(model)

    restriction = build_restriction(model, selection_for(model), "auto")
    assert isinstance(restriction, DeltaRestriction)
    restriction.install(model)
    restriction.attach(model)
    summary = restriction.summary(model)
    assert summary["params_total"] == sum(p.numel() for p in tiny_model("llama", seed=0).parameters())
    assert summary["trainable_params_total"] == summary["trainable_qkv_params"] == (3 * 8 + 2 * 2 * 8) * 64
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".alps_delta." not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".alps_delta." in n for n in trainable)
    deltas = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in deltas)

    opt = torch.optim.AdamW(deltas, lr=1e-2, weight_decay=0.1)
    data = {k: v.to(device) for k, v in batch(0).items()}
    model.train()
    losses = []
    for step in range(8):
        loss = model(**data).loss
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deltas), "a delta got no gradient"
        restriction.mask_gradients(model)  # no-op in delta mode; part of the trainer's step
        torch.nn.utils.clip_grad_norm_(deltas, 1.0)
        restriction.apply_weight_decay(model, 1e-2, 0.1)  # no-op: deltas take the optimizer's decay
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    after_state = {k: v for k, v in model.state_dict().items() if ".alps_delta." not in k}
    return base_dir, model, restriction, base_state, after_state, losses


def _layout_and_selection(model):
    from alps_trl.localization.anatomy import AttentionLayout

    return AttentionLayout.from_model(model), selection_for(model)


def _check(tmp_path, device):
    base_dir, model, restriction, base_state, after_state, losses = _run(tmp_path, device)
    assert losses[-1] < losses[0] - 0.05, losses
    assert list(after_state) == list(base_state)
    for name, value in base_state.items():
        assert after_state[name].dtype == value.dtype and torch.equal(after_state[name], value), name

    data = batch(3)
    trained_q = _logits(model, data, device)
    with restriction.reference(model):
        base_q = _logits(model, data, device)
    with pytest.raises(ValueError, match="alps-merge"):
        restriction.merge(model)

    delta_path = tmp_path / "alps_delta.safetensors"
    restriction.save_delta(model, delta_path)
    merged_dir = merge_delta_checkpoint(base_dir, delta_path, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    merged_logits = _logits(merged, data, "cpu")

    # The merge is exact up to float32 rounding: the same deltas applied through hooks on the fp base.
    fp = AutoModelForCausalLM.from_pretrained(base_dir)
    fp_restriction = build_restriction(fp, selection_for(fp), "delta", train_non_attention=False)
    fp_restriction.install(fp)
    fp_restriction.load_delta_state_dict(fp, restriction.delta_state_dict(model))
    torch.testing.assert_close(merged_logits, _logits(fp, data, "cpu"), rtol=1e-5, atol=1e-5)
    # Against the trained 4-bit model the only difference is the quantization error of the base.
    with fp_restriction.reference(fp):
        fp_base = _logits(fp, data, "cpu")
    quant_error = (base_q - fp_base).abs().max()
    assert (trained_q - merged_logits).abs().max() <= 1.5 * quant_error + 1e-3
    assert (trained_q - base_q).abs().max() > 1e-3  # and the deltas did change the model


def test_nf4_delta_training_cpu(tmp_path):
    _check(tmp_path, "cpu")


@pytest.mark.gpu
def test_nf4_delta_training_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check(tmp_path, "cuda")
