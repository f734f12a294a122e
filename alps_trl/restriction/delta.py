"""Delta restriction: the base q/k/v stay frozen; small per-projection deltas hold the selected rows.

For every projection with a selected row, a child module ``<projection>.alps_delta`` (a `HeadDelta`)
holds a zero-initialised float32 ``weight`` of shape [n_rows, in_features] (and ``bias`` [n_rows]
where the base has a bias). A forward hook on the projection adds ``x @ weight.T + bias`` into the
projection's output at the selected output channels, cast to the output's dtype. This is the
pattern of PEFT's TrainableTokens applied to attention rows. Because the deltas live inside the
projection module, they sit in the decoder layer's module tree (FSDP2 shards them with the layer),
and the base module is never replaced: a 4-bit bitsandbytes ``Linear4bit`` computes its frozen
output as usual and backward flows into the float32 delta.

With `restrict_o_proj`, o_proj gets a column delta [out_features, n_cols] applied to the selected
heads' slice of its input.

Weight decay: the deltas are ordinary parameters and take the optimizer's normal decoupled decay,
which pulls them toward zero, i.e. toward the base weights (not toward zero weights as in mask mode).

Saving: `merge` folds the deltas into a non-quantized base in place (a plain HF module tree again);
`save_delta` writes the small delta file (safetensors, the selection JSON in its metadata), and
`merge_delta_checkpoint` / ``alps-merge BASE DELTA OUTPUT`` applies it to the full-precision base
checkpoint, streaming one shard at a time.

The delta file format and the merging functions live in `alps_trl.restriction.delta_checkpoint`
and are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from transformers.utils import logging

from alps_trl.localization.anatomy import unwrap_model
from alps_trl.restriction.base import Restriction, is_quantized
from alps_trl.restriction.delta_checkpoint import (
    DELTA_SUFFIX,
    INDEX_SUFFIXES,
    apply_delta,
    describe_delta_file,
    load_delta_file,
    merge_delta_checkpoint,
    merge_state_dict,
    save_delta_file,
    split_delta_state_dict,
)
from alps_trl.restriction.rows import RestrictedTensor, is_dtensor, local_block

logger = logging.get_logger(__name__)

DELTA_CHILD = "alps_delta"

__all__ = [
    "DeltaRestriction",
    "HeadDelta",
    "apply_delta",
    "describe_delta_file",
    "load_delta_file",
    "merge_delta_checkpoint",
    "merge_state_dict",
    "save_delta_file",
]


class HeadDelta(nn.Module):
    """Trainable rows (dim 0) or columns (dim 1) added into one Linear projection's output.

    Args:
        index: int64 [n] global output rows (dim 0) or input columns (dim 1) of the projection.
        dim: 0 for q/k/v rows, 1 for o_proj columns.
        in_features, out_features: the projection's shape.
        bias: add a bias delta [n] (dim 0 only).
        dtype: parameter dtype (float32 by default, also for bf16 and 4-bit bases).

    Parameters: ``weight`` [n, in_features] (dim 0) or [out_features, n] (dim 1); ``bias`` [n] or None.
    """

    def __init__(
        self,
        index: torch.Tensor,
        dim: int,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if dim not in (0, 1):
            raise ValueError(f"HeadDelta dim must be 0 (rows) or 1 (columns), got {dim}.")
        n = int(index.numel())
        shape = (n, in_features) if dim == 0 else (out_features, n)
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias and dim == 0 else None
        # Non-persistent: the indices are derived from the selection and stored separately in delta files.
        self.register_buffer("index", index.to(device=device, dtype=torch.int64), persistent=False)
        self.enabled = True

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output`` [..., out_features] plus this delta's contribution for input ``x`` [..., in_features].

        Called as a module (not a plain method) so that wrappers that gather parameters in module
        hooks see the delta's parameters being used.
        """
        weight = self.weight
        if self.dim == 0:
            contribution = nn.functional.linear(x.to(weight.dtype), weight, self.bias)
            return output.index_add(-1, self.index, contribution.to(output.dtype))
        columns = x.index_select(-1, self.index)
        contribution = nn.functional.linear(columns.to(weight.dtype), weight)
        return output + contribution.to(output.dtype)

    def extra_repr(self) -> str:
        kind = "rows" if self.dim == 0 else "cols"
        return f"{kind}={self.index.numel()}, weight={tuple(self.weight.shape)}, bias={self.bias is not None}"


def _delta_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
    delta = getattr(module, DELTA_CHILD, None)
    if delta is None or not delta.enabled:
        return None
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    return delta(x, output)


