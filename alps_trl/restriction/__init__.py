"""Restriction of the update to the selected heads' q/k/v rows (layer 4).

Two strategies behind one interface (`Restriction`):

- ``"mask"`` (`MaskRestriction`): the real q/k/v weights train; gradients of unselected rows are
  zeroed and decoupled weight decay touches selected rows only, so unselected rows stay
  bit-identical. Full- or mixed-precision bases, single process, DDP, FSDP2.
- ``"delta"`` (`DeltaRestriction`): base q/k/v frozen; zero-initialised float32 deltas of the
  selected rows are added into the projection outputs. Required for quantized (4-bit/8-bit)
  bases; merged into the weights on save, or saved as a small delta file for ``alps-merge``.
"""

from __future__ import annotations

import torch

from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.localization.selection import HeadSelection
from alps_trl.restriction.base import Restriction, is_quantized
from alps_trl.restriction.delta import DeltaRestriction, merge_delta_checkpoint
from alps_trl.restriction.mask import MaskRestriction

MODES = ("auto", "mask", "delta")

__all__ = [
    "MODES",
    "DeltaRestriction",
    "MaskRestriction",
    "Restriction",
    "build_restriction",
    "is_quantized",
    "merge_delta_checkpoint",
    "resolve_mode",
]


def resolve_mode(mode: str, model: torch.nn.Module) -> str:
    """The concrete restriction mode for `model`: "mask" or "delta".

    "auto" gives "delta" for a quantized base (bitsandbytes 4-bit/8-bit or any HF quantizer) and
    "mask" otherwise. "mask" on a quantized base and unknown modes raise ValueError.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown ALPS mode {mode!r}; alps_mode must be one of {', '.join(map(repr, MODES))}.")
    quantized = is_quantized(model)
    if mode == "auto":
        return "delta" if quantized else "mask"
    if mode == "mask" and quantized:
        raise ValueError(
            'alps_mode="mask" needs trainable q/k/v weights, but this base model is quantized. '
            'Set alps_mode="delta" (or "auto", which picks delta for quantized bases).'
        )
    return mode


def build_restriction(
    model: torch.nn.Module,
    selection: HeadSelection,
    mode: str = "auto",
    *,
    restrict_o_proj: bool = False,
    train_non_attention: bool = True,
    delta_dtype: torch.dtype | None = None,
) -> Restriction:
    """Check `selection` against `model` and build (not install) the restriction for `mode`.

    Args:
        model: the (unwrapped) causal LM.
        selection: heads that train; must match the model's shape (`HeadSelection.check_compatible`).
        mode: "auto" | "mask" | "delta" (see `resolve_mode`).
        restrict_o_proj: also train only the selected heads' input columns of o_proj.
        train_non_attention: False freezes everything but the restricted attention parameters.
        delta_dtype: delta parameter dtype in delta mode (default float32).
    """
    selection.check_compatible(model)
    resolved = resolve_mode(mode, model)
    layout = AttentionLayout.from_model(model)
    kwargs = dict(restrict_o_proj=restrict_o_proj, train_non_attention=train_non_attention)
    if resolved == "delta":
        return DeltaRestriction(layout, selection, delta_dtype=delta_dtype, **kwargs)
    return MaskRestriction(layout, selection, **kwargs)
