"""Data-driven head importance (`alps_metric="importance"`): the definition, the trainers, two processes.

The brute force below shares no code with `localization.importance`: it multiplies the gates into o_proj's weight
columns (not its input, no hooks) and differentiates a float64 loss per batch with `torch.func.functional_call`.
(Finite differences are too coarse here: the models' RMSNorm computes in float32 even in a float64 model.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from trainer_helpers import (
    assert_restricted,
    dpo_config,
    dpo_dataset,
    full_snapshot,
    qkv_snapshot,
    sft_config,
    sft_dataset,
    tiny_model,
    tiny_tokenizer,
)

from alps_trl import head_importance
from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.localization.importance import importance_selection
from alps_trl.trainers.config import IMPORTANCE_MAX_BATCHES, AlpsArguments, planned_importance_batches
from alps_trl.trainers.dpo import AlpsDPOTrainer
from alps_trl.trainers.private_api import enable_activation_checkpointing
from alps_trl.trainers.sft import AlpsSFTTrainer

ARCHS = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 8}),
    "phi3-fused-qkv": ("phi3", {}),
    "qwen3-head-dim-16": ("qwen3", {"head_dim": 16}),
}
PLANTED = [(0, 1), (0, 6), (1, 3)]


def _batches(n: int, seed: int = 0, batch: int = 2, length: int = 12) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 500, (batch, length), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _head_dim(model) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _o_proj_columns(model, layer: int, head: int) -> tuple[torch.Tensor, slice]:
    hd = _head_dim(model)
    return model.model.layers[layer].self_attn.o_proj.weight, slice(head * hd, (head + 1) * hd)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_planted_heads_are_the_top_k(arch):
    """Every head but the planted ones writes nothing (zero o_proj columns): their gates get exactly zero gradient."""
    name, overrides = ARCHS[arch]
    model = tiny_model(name, **overrides)
    with torch.no_grad():
        for layer in range(model.config.num_hidden_layers):
            for head in range(model.config.num_attention_heads):
                if (layer, head) not in PLANTED:
                    weight, cols = _o_proj_columns(model, layer, head)
                    weight[:, cols] = 0.0
    scores = head_importance(model, _batches(2), progress=False)
    assert scores.dtype == torch.float64 and scores.device.type == "cpu"
    assert tuple(scores.shape) == (model.config.num_hidden_layers, model.config.num_attention_heads)
    planted = torch.zeros_like(scores, dtype=torch.bool)
    for layer, head in PLANTED:
        planted[layer, head] = True
    assert torch.all(scores[~planted] == 0) and torch.all(scores[planted] > 0), scores
    selection = importance_selection(scores, AttentionLayout.from_model(model), 3 / 16, num_batches=2)
    assert selection.heads == PLANTED
    assert (selection.metric, selection.strategy, selection.ratio) == ("importance", "top_k", 3 / 16)
    assert selection.provenance["task"] == "importance (2 batches of the training data)"
    assert selection.scores.tolist() == scores.tolist()


def _float64_loss(model, batch, params=None) -> torch.Tensor:
    # transformers' loss casts the logits to float32; keep the whole comparison in float64.
    kwargs = {"input_ids": batch["input_ids"]}
    out = model(**kwargs) if params is None else torch.func.functional_call(model, params, (), kwargs)
    logits = out.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def _column_scaling_importance(model, batches) -> torch.Tensor:
    """sum_b |dL_b/dg| with the gates applied to o_proj's weight columns (W[:, h] * g[h]), float64 autograd."""
    cfg = model.config
    hd = _head_dim(model)
    params = dict(model.named_parameters())
    out = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64)
    for batch in batches:
        gates = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads, dtype=torch.float64, requires_grad=True)
        scaled = dict(params)
        for layer in range(cfg.num_hidden_layers):
            name = f"model.layers.{layer}.self_attn.o_proj.weight"
            scaled[name] = params[name].detach() * gates[layer].repeat_interleave(hd)[None, :]
        (grad,) = torch.autograd.grad(_float64_loss(model, batch, scaled), gates)
        out += grad.abs()
    return out


