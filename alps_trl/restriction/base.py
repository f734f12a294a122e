"""The `Restriction` interface: how an update is confined to the selected heads' q/k/v rows.

Lifecycle, as a trainer drives it:

1. ``restriction = build_restriction(model, selection, mode)`` (checks shapes, picks mask/delta);
2. ``restriction.install(model)`` on the unwrapped model, before ``accelerator.prepare``;
3. ``restriction.attach(prepared_model)`` after ``accelerator.prepare`` (DDP/FSDP2 wrapped);
4. every optimizer step: backward (+ reduction) -> ``mask_gradients`` -> clip ->
   ``apply_weight_decay(model, lr, wd)`` -> ``optimizer.step()``; the optimizer holds the names of
   ``decay_exempt_parameter_names`` in its no-decay group;
5. ``with restriction.reference(model):`` computes as the base model (DPO reference);
6. ``merge`` / ``delta_state_dict`` when saving.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from alps_trl.localization.anatomy import AttentionLayout, unwrap_model
from alps_trl.localization.selection import HeadSelection
from alps_trl.restriction.rows import RestrictedTensor, restricted_tensors

# Name of the child module that holds a projection's delta parameters (delta mode).
DELTA_MARKER = ".alps_delta."


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a base whose weights are quantized (bitsandbytes 4/8-bit or another HF quantizer).

    A model loaded from a GGUF file is not: transformers dequantizes its weights into float ``nn.Linear`` layers.
    """
    from alps_trl.localization.gguf import is_gguf_model

    inner = unwrap_model(model)
    if is_gguf_model(inner):  # dequantized on load: plain float nn.Linear weights
        return False
    if getattr(inner, "is_quantized", False) or getattr(inner, "hf_quantizer", None) is not None:
        return True
    if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False):
        return True
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in inner.parameters())


def param_numel(param: torch.Tensor) -> int:
    """Logical number of entries of a parameter (a packed 4-bit parameter counts its unpacked shape)."""
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return int(param.numel())


