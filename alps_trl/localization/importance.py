"""Data-driven head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

Layer 3 (scoring from data instead of weights). A gate g_h = 1 multiplies each attention head's output
before the layer's output projection; a head's importance is how strongly the loss reacts to it,

    I[l, h] = sum over batches b of |dL_b / dg[l, h]|   at g = 1,

where L_b is the (mean) loss of batch b. It needs no task model, only the data: ALPS trainers use it as a
head source with ``alps_metric="importance"`` (top K heads of I on the training data).

The gate is a forward pre-hook on every o_proj (its input, [batch, seq, H * hd], is the concatenation of
the H head outputs), so no weight is touched and fused-qkv architectures work like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from alps_trl.localization.anatomy import AttentionLayout, unwrap_model
from alps_trl.localization.selection import (
    HeadSelection,
    num_selected,
    select_top_k,
    selection_for_layout,
    validate_ratio,
)

logger = logging.get_logger(__name__)

METRIC = "importance"


def head_importance(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    train_mode: bool = False,
) -> torch.Tensor:
    """Accumulated |dL/dg_h| of a gate g_h = 1 on every attention head's output, over `batches`.

    As in Michel et al. (2019), the absolute value is taken per batch, then summed over batches
    (sum_b |dL_b/dg|, not |sum_b dL_b/dg|): heads whose effect changes sign between batches still count.
    No per-layer or global normalization is applied.

    Args:
        model: a HF causal LM of a supported architecture (`AttentionLayout`), possibly DDP/PEFT-wrapped.
        batches: an iterable of dicts of tensors. Without `loss_fn`, each is passed as ``model(**batch)`` and
            must make the model return ``.loss`` (include ``labels``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor``, for any other loss (e.g. a trainer's).
        device: where the top-level tensors of each batch are moved (None: the device of the model's first
            parameter).
        progress: show a tqdm bar over the batches.
        train_mode: run the model in training mode (dropout active) instead of eval mode. Models with 4-bit
            bitsandbytes weights on CPU always run in training mode: an eval-mode forward there repacks the
            weights, after which no gradient flows through them (docs/platform.md).
    Returns:
        float64 CPU tensor [num_layers, num_heads].

    No parameter accumulates a gradient: all parameters are frozen while scoring (so that backward reaches the
    gates only, also through reentrant activation checkpointing) and every ``requires_grad`` flag, the
    train/eval mode and the parameters' ``.grad`` are as before afterwards; the hooks are always removed.
    """
    inner = unwrap_model(model)
    layout = AttentionLayout.from_model(inner)
    params = list(inner.parameters())
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    if not train_mode and any(type(p).__name__ == "Params4bit" and p.device.type == "cpu" for p in params):
        logger.info("ALPS importance: 4-bit weights on CPU, scoring in training mode (bitsandbytes repacks in eval).")
        train_mode = True
    o_projs = [layout.modules_of_layer(inner, layer)["o"] for layer in range(layout.num_layers)]
    gates = [
        torch.ones(layout.num_heads, dtype=torch.float32, device=_module_device(o, device), requires_grad=True)
        for o in o_projs
    ]
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    was_training = inner.training
    handles = []
    total = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    count = 0
    total_batches = len(batches) if hasattr(batches, "__len__") else None
    try:
        for p in params:
            p.requires_grad_(False)
        inner.train(train_mode)
        handles = [o.register_forward_pre_hook(_gate_hook(g, layout)) for o, g in zip(o_projs, gates)]
        bar = tqdm(batches, total=total_batches, desc="ALPS importance", unit="batch", disable=not progress)
        with torch.enable_grad():
            for batch in bar:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
                if loss is None:
                    raise ValueError(
                        "The model returned no loss for a batch: include `labels` in every batch, or pass "
                        "loss_fn(model, batch)."
                    )
                if not loss.requires_grad:
                    raise RuntimeError(
                        "The loss does not depend on the attention gates (it was computed without gradients, or "
                        "not through the model's o_proj modules)."
                    )
                # backward (not autograd.grad): reentrant activation checkpointing supports only backward.
                loss.backward()
                total += torch.stack([_grad_or_zero(g).abs().double().cpu() for g in gates])
                for g in gates:
                    g.grad = None
                count += 1
                if not bar.disable:
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        inner.train(was_training)
    if count == 0:
        raise ValueError("head_importance got no batches: pass at least one batch of the data.")
    return total


def importance_selection(
    scores: torch.Tensor,
    layout: AttentionLayout,
    ratio: float,
    *,
    num_batches: int,
    provenance: dict[str, Any] | None = None,
) -> HeadSelection:
    """The top K = ceil(ratio * L * H) heads by importance, as a `HeadSelection` (metric "importance", top_k).

    Args:
        scores: float [L, H] from `head_importance`.
        num_batches: how many batches the scores were accumulated over (recorded in the provenance).
        provenance: extra entries (e.g. the base model's name).
    """
    ratio = validate_ratio(ratio)
    heads = select_top_k(scores, num_selected(ratio, layout.num_layers, layout.num_heads))
    info = {"task": f"importance ({num_batches} batches of the training data)", **(provenance or {})}
    return selection_for_layout(
        layout, heads, scores=scores, metric=METRIC, ratio=ratio, strategy="top_k", provenance=info
    )


def _gate_hook(gate: torch.Tensor, layout: AttentionLayout) -> Callable:
    """A forward pre-hook for o_proj that multiplies head h's slice of its input by gate[h]."""
    heads, head_dim = layout.num_heads, layout.head_dim

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.shape[-1] != heads * head_dim:
            raise ValueError(
                f"o_proj input has {x.shape[-1]} features, expected num_heads x head_dim = {heads} x {head_dim}."
            )
        g = gate.to(dtype=x.dtype, device=x.device)
        return ((x.unflatten(-1, (heads, head_dim)) * g[:, None]).flatten(-2), *args[1:])

    return hook


def _grad_or_zero(gate: torch.Tensor) -> torch.Tensor:
    # A layer the loss does not reach (e.g. a truncated forward) leaves its gate without gradient.
    return gate.grad if gate.grad is not None else torch.zeros_like(gate)


def _module_device(module: torch.nn.Module, default: torch.device | str) -> torch.device:
    weight = getattr(module, "weight", None)
    return weight.device if weight is not None else torch.device(default)