@pytest.mark.parametrize("arch", ["llama-gqa", "llama-mha"])
def test_matches_brute_force_per_batch(arch):
    name, overrides = ARCHS[arch]
    model = tiny_model(name, **overrides).double().eval()
    batches = _batches(2, seed=3)
    expected = _column_scaling_importance(model, batches)
    got = head_importance(model, batches, loss_fn=_float64_loss, progress=False)
    assert expected.min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    # The absolute value is taken per batch: the sum over batches of |g_b|, not |sum_b g_b|.
    summed = sum(head_importance(model, [b], loss_fn=_float64_loss, progress=False) for b in batches)
    torch.testing.assert_close(got, summed, rtol=1e-12, atol=0)


@pytest.mark.compat
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_scores(reentrant):
    """With every parameter frozen, only the gates need gradients, also through reentrant checkpointing (which
    supports backward only)."""
    batches = _batches(2)
    expected = head_importance(tiny_model("llama"), batches, progress=False, train_mode=True)
    model = tiny_model("llama")
    enable_activation_checkpointing(model, {"use_reentrant": reentrant})
    got = head_importance(model, batches, progress=False, train_mode=True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_leaves_no_trace(training):
    model = tiny_model("llama")
    model.train(training)
    model.model.embed_tokens.weight.requires_grad_(False)
    earlier = torch.full_like(model.lm_head.weight, 0.5)
    model.lm_head.weight.grad = earlier
    before = full_snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    head_importance(model, _batches(2), progress=False)
    assert model.training is training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.lm_head.weight.grad is earlier
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["lm_head.weight"]
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    o_projs = [layer.self_attn.o_proj for layer in model.model.layers]
    assert not any(o._forward_pre_hooks for o in o_projs)

    def failing(model, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        head_importance(model, _batches(1), loss_fn=failing, progress=False)
    assert not any(o._forward_pre_hooks for o in o_projs)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and model.training is training


def test_loss_fn_and_bad_batches():
    model = tiny_model("llama")
    batches = _batches(2)
    default = head_importance(model, batches, progress=False)
    custom = head_importance(model, batches, loss_fn=lambda m, b: 2.0 * m(**b).loss, progress=False)
    torch.testing.assert_close(custom, 2.0 * default, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="labels"):
        head_importance(model, [{"input_ids": batches[0]["input_ids"]}], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        head_importance(model, [], progress=False)


def test_default_batch_budget_is_the_probes():
    alps = AlpsArguments()
    assert planned_importance_batches(alps, 3, 1) == 1
    assert planned_importance_batches(alps, 100, 4) == 40  # 10 probe steps x 4 micro-batches
    assert planned_importance_batches(alps, 10_000, 8) == IMPORTANCE_MAX_BATCHES
    assert planned_importance_batches(AlpsArguments(alps_importance_batches=5), 10_000, 8) == 5


def test_bad_options_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="uses no task model"):
        sft_config(str(tmp_path), alps_metric="importance", alps_task_model=str(tmp_path / "task"))
    with pytest.raises(ValueError, match="alps_importance_batches must be >= 1"):
        sft_config(str(tmp_path), alps_metric="importance", alps_importance_batches=0)


def test_sharded_backends_are_refused(tmp_path, monkeypatch):
    """Constructing an importance run under FSDP or DeepSpeed fails in the preflight, before any scoring (the
    flags are set where transformers sets them, so no sharded backend has to start on CPU)."""
    import transformers

    from alps_trl.localization import importance

    original = transformers.Trainer.create_accelerator_and_postprocess
    monkeypatch.setattr(importance, "head_importance", lambda *a, **k: pytest.fail("importance ran"))
    for fsdp, deepspeed in ((True, False), (False, True)):

        def create_accelerator(self, fsdp=fsdp, deepspeed=deepspeed):
            original(self)
            self.is_fsdp_enabled, self.is_deepspeed_enabled = fsdp, deepspeed

        monkeypatch.setattr(transformers.Trainer, "create_accelerator_and_postprocess", create_accelerator)
        args = sft_config(str(tmp_path), alps_metric="importance")
        with pytest.raises(ValueError, match="unsharded model.*pass alps_heads"):
            AlpsSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=sft_dataset(),
                           processing_class=tiny_tokenizer())  # fmt: skip


def _train_by_importance(trainer_cls, args, dataset):
    """Train a tiny Llama with no heads given; check the run localized by importance and trained only those heads."""
    model = tiny_model("llama")
    base = qkv_snapshot(model)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer())
    trainer.train()
    selection = trainer.head_selection
    assert trainer.head_source == "importance"
    assert (selection.metric, selection.strategy) == ("importance", "top_k")
    assert selection.scores.max() > 0
    saved = json.loads((Path(args.output_dir) / "alps_heads.json").read_text())
    assert saved["metric"] == "importance" and saved["fingerprint"] == selection.fingerprint()
    assert_restricted(base, trainer.model, selection)
    return trainer


