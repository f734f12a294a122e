"""Mask restriction: frozen rows stay bit-identical, selected rows get exactly full fine-tuning's gradients."""

import copy

import pytest
import torch
from restriction_helpers import assert_restricted, batch, selection_for, snapshot, train

from alps_trl.localization.selection import HeadSelectionError
from alps_trl.restriction import MaskRestriction, build_restriction, resolve_mode
from alps_trl.testing import tiny_model


def _installed(arch="llama", **kwargs):
    model = tiny_model(arch, seed=0)
    restriction = build_restriction(model, selection_for(model), "mask", **kwargs)
    restriction.install(model)
    restriction.attach(model)
    return model, restriction


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_unselected_rows_bit_identical_after_training(arch):
    model, restriction = _installed(arch)
    assert isinstance(restriction, MaskRestriction) and restriction.mode == "mask"
    before = snapshot(model)
    train(model, restriction)
    after = snapshot(model)
    assert_restricted(restriction, before, after)
    names = {t.name for t in restriction.targets}
    assert {n for n in names if "bias" in n} == ({n for n in before if "self_attn" in n and n.endswith("bias")})
    # train_non_attention=True: everything else trains as usual.
    mlp = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[mlp], after[mlp])
    assert not torch.equal(
        before["model.layers.1.self_attn.o_proj.weight"], after["model.layers.1.self_attn.o_proj.weight"]
    )