class Restriction:
    """Confines training of the attention q/k/v to the rows of the selected heads.

    Args:
        layout: the model's `AttentionLayout`.
        selection: the `HeadSelection` (already checked against the model by `build_restriction`).
        restrict_o_proj: also restrict o_proj to the input columns of the selected query heads
            (``o_proj.weight[:, h*hd:(h+1)*hd]``). Its bias, shared by all heads, is treated as a
            non-attention parameter.
        train_non_attention: True (the paper's setting) leaves every other parameter (MLP, norms,
            embeddings, unrestricted o_proj) as it is; False freezes all of them.
    """

    mode: str = ""

    def __init__(
        self,
        layout: AttentionLayout,
        selection: HeadSelection,
        *,
        restrict_o_proj: bool = False,
        train_non_attention: bool = True,
    ) -> None:
        self.layout = layout
        self.selection = selection
        self.restrict_o_proj = bool(restrict_o_proj)
        self.train_non_attention = bool(train_non_attention)
        self.targets: list[RestrictedTensor] = restricted_tensors(layout, selection, restrict_o_proj=restrict_o_proj)
        self._installed = False

    # ---- lifecycle ----------------------------------------------------------------------------
    def install(self, model: torch.nn.Module) -> None:
        """Set requires_grad (and, in delta mode, add the delta parameters) on the unwrapped model."""
        raise NotImplementedError

    def uninstall(self, model: torch.nn.Module) -> None:
        """Undo `install` on a model that has not trained yet: hooks and added parameters removed, every
        requires_grad flag as it was before `install`. Lets a trainer swap in a checkpoint's selection."""
        raise NotImplementedError

    def _record_flags(self, model: torch.nn.Module) -> None:
        self._flags_before = {n: p.requires_grad for n, p in unwrap_model(model).named_parameters()}

    def _restore_flags(self, model: torch.nn.Module) -> None:
        for name, param in unwrap_model(model).named_parameters():
            if name in getattr(self, "_flags_before", {}):
                param.requires_grad_(self._flags_before[name])
        self._installed = False

    def attach(self, model: torch.nn.Module) -> None:
        """Register per-step machinery on the prepared (possibly DDP/FSDP2-wrapped) model. Idempotent."""

    def detach(self) -> None:
        """Remove what `attach` registered."""

    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Zero the gradient entries of frozen rows in every restricted parameter's ``.grad``. Idempotent."""

    def decay_exempt_parameter_names(self, model: torch.nn.Module) -> set[str]:
        """Names (unwrapped ``named_parameters()``) that the optimizer must not decay itself."""
        return set()

    def apply_weight_decay(self, model: torch.nn.Module, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay on the selected rows of the exempted parameters (before optimizer.step)."""

    def reference(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context in which the model's attention computes as the untrained base model."""
        raise NotImplementedError

    def merge(self, model: torch.nn.Module) -> None:
        """Fold trained deltas into the base weights (delta mode); no-op for mask mode."""

    def delta_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trained deltas as a flat tensor dict (delta mode); empty for mask mode."""
        return {}

    def trained_deltas(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """What training changed in the restricted tensors, in the delta-file format (``T.alps_delta`` float32 rows
        or columns, ``T.alps_rows`` / ``T.alps_cols`` int64): delta mode's deltas, mask mode's trained rows minus
        the install-time rows. A collective under FSDP2 (call it on every rank)."""
        return self.delta_state_dict(model)

    @property
    def rest_trains(self) -> bool:
        """Whether parameters outside the restricted tensors train (then the deltas are not all training changes)."""
        return self.train_non_attention

    # ---- helpers ------------------------------------------------------------------------------
    def _require_installed(self, what: str) -> None:
        if not self._installed:
            raise RuntimeError(f"{type(self).__name__}.{what}() needs install(model) to have run first.")

    def _named_parameters(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return dict(unwrap_model(model).named_parameters())

    def _freeze_non_attention(self, model: torch.nn.Module, keep: set[str]) -> None:
        for name, param in unwrap_model(model).named_parameters():
            if name not in keep:
                param.requires_grad_(False)

    # ---- reporting ----------------------------------------------------------------------------
    def trainable_restricted_entries(self, dim: int = 0) -> int:
        """Entries of the restricted tensors that can change: dim 0 = q/k/v rows (biases included), 1 = o_proj."""
        total = 0
        for t in self.targets:
            if t.dim == dim:
                total += t.num_selected * (1 if t.kind == "bias" else self.layout.hidden_size)
        return total

    def summary(self, model: torch.nn.Module) -> dict[str, Any]:
        """Counts for the startup report.

        Returns a dict with: mode, heads_selected, heads_total, kv_groups_selected, kv_groups_total,
        trainable_qkv_params (q/k/v weight and bias entries that can change), qkv_params_total,
        pct_of_qkv, trainable_params_total (everything that can change, restricted tensors counted by
        their selected rows only), params_total (logical; 4-bit weights count unpacked), pct_of_model.
        """
        params = self._named_parameters(model)
        target_names = {t.name for t in self.targets}
        qkv_total = sum(param_numel(params[t.name]) for t in self.targets if t.dim == 0 and t.name in params)
        trainable_qkv = self.trainable_restricted_entries(0)
        trainable_other = sum(
            param_numel(p)
            for n, p in params.items()
            if p.requires_grad and n not in target_names and DELTA_MARKER not in n
        )
        trainable_total = trainable_qkv + self.trainable_restricted_entries(1) + trainable_other
        total = sum(param_numel(p) for n, p in params.items() if DELTA_MARKER not in n)
        kv_mask = self.selection.kv_mask()
        return {
            "mode": self.mode,
            "heads_selected": len(self.selection.heads),
            "heads_total": self.layout.num_layers * self.layout.num_heads,
            "kv_groups_selected": int(kv_mask.sum()),
            "kv_groups_total": self.layout.num_layers * self.layout.num_kv_heads,
            "trainable_qkv_params": trainable_qkv,
            "qkv_params_total": qkv_total,
            "pct_of_qkv": 100.0 * trainable_qkv / max(qkv_total, 1),
            "trainable_params_total": trainable_total,
            "params_total": total,
            "pct_of_model": 100.0 * trainable_total / max(total, 1),
            "restrict_o_proj": self.restrict_o_proj,
            "train_non_attention": self.train_non_attention,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.selection.heads)}/{self.layout.num_layers * self.layout.num_heads} "
            f"heads, restrict_o_proj={self.restrict_o_proj}, train_non_attention={self.train_non_attention})"
        )
