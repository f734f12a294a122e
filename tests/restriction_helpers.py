"""Shared pieces of the restriction tests: selections, batches and a plain torch training loop."""

from __future__ import annotations

import torch

from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.localization.selection import HeadSelection

# Layer 0: heads 1 and 2 (kv group 0, group size 4); layer 1: head 7 (kv group 1). Mixed on purpose:
# each layer has selected and unselected q rows and kv groups.
HEADS = [(0, 1), (0, 2), (1, 7)]


def selection_for(model: torch.nn.Module, heads=HEADS) -> HeadSelection:
    layout = AttentionLayout.from_model(model)
    return HeadSelection(
        num_layers=layout.num_layers,
        num_heads=layout.num_heads,
        num_kv_heads=layout.num_kv_heads,
        heads=list(heads),
        strategy="random",
        head_dim=layout.head_dim,
        hidden_size=layout.hidden_size,
        model_type=layout.model_type,
    )


def batch(seed: int, vocab: int = 512, size: tuple[int, int] = (2, 12)) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, size, generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_restricted(restriction, before: dict, after: dict) -> None:
    """Unselected rows/columns of every restricted tensor bit-identical; selected ones changed."""
    for t in restriction.targets:
        b, a = before[t.name], after[t.name]
        if t.dim == 1:
            b, a = b.T, a.T
        mask = t.selected_mask()
        assert torch.equal(b[~mask], a[~mask]), f"unselected rows of {t.name} changed"
        if t.num_selected:
            changed = (b[mask] != a[mask]).reshape(t.num_selected, -1).any(dim=-1)
            assert changed.all(), f"some selected rows of {t.name} did not change"


def param_groups(model: torch.nn.Module, exempt: set[str], weight_decay: float) -> list[dict]:
    """transformers-style groups: no decay for biases, norms and the restriction's exempt names."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in exempt or name.endswith("bias") or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    model: torch.nn.Module,
    restriction=None,
    *,
    steps: int = 3,
    accum: int = 2,
    lr: float = 1e-2,
    weight_decay: float = 0.1,
    optimizer_kwargs: dict | None = None,
    seed: int = 0,
    fixed_batch: bool = False,
) -> list[float]:
    """AdamW, grad accumulation, mask -> clip(1.0) -> restricted decay -> step. Returns per-step losses."""
    exempt = restriction.decay_exempt_parameter_names(model) if restriction is not None else set()
    opt = torch.optim.AdamW(param_groups(model, exempt, weight_decay), lr=lr, **(optimizer_kwargs or {}))
    model.train()
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(accum):
            data = batch(seed + micro) if fixed_batch else batch(seed + 100 * step + micro)
            loss = model(**data).loss / accum
            loss.backward()
            total += loss.item()
        if restriction is not None:
            restriction.mask_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if restriction is not None:
            restriction.apply_weight_decay(model, opt.param_groups[1]["lr"], weight_decay)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses
