"""One lean fine-tuning loop shared by every method of the benchmarks.

It drives the library's restriction layer exactly as `AlpsSFTTrainer` does, minus the Trainer machinery, so that
step times compare methods rather than framework overhead:

    backward -> restriction.mask_gradients -> clip -> restriction.apply_weight_decay(lr, wd) -> optimizer.step

with the restriction's `decay_exempt_parameter_names` (the restricted q/k/v) in the optimizer's no-decay group.
Methods:

- ``full``: every parameter trains.
- ``wo_attn``: all q/k/v weights frozen, everything else trains (the paper's "w/o attn").
- ``qkv``: only the q/k/v weights train, every head (how the benchmarks make a fine-tuned copy to localize on).
- ``heads``: an ALPS-style restriction from a `HeadSelection` (any strategy) in mask or delta mode.
- ``lora``: PEFT LoRA on q_proj/k_proj/v_proj, everything else frozen.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from alps_trl.localization.selection import HeadSelection

QKV = ("q_proj", "k_proj", "v_proj")


@dataclass
class Method:
    """What trains. `kind` is "full" | "wo_attn" | "qkv" | "heads" | "lora"."""

    name: str
    kind: str
    selection: HeadSelection | None = None
    mode: str = "mask"
    train_non_attention: bool = True
    lora_rank: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    """A model set up for one method, and its restriction (None unless kind == "heads")."""

    model: torch.nn.Module
    restriction: Any = None
    exempt: set[str] = field(default_factory=set)


class LMBatch:
    """A causal-LM batch in which every token is labelled: input_ids = labels, long [B, T]; attention all ones."""

    def __init__(self, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.labels = input_ids
        self.attention_mask = torch.ones_like(input_ids)


def _is_qkv(name: str) -> bool:
    return any(f".{p}." in name for p in QKV)


def prepare(model: torch.nn.Module, method: Method) -> Prepared:
    """Set requires_grad / install the restriction or the LoRA adapters for `method` (model changes in place)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if method.kind == "full":
        return Prepared(model)
    if method.kind in ("wo_attn", "qkv"):
        for name, p in model.named_parameters():
            if _is_qkv(name) == (method.kind == "wo_attn"):
                p.requires_grad_(False)
        return Prepared(model)
    if method.kind == "heads":
        from alps_trl.restriction import build_restriction

        restriction = build_restriction(
            model, method.selection, mode=method.mode, train_non_attention=method.train_non_attention
        )
        restriction.install(model)
        restriction.attach(model)
        return Prepared(model, restriction, set(restriction.decay_exempt_parameter_names(model)))
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=method.lora_rank, lora_alpha=2 * method.lora_rank, lora_dropout=0.0, target_modules=list(QKV)
        )
        return Prepared(get_peft_model(model, config))
    raise ValueError(f"Unknown method kind {method.kind!r}; use full, wo_attn, qkv, heads or lora.")


def make_optimizer(prep: Prepared, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW(0.9, 0.999) with biases, norms and the restriction's exempt parameters in the no-decay group.

    The no-decay group comes first, so `param_groups[0]` holds the restricted q/k/v (their lr drives
    `apply_weight_decay`, as in the trainer).
    """
    decay, no_decay = [], []
    for name, p in prep.model.named_parameters():
        if not p.requires_grad:
            continue
        if name in prep.exempt or name.endswith(".bias") or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))


def lr_at(step: int, total: int, peak: float, warmup_ratio: float = 0.1, floor: float = 0.1) -> float:
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `floor * peak` (the paper's schedule)."""
    warm = max(1, round(warmup_ratio * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_of(model: torch.nn.Module, batch: Any, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens of `batch`.

    With `autocast_dtype` (e.g. torch.bfloat16) the forward pass runs under torch.autocast on the batch's device;
    the loss it returns is float32 either way. A batch may carry `forward_kwargs` (a dict) for the model call, e.g.
    ``logits_to_keep`` with labels of the kept positions only (`real_model.tasks.ChatBatch`).
    """
    device_type = batch.input_ids.device.type
    extra = getattr(batch, "forward_kwargs", None) or {}
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, **extra)
    return out.loss.float()


def train_step(
    prep: Prepared,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    lr: float,
    weight_decay: float,
    clip: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One optimizer step in the trainer's order (forward under `autocast_dtype` when given); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = loss_of(prep.model, batch, autocast_dtype)
    loss.backward()
    if prep.restriction is not None:
        prep.restriction.mask_gradients(prep.model)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(trainable, clip)
    if prep.restriction is not None:
        prep.restriction.apply_weight_decay(prep.model, lr, weight_decay)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train(
    prep: Prepared,
    batches: Iterable[Any],
    lr: float,
    weight_decay: float = 0.1,
    clip: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
) -> list:
    """Run the paper's schedule (warmup 10%, cosine to 10%) over `batches`; returns the per-step losses."""
    batches = list(batches)
    optimizer = make_optimizer(prep, lr, weight_decay)
    prep.model.train()
    return [
        train_step(prep, optimizer, b, lr_at(i, len(batches), lr), weight_decay, clip, autocast_dtype)
        for i, b in enumerate(batches)
    ]


def trainable_parameters(prep: Prepared) -> int:
    """Entries that can change: restricted tensors count their selected rows only (mask mode)."""
    if prep.restriction is not None:
        return int(prep.restriction.summary(prep.model)["trainable_params_total"])
    return sum(p.numel() for p in prep.model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer state tensors (AdamW: exp_avg and exp_avg_sq per trainable parameter)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def batch_indices(num_items: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` lists of `batch_size` item indices, drawn by shuffled epochs over range(num_items) (seeded)."""
    rng = random.Random(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(num_items))
            rng.shuffle(fresh)
            order.extend(fresh)
        take, order = order[:batch_size], order[batch_size:]
        out.append(take)
    return out