def test_sft_trainer_localizes_by_importance(tmp_path, capfd):
    """Trains with the heads it scored; the scoring pass leaves no trace: a run given the same heads ends equal."""
    args = sft_config(
        str(tmp_path / "importance"), alps_metric="importance", alps_importance_batches=3, disable_tqdm=False
    )
    trainer = _train_by_importance(AlpsSFTTrainer, args, sft_dataset())
    selection = trainer.head_selection
    assert len(selection.heads) == 2
    assert selection.provenance["task"] == "importance (3 batches of the training data)"
    assert os.path.isfile(tmp_path / "importance" / "alps_heads.png")
    err = capfd.readouterr().err
    assert "ALPS importance: 100%" in err and "3/3" in err, err

    given = AlpsSFTTrainer(
        model=tiny_model("llama"),
        args=sft_config(str(tmp_path / "given")),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
        head_selection=selection,
    )
    given.train()
    for (name, p), q in zip(trainer.model.named_parameters(), given.model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("attention_only", [False, True], ids=["precomputed-reference", "parameter-free-reference"])
def test_dpo_trainer_localizes_by_importance(tmp_path, attention_only):
    # At step 0 the policy is the reference, yet the DPO loss's gradient (-beta/2 * d(logp chosen - logp
    # rejected)) reaches the gates: the scores are not all zero.
    args = dpo_config(
        str(tmp_path),
        max_steps=2,
        alps_metric="importance",
        alps_importance_batches=2,
        alps_train_non_attention=not attention_only,
    )
    trainer = _train_by_importance(AlpsDPOTrainer, args, dpo_dataset())
    assert trainer.reference_kind == ("parameter-free" if attention_only else "precomputed")


@pytest.mark.distributed
def test_two_processes_score_different_shares_and_agree(tmp_path):
    from distributed_helpers import accelerate_launch, assert_run_exact, make_tiny_base, read_reports

    base = make_tiny_base(tmp_path / "base")
    scenarios = ["sft-importance", "dpo-importance"]
    accelerate_launch(
        "multi_gpu.yaml", 2, ["--base", str(base), "--out", str(tmp_path), "--scenarios", ",".join(scenarios)]
    )
    for scenario in scenarios:
        reports = read_reports(tmp_path, scenario, 2)
        assert_run_exact(reports, world_size=2, distributed_type="MULTI_CPU", fsdp=False)
        first, second = reports
        assert first["metric"] == second["metric"] == "importance"
        assert first["heads"] == second["heads"] and first["scores"] == second["scores"]
        assert first["provenance"]["processes"] == 2 and first["provenance"]["batches_per_process"] == 2
        assert first["provenance"]["task"] == "importance (4 batches of the training data)"
        # Each rank scored its own two batches; the selection's scores are the sum of both ranks' scores.
        assert len(first["batch_digests"]) == len(second["batch_digests"]) == 2
        assert not set(first["batch_digests"]) & set(second["batch_digests"])
        local = [torch.tensor(r["local_scores"][0], dtype=torch.float64) for r in reports]
        assert not torch.equal(local[0], local[1])
        torch.testing.assert_close(torch.tensor(first["scores"], dtype=torch.float64), local[0] + local[1])
