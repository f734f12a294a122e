"""Delta restriction: frozen base q/k/v, per-projection deltas, exact reference, merge to a plain HF model."""

import pytest
import torch
from restriction_helpers import assert_restricted, batch, selection_for, snapshot, train
from transformers import AutoModelForCausalLM

from alps_trl.restriction import DeltaRestriction, build_restriction
from alps_trl.restriction.delta import HeadDelta, merge_state_dict
from alps_trl.testing import tiny_model
from alps_trl.trainers.private_api import enable_activation_checkpointing


def _installed(arch="llama", **kwargs):
    model = tiny_model(arch, seed=0)
    restriction = build_restriction(model, selection_for(model), "delta", **kwargs)
    restriction.install(model)
    restriction.attach(model)
    return model, restriction


def _delta_names(model):
    return [n for n, p in model.named_parameters() if ".alps_delta." in n]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_train_then_merge_keeps_unselected_rows_and_state_dict_keys(arch):
    model, restriction = _installed(arch)
    assert isinstance(restriction, DeltaRestriction) and restriction.mode == "delta"
    before = snapshot(model)
    base_keys = [k for k in before if ".alps_delta." not in k]
    names = _delta_names(model)
    layers = {"llama": 6, "qwen2": 6, "phi3": 2}[arch]  # projections with a selected row (q, k, v | qkv per layer)
    assert len([n for n in names if n.endswith("alps_delta.weight")]) == layers
    assert any(n.endswith("alps_delta.bias") for n in names) == (arch == "qwen2")
    for t in restriction.targets:
        assert not dict(model.named_parameters())[t.name].requires_grad
    assert restriction.decay_exempt_parameter_names(model) == set()
    train(model, restriction)
    data = batch(9)
    with torch.no_grad():
        trained_logits = model(**data).logits
    restriction.merge(model)
    after = snapshot(model)
    assert list(after) == base_keys
    assert_restricted(restriction, before, after)
    mlp = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[mlp], after[mlp])  # train_non_attention=True
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, trained_logits, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # flags from before install are back


def test_frozen_non_attention_and_exact_reference():
    base = tiny_model("llama", seed=0)
    model, restriction = _installed("llama", train_non_attention=False)
    assert all(".alps_delta." in n for n, p in model.named_parameters() if p.requires_grad)
    before = snapshot(model)
    train(model, restriction)
    after = snapshot(model)
    for name in before:
        if ".alps_delta." not in name:
            assert torch.equal(before[name], after[name]), name
    data = batch(5)
    with torch.no_grad():
        base_logits = base(**data).logits
        trained_logits = model(**data).logits
        assert not torch.equal(trained_logits, base_logits)
        with restriction.reference(model):
            assert torch.equal(model(**data).logits, base_logits)
        assert torch.equal(model(**data).logits, trained_logits)
    # Also with autograd on (the reference forward of a DPO step may run with grad enabled).
    with restriction.reference(model):
        assert torch.equal(model(**data).logits.detach(), base_logits)


def test_merge_save_and_reload_reproduces_logits(tmp_path):
    base_keys = list(tiny_model("qwen2", seed=0).state_dict())
    model, restriction = _installed("qwen2", restrict_o_proj=True)
    assert any(t.dim == 1 for t in restriction.targets)
    train(model, restriction)
    data = batch(11)
    with torch.no_grad():
        trained_logits = model(**data).logits
    sd = model.state_dict()
    merged_sd = merge_state_dict(sd, restriction.delta_state_dict(model))
    restriction.merge(model)
    assert list(model.state_dict()) == base_keys
    assert all(torch.equal(v, merged_sd[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, HeadDelta) for m in model.modules())
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert list(reloaded.state_dict()) == base_keys
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data).logits, trained_logits, rtol=1e-5, atol=1e-5)


def test_bf16_base_keeps_output_dtype_and_fp32_deltas():
    model = tiny_model("llama", seed=0).to(torch.bfloat16)
    restriction = build_restriction(model, selection_for(model), "delta")
    restriction.install(model)
    deltas = [m for m in model.modules() if isinstance(m, HeadDelta)]
    assert deltas and all(d.weight.dtype == torch.float32 for d in deltas)
    seen = {}

    def record(module, args, output):  # registered after the delta hook: sees the delta-added output
        seen["dtype"] = output.dtype

    model.model.layers[0].self_attn.q_proj.register_forward_hook(record)
    loss = model(**batch(0)).loss
    loss.backward()
    assert seen["dtype"] == torch.bfloat16
    assert all(d.weight.grad is not None and d.weight.grad.dtype == torch.float32 for d in deltas)


def test_delta_state_dict_roundtrip_and_errors():
    model, restriction = _installed("phi3", train_non_attention=False)
    train(model, restriction, steps=1)
    deltas = restriction.delta_state_dict(model)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    # q rows 8..23 (heads 1, 2), k and v rows of kv group 0 at offsets 64 and 80
    assert deltas[name + ".alps_rows"].tolist() == list(range(8, 24)) + list(range(64, 72)) + list(range(80, 88))
    assert deltas[name + ".alps_delta"].shape == (32, 64) and deltas[name + ".alps_delta"].dtype == torch.float32
    other, other_restriction = _installed("phi3", train_non_attention=False)
    other_restriction.load_delta_state_dict(other, deltas)
    data = batch(1)
    with torch.no_grad():
        torch.testing.assert_close(other(**data).logits, model(**data).logits, rtol=0, atol=0)
    # mask mode has nothing to merge; delta mode refuses a second install on the same model
    with pytest.raises(RuntimeError, match="install"):
        build_restriction(model, selection_for(model), "delta").install(model)
    restriction.merge(model)
    with pytest.raises(RuntimeError, match="merged"):
        with restriction.reference(model):
            pass


@pytest.mark.compat
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_delta_gradients(use_reentrant):
    """Deltas live inside checkpointed decoder layers: recomputation must reproduce their gradients."""
    plain, plain_restriction = _installed("llama", train_non_attention=False)
    model, restriction = _installed("llama", train_non_attention=False)
    enable_activation_checkpointing(model, {"use_reentrant": use_reentrant})
    for m in (plain, model):
        m.train()
        m(**batch(0)).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 6
    for n, p in plain.named_parameters():
        if p.requires_grad:
            assert grads[n] is not None, n
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=0)
