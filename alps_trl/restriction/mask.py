"""Mask restriction: the real q/k/v weights train, but only the selected heads' rows change.

Three mechanisms together keep every unselected row bit-identical:

- gradient masking: a post-accumulate-grad hook on each restricted parameter zeroes the frozen rows
  of ``.grad`` as soon as it is accumulated (on a sharded DTensor: the rows of the local shard);
  `mask_gradients` repeats it explicitly once the gradients are reduced, before clipping, so the
  guarantee does not depend on the order in which DDP's and our hooks run, and the clipping norm
  counts only rows that train;
- weight decay: the restricted parameters sit in the optimizer's no-decay group and
  `apply_weight_decay` multiplies only the selected rows by ``1 - lr * wd`` before each step
  (AdamW's decoupled decay, restricted; multiplying nothing else means no other bit changes);
- zero gradients and no decay leave AdamW's update of a frozen row at exactly 0 (its moments stay 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from transformers.utils import logging

from alps_trl.localization.anatomy import unwrap_model
from alps_trl.restriction.base import Restriction, is_quantized
from alps_trl.restriction.delta_checkpoint import DELTA_SUFFIX, INDEX_SUFFIXES
from alps_trl.restriction.rows import LocalPlan, RestrictedTensor, is_dtensor, local_tensor, plan_for

logger = logging.get_logger(__name__)


def _zero_frozen(plan: LocalPlan, grad: torch.Tensor | None) -> None:
    if grad is None:
        return
    local = local_tensor(grad)
    if local.numel():
        local.masked_fill_(plan.frozen_mask, 0)


def _grad_hook(plan: LocalPlan, param: torch.Tensor) -> None:
    # Post-accumulate-grad hooks must return None; they edit param.grad in place.
    _zero_frozen(plan, param.grad)


class MaskRestriction(Restriction):
    """Restrict q/k/v training by masking gradients and weight decay row-wise.

    Not usable on quantized bases (their weights cannot take gradients): use `DeltaRestriction`.
    """

    mode = "mask"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._snapshots: dict[str, torch.Tensor] = {}
        self._plans: dict[str, LocalPlan] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ---- lifecycle ----------------------------------------------------------------------------
    def install(self, model: torch.nn.Module) -> None:
        """Make q/k/v(/o) trainable (tensors without any selected row frozen outright) and snapshot the
        selected rows' original values for `reference`.

        Raises ValueError on a quantized base.
        """
        if is_quantized(model):
            raise ValueError(
                'alps_mode="mask" cannot train a quantized (4-bit/8-bit) base: its weights take no gradients. '
                'Use alps_mode="delta" (or "auto").'
            )
        params = self._named_parameters(model)
        missing = [t.name for t in self.targets if t.name not in params]
        if missing:
            raise ValueError(f"The model has no parameter {missing[0]!r} that its attention layout names.")
        self._record_flags(model)
        if not self.train_non_attention:
            self._freeze_non_attention(model, {t.name for t in self.targets})
        self._snapshots.clear()
        with torch.no_grad():
            for t in self.targets:
                param = params[t.name]
                param.requires_grad_(t.num_selected > 0)
                # install normally runs before sharding; a DTensor here is gathered (a collective).
                full = param.full_tensor() if is_dtensor(param) else param
                self._snapshots[t.name] = full.detach().index_select(t.dim, t.selected.to(full.device)).clone()
        self._plans.clear()
        self._installed = True

    def uninstall(self, model: torch.nn.Module) -> None:
        self.detach()
        self._snapshots.clear()
        self._plans.clear()
        self._restore_flags(model)

    def attach(self, model: torch.nn.Module) -> None:
        """Register post-accumulate-grad hooks on the prepared model's restricted parameters.

        Must run after wrapping (FSDP2 replaces parameter objects). Re-attaching replaces the hooks.
        """
        self._require_installed("attach")
        self.detach()
        for t, param, plan in self._active(model):
            if hasattr(param, "ds_id"):
                raise ValueError(
                    f"{t.name} is a DeepSpeed ZeRO-3 partitioned parameter: ALPS mask mode needs whole rows (or FSDP2 "
                    "Shard(0) rows). Use FSDP2 or DDP for mask mode."
                )
            self._handles.append(param.register_post_accumulate_grad_hook(partial(_grad_hook, plan)))
        logger.info(f"ALPS mask: gradient hooks on {len(self._handles)} q/k/v parameters.")

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- per step -----------------------------------------------------------------------------
    def mask_gradients(self, model: torch.nn.Module) -> None:
        """Zero the frozen rows of every restricted parameter's current gradient (local shard)."""
        self._require_installed("mask_gradients")
        for _, param, plan in self._active(model):
            _zero_frozen(plan, param.grad)

    def decay_exempt_parameter_names(self, model: torch.nn.Module) -> set[str]:
        """All restricted q/k/v(/o) weights and biases: their decay is `apply_weight_decay`'s job."""
        return {t.name for t in self.targets}

    @torch.no_grad()
    def apply_weight_decay(self, model: torch.nn.Module, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay ``p[selected] *= 1 - lr * weight_decay`` on restricted weights.

        Biases are not decayed, as with transformers' default no-decay group. Unselected rows are not
        touched at all, so they stay bit-identical. `lr` may be a 0-dim tensor.
        """
        self._require_installed("apply_weight_decay")
        lr = float(lr)
        if lr == 0.0 or weight_decay == 0.0:
            return
        factor = 1.0 - lr * float(weight_decay)
        for t, param, plan in self._active(model):
            if t.kind != "weight" or plan.selected.numel() == 0:
                continue
            local = local_tensor(param).data
            rows = local.index_select(plan.dim, plan.selected)
            rows.mul_(factor)
            local.index_copy_(plan.dim, plan.selected, rows)

    # ---- reference ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self, model: torch.nn.Module) -> Iterator[None]:
        """Swap the original (install-time) selected rows in; restore the trained rows exactly on exit.

        Writes go through ``.data`` so autograd's version counters are untouched: a reference
        forward between a policy forward and its backward leaves that backward valid.
        """
        self._require_installed("reference")
        saved: list[tuple[torch.Tensor, LocalPlan, torch.Tensor]] = []
        with torch.no_grad():
            for t, param, plan in self._active(model):
                if plan.selected.numel() == 0:
                    continue
                local = local_tensor(param).data
                original = plan.local_part(self._snapshots[t.name]).to(local.device)
                saved.append((local, plan, local.index_select(plan.dim, plan.selected)))
                local.index_copy_(plan.dim, plan.selected, original)
        try:
            yield
        finally:
            with torch.no_grad():
                for local, plan, trained in saved:
                    local.index_copy_(plan.dim, plan.selected, trained)

    # ---- export -------------------------------------------------------------------------------
    @torch.no_grad()
    def trained_deltas(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Trained rows minus install-time rows of every restricted tensor that trains (CPU, float32)."""
        self._require_installed("trained_deltas")
        params = self._named_parameters(model)
        out: dict[str, torch.Tensor] = {}
        for t in self.targets:
            param = params[t.name]
            if t.num_selected == 0 or not param.requires_grad:
                continue
            full = param.full_tensor() if is_dtensor(param) else param
            index = t.selected.to(full.device)
            trained = full.detach().index_select(t.dim, index).to(torch.float32)
            original = self._snapshots[t.name].to(full.device, torch.float32)
            out[t.name + DELTA_SUFFIX] = (trained - original).cpu().contiguous()
            out[t.name + INDEX_SUFFIXES[t.dim]] = t.selected.to("cpu", torch.int64).clone()
        return out

    # ---- internals ----------------------------------------------------------------------------
    def _active(self, model: torch.nn.Module) -> Iterator[tuple[RestrictedTensor, torch.Tensor, LocalPlan]]:
        """(target, parameter, local plan) for every restricted parameter that trains.

        Plans are cached and rebuilt only when the parameter object, device, shard or shape changes.
        """
        params = dict(unwrap_model(model).named_parameters())
        for t in self.targets:
            param = params.get(t.name)
            if param is None:
                raise ValueError(
                    f"Parameter {t.name!r} is missing from the model given to {type(self).__name__}: pass the "
                    "model the restriction was installed on (or its DDP/FSDP2-wrapped version)."
                )
            if not param.requires_grad:
                continue
            plan = self._plans.get(t.name)
            local = local_tensor(param)
            if (
                plan is None
                or plan.key[0] != id(param)
                or plan.key[1] != str(local.device)
                or plan.key[3] != tuple(local.shape)
            ):
                plan = plan_for(t, param)
                self._plans[t.name] = plan
            yield t, param, plan