class DeltaRestriction(Restriction):
    """Restrict q/k/v training to per-projection deltas over frozen base weights.

    Works for plain ``nn.Linear`` and bitsandbytes ``Linear4bit``/``Linear8bitLt`` projections, under
    DDP and FSDP2 (deltas are children of the projections). On a quantized base every base
    parameter is frozen (4-bit weights cannot train); only the deltas train. Weight decay on the
    deltas pulls them toward zero, i.e. toward the base weights.

    Args (beyond `Restriction`'s):
        delta_dtype: dtype of the delta parameters (default float32). FSDP2 needs one dtype for all
            trainable parameters of a layer: with a bf16 base and trainable non-attention weights,
            pass the base dtype or train with an fp32 master copy.
    """

    mode = "delta"

    def __init__(self, *args, delta_dtype: torch.dtype | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delta_dtype = delta_dtype or torch.float32
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        # module name -> (weight target, bias target or None)
        self._projections: dict[str, tuple[RestrictedTensor, RestrictedTensor | None]] = {}
        self._quantized = False
        self._merged = False

    @property
    def rest_trains(self) -> bool:
        return self.train_non_attention and not self._quantized  # a quantized base freezes everything but the deltas

    # ---- lifecycle ----------------------------------------------------------------------------
    def install(self, model: torch.nn.Module) -> None:
        """Freeze the base q/k/v (all base weights for quantized bases or train_non_attention=False) and add
        a zero `HeadDelta` plus forward hook to every projection that has a selected row."""
        inner = unwrap_model(model)
        self._quantized = is_quantized(inner)
        params = dict(inner.named_parameters())
        self._record_flags(inner)
        if self._quantized and self.train_non_attention:
            logger.warning(
                "ALPS delta mode on a quantized base: the quantized weights cannot train, so every base parameter "
                "is frozen and only the selected heads' q/k/v deltas train (alps_train_non_attention is ignored)."
            )
        if self._quantized or not self.train_non_attention:
            self._freeze_non_attention(model, set())
        for t in self.targets:
            if t.name not in params:
                raise ValueError(f"The model has no parameter {t.name!r} that its attention layout names.")
            params[t.name].requires_grad_(False)
        weights = {t.module: t for t in self.targets if t.kind == "weight"}
        biases = {t.module: t for t in self.targets if t.kind == "bias"}
        for module_name, wt in weights.items():
            if wt.num_selected == 0:
                continue
            module = inner.get_submodule(module_name)
            if hasattr(module, DELTA_CHILD):
                raise RuntimeError(f"{module_name} already has an ALPS delta: install() ran twice on this model.")
            bt = biases.get(module_name)
            device = module.weight.device
            if device.type == "meta":
                raise ValueError(f"{module_name} is on the meta device: install the restriction on a loaded model.")
            delta = HeadDelta(
                wt.selected,
                wt.dim,
                int(module.in_features),
                int(module.out_features),
                bias=bt is not None and wt.dim == 0,
                dtype=self.delta_dtype,
                device=device,
            )
            module.add_module(DELTA_CHILD, delta)
            self._handles[module_name] = module.register_forward_hook(_delta_hook, with_kwargs=True)
            self._projections[module_name] = (wt, bt if wt.dim == 0 else None)
        self._installed = True
        self._warn_mixed_trainable_dtypes(inner)
        logger.info(f"ALPS delta: {len(self._projections)} projections carry trainable head deltas.")

    def _warn_mixed_trainable_dtypes(self, inner: torch.nn.Module) -> None:
        # FSDP2 refuses layers whose trainable parameters differ in dtype (without a MixedPrecisionPolicy).
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        dtypes = {p.dtype for p in inner.parameters() if p.requires_grad and p.is_floating_point()}
        if len(dtypes) > 1:
            logger.warning(
                f"ALPS delta mode: trainable parameters have dtypes {sorted(map(str, dtypes))}. FSDP2 needs one dtype "
                "per layer: load the model in float32 (with bf16 mixed precision), freeze the rest "
                "(alps_train_non_attention=False), or build the restriction with delta_dtype equal to the model dtype."
            )

    def attach(self, model: torch.nn.Module) -> None:
        """Check that the prepared model still carries the deltas (hooks live on the modules, which DDP and
        FSDP2 keep). Nothing to register."""
        self._require_installed("attach")
        inner = unwrap_model(model)
        for module_name in self._projections:
            if not isinstance(getattr(inner.get_submodule(module_name), DELTA_CHILD, None), HeadDelta):
                raise RuntimeError(f"{module_name} lost its ALPS delta after wrapping; install before prepare().")

    def decay_exempt_parameter_names(self, model: torch.nn.Module) -> set[str]:
        """None: deltas take the optimizer's normal decay (toward the base weights)."""
        return set()

    # ---- reference ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self, model: torch.nn.Module) -> Iterator[None]:
        """Switch every delta off: the projections compute exactly the frozen base output."""
        self._require_installed("reference")
        if self._merged:
            raise RuntimeError("The deltas were merged into the base weights; no reference model is left.")
        deltas = self._deltas(model)
        previous = [d.enabled for d in deltas.values()]
        for d in deltas.values():
            d.enabled = False
        try:
            yield
        finally:
            for d, was in zip(deltas.values(), previous):
                d.enabled = was

    # ---- saving -------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, model: torch.nn.Module) -> None:
        """Add the deltas into the base weights (float32 sum, cast back) and remove deltas and hooks.

        Afterwards the model is a plain HF module tree with the original state_dict keys and the
        requires_grad flags it had before `install`. Refused for quantized bases (use `save_delta` +
        `merge_delta_checkpoint`) and for FSDP2-sharded parameters (gather a full state dict and use
        `merge_state_dict`).
        """
        self._require_installed("merge")
        if self._merged:
            return
        if self._quantized:
            raise ValueError(
                "Cannot merge deltas into a quantized base in memory. Save them with save_delta(model, path) and "
                "apply them to the full-precision base with `alps-merge BASE DELTA OUTPUT`."
            )
        inner = unwrap_model(model)
        for module_name in self._projections:
            module = inner.get_submodule(module_name)
            delta: HeadDelta = getattr(module, DELTA_CHILD)
            for base, value in ((module.weight, delta.weight), (module.bias, delta.bias)):
                if value is None or base is None:
                    continue
                if is_dtensor(base) or is_dtensor(value):
                    raise ValueError(
                        "Cannot merge deltas into FSDP2-sharded weights in place: gather a full state dict and "
                        "use alps_trl.restriction.delta.merge_state_dict(state_dict, delta_state_dict)."
                    )
                base.data.copy_(apply_delta(base.data, value.detach(), delta.index, delta.dim))
        self._remove_deltas(inner)
        self._restore_flags(inner)
        self._installed = True  # merged: delta_state_dict answers {}
        self._merged = True

    def uninstall(self, model: torch.nn.Module) -> None:
        if self._merged:
            raise RuntimeError("The deltas were merged into the base weights already; nothing to uninstall.")
        inner = unwrap_model(model)
        self._remove_deltas(inner)
        self._restore_flags(inner)
        self._projections.clear()

    def _remove_deltas(self, inner: torch.nn.Module) -> None:
        for module_name in self._projections:
            self._handles.pop(module_name).remove()
            delattr(inner.get_submodule(module_name), DELTA_CHILD)

    def delta_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Trained deltas as CPU tensors keyed by base tensor name (see module docstring).

        Under FSDP2 and DeepSpeed ZeRO-3 this gathers sharded deltas (a collective: call it on every rank).
        """
        self._require_installed("delta_state_dict")
        if self._merged:  # the deltas live in the base weights now
            return {}
        out: dict[str, torch.Tensor] = {}
        deltas = self._deltas(model)
        with _gathered_zero3([p for d in deltas.values() for p in d.parameters()]):
            for module_name, (wt, bt) in self._projections.items():
                delta = deltas[module_name]
                index = delta.index.detach().to("cpu", torch.int64).contiguous()
                for target, value in ((wt, delta.weight), (bt, delta.bias)):
                    if target is None or value is None:
                        continue
                    full = value.full_tensor() if is_dtensor(value) else value
                    out[target.name + DELTA_SUFFIX] = full.detach().to("cpu", torch.float32).contiguous()
                    out[target.name + INDEX_SUFFIXES[target.dim]] = index.clone()
        return out

    @torch.no_grad()
    def load_delta_state_dict(self, model: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> None:
        """Copy deltas (from `delta_state_dict` or a delta file) into this model's delta parameters.

        Works before and after wrapping (FSDP2-sharded deltas receive their local rows).
        """
        self._require_installed("load_delta_state_dict")
        parsed = split_delta_state_dict(deltas)
        modules = self._deltas(model)
        for module_name, (wt, bt) in self._projections.items():
            delta = modules[module_name]
            for target, param in ((wt, delta.weight), (bt, delta.bias)):
                if target is None or param is None:
                    continue
                if target.name not in parsed:
                    raise KeyError(f"The delta file has no entry for {target.name!r}: it was made for other heads.")
                value, index, _ = parsed[target.name]
                if not torch.equal(index.cpu(), delta.index.cpu()):
                    raise ValueError(f"The delta for {target.name!r} covers other rows than this head selection.")
                if is_dtensor(param):  # FSDP2: copy this rank's rows of the full delta into its shard
                    offset, rows = local_block(param)
                    local = param._local_tensor
                    local.copy_(value[offset : offset + rows].to(local.device, local.dtype))
                else:
                    param.copy_(value.to(param.device, param.dtype))

    def save_delta(self, model: torch.nn.Module, path: str | os.PathLike, *, base_model: str | None = None) -> None:
        """Write `delta_state_dict` to a safetensors file with the selection JSON and base name in its metadata."""
        save_delta_file(
            self.delta_state_dict(model),
            path,
            selection=self.selection,
            base_model=base_model or getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", ""),
            restrict_o_proj=self.restrict_o_proj,
            rest_trained=self.rest_trains,
        )

    # ---- internals ----------------------------------------------------------------------------
    def _deltas(self, model: torch.nn.Module) -> dict[str, HeadDelta]:
        inner = unwrap_model(model)
        return {name: getattr(inner.get_submodule(name), DELTA_CHILD) for name in self._projections}


def _gathered_zero3(params: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Gather DeepSpeed ZeRO-3 partitioned parameters for reading (a collective); a no-op for any other parameter."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)