@pytest.mark.parametrize("optimizer_kwargs", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_frozen_rows_with_every_adamw_variant_and_no_non_attention(optimizer_kwargs):
    model, restriction = _installed("llama", train_non_attention=False)
    before = snapshot(model)
    train(model, restriction, steps=2, optimizer_kwargs=optimizer_kwargs)
    after = snapshot(model)
    assert_restricted(restriction, before, after)
    targets = {t.name for t in restriction.targets}
    for name in before:
        if name not in targets:
            assert torch.equal(before[name], after[name]), f"{name} trained although train_non_attention=False"


def test_restrict_o_proj_columns():
    model, restriction = _installed("llama", restrict_o_proj=True)
    o_targets = [t for t in restriction.targets if t.dim == 1]
    assert [t.name for t in o_targets] == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    assert o_targets[0].selected.tolist() == list(range(8, 24))  # heads 1 and 2, head_dim 8
    before = snapshot(model)
    train(model, restriction)
    assert_restricted(restriction, before, snapshot(model))


def test_without_any_restriction_frozen_rows_would_move():
    """Sanity check of the test loop itself: plain training with decay changes every q/k/v row."""
    model = tiny_model("llama", seed=0)
    before = snapshot(model)
    train(model, None, steps=1)
    after = snapshot(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (before[name] != after[name]).any(dim=-1).all()


def test_selected_gradients_equal_full_finetuning_and_clip_counts_only_selected():
    full = tiny_model("llama", seed=0)
    model, restriction = _installed("llama")
    data = batch(3)
    full(**data).loss.backward()
    model(**data).loss.backward()  # the attached post-accumulate-grad hooks mask here
    grads_full = {n: p.grad for n, p in full.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    targets = {t.name: t for t in restriction.targets}
    for name, g in grads.items():
        if name not in targets:
            assert torch.equal(g, grads_full[name]), name
            continue
        t = targets[name]
        sel = t.selected_mask()
        assert torch.equal(g[sel], grads_full[name][sel]), f"selected rows of {name} differ from full fine-tuning"
        assert not g[~sel].any(), f"frozen rows of {name} have gradient"
        assert grads_full[name][~sel].abs().sum() > 0
    # The clipping norm sees only rows that train: equal to the full model's norm once its frozen rows are zeroed.
    norm_full = torch.nn.utils.get_total_norm([g for g in grads_full.values()])
    restriction.mask_gradients(full)  # restriction works on any model with the same names
    norm_expected = torch.nn.utils.get_total_norm([p.grad for p in full.parameters()])
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert torch.equal(norm, norm_expected)
    assert norm < norm_full


def test_mask_gradients_without_hooks_and_detach():
    model, restriction = _installed("llama")
    restriction.attach(model)  # idempotent: still one hook per parameter
    assert len(restriction._handles) == len([t for t in restriction.targets if t.num_selected])
    restriction.detach()
    model(**batch(1)).loss.backward()
    q = model.model.layers[1].self_attn.q_proj.weight
    frozen = ~restriction.targets[3].selected_mask()
    assert restriction.targets[3].name == "model.layers.1.self_attn.q_proj.weight"
    assert q.grad[frozen].any()  # no hook: nothing masked yet
    restriction.mask_gradients(model)
    restriction.mask_gradients(model)  # idempotent
    assert not q.grad[frozen].any()


def test_weight_decay_equals_adamw_decay_on_selected_rows():
    """One step: restricted decay + AdamW(no decay) == AdamW(decay) bit for bit on selected rows."""
    lr, wd = 1e-2, 0.1
    full = tiny_model("llama", seed=0)
    model, restriction = _installed("llama")
    data = batch(4)
    for m in (full, model):
        m(**data).loss.backward()
    restriction.mask_gradients(model)
    q_full = full.model.layers[0].self_attn.q_proj.weight
    q = model.model.layers[0].self_attn.q_proj.weight
    torch.optim.AdamW([q_full], lr=lr, weight_decay=wd, foreach=False).step()
    restriction.apply_weight_decay(model, lr, wd)
    torch.optim.AdamW([q], lr=lr, weight_decay=0.0, foreach=False).step()
    sel = restriction.targets[0].selected_mask()
    assert torch.equal(q[sel], q_full[sel])
    restriction.apply_weight_decay(model, torch.tensor(lr), 0.0)  # wd 0 or a tensor lr: accepted


@pytest.mark.parametrize("arch", ["qwen2"])
def test_reference_is_the_base_model_and_restores_exactly(arch):
    base = tiny_model(arch, seed=0)
    model, restriction = _installed(arch, train_non_attention=False)
    train(model, restriction, steps=2)
    trained = snapshot(model)
    data = batch(7)
    with torch.no_grad():
        base_logits = base(**data).logits
        trained_logits = model(**data).logits
        assert not torch.equal(base_logits, trained_logits)
        with restriction.reference(model):
            assert torch.equal(model(**data).logits, base_logits)
        assert torch.equal(model(**data).logits, trained_logits)
    after = snapshot(model)
    assert all(torch.equal(trained[k], after[k]) for k in trained)


def test_reference_between_forward_and_backward_keeps_backward_valid():
    model, restriction = _installed("llama")
    twin = copy.deepcopy(model)
    data = batch(2)
    loss = model(**data).loss
    with torch.no_grad(), restriction.reference(model):
        model(**data)
    loss.backward()  # no "modified by an inplace operation" error
    twin(**data).loss.backward()
    restriction.mask_gradients(twin)
    for (n, p), (_, p2) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, p2.grad), n


def test_summary_counts():
    model, restriction = _installed("llama")
    s = restriction.summary(model)
    sel = restriction.selection
    assert s["heads_selected"] == 3 and s["heads_total"] == 16
    assert s["kv_groups_selected"] == 2
    assert s["trainable_qkv_params"] == sel.trainable_qkv_params(8, 64) == (3 * 8 + 2 * 2 * 8) * 64
    assert s["qkv_params_total"] == 2 * (8 + 2 + 2) * 8 * 64
    total = sum(p.numel() for p in model.parameters())
    assert s["params_total"] == total
    assert s["trainable_params_total"] == total - s["qkv_params_total"] + s["trainable_qkv_params"]
    _, frozen_rest = _installed("llama", train_non_attention=False)
    assert frozen_rest.summary(model)["trainable_qkv_params"] == s["trainable_qkv_params"]


def test_mode_resolution_and_errors():
    model = tiny_model("llama", seed=0)
    assert resolve_mode("auto", model) == "mask"
    assert resolve_mode("delta", model) == "delta"
    with pytest.raises(ValueError, match="'auto', 'mask', 'delta'"):
        resolve_mode("masked", model)
    other = tiny_model("llama", seed=0, num_hidden_layers=3)
    with pytest.raises(HeadSelectionError, match="num_layers"):
        build_restriction(other, selection_for(model))
    restriction = build_restriction(model, selection_for(model), "mask")
    with pytest.raises(RuntimeError, match="install"):
        restriction.mask_gradients(model)


def test_local_shard_plans_match_the_full_tensor(monkeypatch):
    """FSDP2-style uneven Shard(0) splits: masking and snapshot slicing per shard equal the whole-tensor result."""
    from alps_trl.restriction import rows
    from alps_trl.restriction.mask import _zero_frozen

    model = tiny_model("qwen2", seed=0)
    restriction = build_restriction(model, selection_for(model), "mask", restrict_o_proj=True)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    for t in restriction.targets:
        full = torch.randn(params[t.name].shape, generator=gen)
        expected = full.clone()
        monkeypatch.setattr(rows, "local_block", lambda p, n=full.shape[0]: (0, n))
        whole = rows.plan_for(t, expected)
        _zero_frozen(whole, expected)
        chunk = -(-full.shape[0] // 3)  # FSDP2 pads to ceil(rows / world): last shard is shorter
        pieces = []
        for offset in range(0, full.shape[0], chunk):
            shard = full[offset : offset + chunk].clone()
            monkeypatch.setattr(rows, "local_block", lambda p, o=offset, n=shard.shape[0]: (o, n))
            plan = rows.plan_for(t, shard)
            _zero_frozen(plan, shard)
            snapshot_part = plan.local_part(full.index_select(t.dim, t.selected))
            assert torch.equal(snapshot_part, full[offset : offset + chunk].index_select(t.dim, plan.selected))
            pieces.append(shard)
        assert torch.equal(torch.cat(pieces), expected), t.name
