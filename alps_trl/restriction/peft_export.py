"""Trained head rows as a standard PEFT LoRA adapter: what `PeftModel`, transformers' `load_adapter` and vLLM load.

A delta on rows R of a projection weight W [out, in] is a LoRA update, exactly: with A = the delta rows
[|R|, in] and B the 0/1 selector [out, |R|] (B[R[i], i] = 1), r = |R| and lora_alpha = r (scaling 1),
W + B @ A is the trained weight and ``W x + B (A x)`` the trained output. Restricted o_proj columns C are the
transpose: B = the delta columns [out, |C|], A the selector [|C|, in] (A[i, C[i]] = 1). Ranks differ per
module; PEFT's ``rank_pattern`` / ``alpha_pattern`` carry them, and a module without a selected row has no
entry. ``uniform_rank=True`` gives every module the largest rank instead, A padded with zero rows and B with
zero columns (the same update), for servers that take one rank (vLLM's ``--max-lora-rank``).

A q/k/v bias delta has no slot in a plain LoRA layer: it goes into PEFT's ``lora_bias`` (a bias on lora_B,
[out], zero outside the trained rows), which PEFT adds in the forward and folds in at ``merge_and_unload()``;
the base bias itself is never rewritten, so disabling the adapter gives the base back. ``lora_bias`` is one
switch for every targeted module, so an adapter with bias deltas cannot also hold o_proj columns of a model
whose o_proj has no bias (refused).

The adapter directory holds ``adapter_config.json`` (written by `peft.LoraConfig.save_pretrained`),
``adapter_model.safetensors`` (tensor names as `PeftModel.save_pretrained` writes them:
``base_model.model.<module>.lora_A.weight``; tests/test_peft_export.py compares the names with PEFT's own
save) and ``alps_heads.json`` (the head selection). The tensors are float32, like the deltas.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.localization.atomic import atomic_directory
from alps_trl.localization.selection import HeadSelection
from alps_trl.restriction.delta_checkpoint import (
    _resolve_checkpoint_dir,
    check_delta,
    check_output_outside_inputs,
    load_delta_file,
    read_config,
    split_delta_state_dict,
)
from alps_trl.restriction.rows import restricted_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_HEADS = "alps_heads.json"
# PeftModel's state dict prefix (PeftModel.base_model is a LoraModel whose .model is the transformers model).
PEFT_PREFIX = "base_model.model."
# The ranks vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks in current releases).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

NON_ATTENTION_MESSAGE = (
    "A PEFT adapter holds the q/k/v (and o_proj) updates of head-only training only, but this run also trains the "
    "rest of the network (alps_train_non_attention=True: the MLP, norms and embeddings move too). Set "
    "alps_train_non_attention=False to export an adapter, or save the merged checkpoint."
)


@dataclass(frozen=True)
class AdapterInfo:
    """What `save_adapter` wrote: the directory, per-module LoRA ranks, the rank vLLM needs, bytes on disk."""

    directory: str
    ranks: dict[str, int]
    uniform_rank: bool
    bytes_on_disk: int

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def vllm_max_lora_rank(self) -> int | None:
        """The smallest value of vLLM's ``--max-lora-rank`` that serves this adapter; None above vLLM's 512."""
        return next((r for r in VLLM_MAX_LORA_RANKS if r >= self.max_rank), None)

    def vllm_hint(self) -> str:
        """How to serve it with vLLM, in words: the flags, or why vLLM cannot."""
        if self.vllm_max_lora_rank is None:
            return f"largest rank {self.max_rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"
        return f"vLLM: --enable-lora --max-lora-rank {self.vllm_max_lora_rank}"


def lora_tensors(
    deltas: Mapping[str, torch.Tensor],
    layout: AttentionLayout,
    selection: HeadSelection,
    *,
    uniform_rank: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT LoRA tensors of trained deltas, and the rank of every module that has one.

    Args:
        deltas: a delta dict (`Restriction.trained_deltas`, a delta file): ``T.alps_delta`` float [n, in] rows
            (or [out, n] o_proj columns), ``T.alps_rows`` / ``T.alps_cols`` int64 [n], and bias deltas [n].
        layout: the model's `AttentionLayout` (names and sizes of the restricted tensors).
        selection: the heads the deltas were trained for.
        uniform_rank: pad every module to the largest rank.

    Returns:
        ({PEFT tensor name: float32 tensor}, {module name: rank}); names as `PeftModel.save_pretrained` writes them.
    """
    targets = {t.name: t for t in restricted_tensors(layout, selection, restrict_o_proj=True)}
    parsed = split_delta_state_dict(deltas)
    weights = {}
    for name, (delta, index, dim) in parsed.items():
        target = targets.get(name)
        if target is None:
            raise ValueError(f"Delta {name!r} names no q/k/v or o_proj tensor of this model: is it the right base?")
        if dim != target.dim:
            raise ValueError(f"Delta {name!r} indexes {'columns' if dim else 'rows'}, but {name} trains by the other.")
        check_delta(name, delta, index, dim, _tensor_shape(target, layout))
        if target.kind == "weight":
            weights[target.module] = (delta.to(torch.float32), index.to(torch.int64), dim, target.size)
    if not weights:
        raise ValueError("The deltas hold no trained q/k/v rows: there is nothing to export.")
    ranks = {module: int(index.numel()) for module, (_, index, _, _) in weights.items()}
    width = max(ranks.values())
    out: dict[str, torch.Tensor] = {}
    for module, (delta, index, dim, size) in weights.items():
        r = width if uniform_rank else ranks[module]
        n = int(index.numel())
        if dim == 0:  # rows: A = delta rows, B = selector of the output rows
            a = torch.zeros(r, delta.shape[1])
            a[:n] = delta
            b = torch.zeros(size, r)
            b[index, torch.arange(n)] = 1.0
        else:  # o_proj columns: A = selector of the input columns, B = delta columns
            a = torch.zeros(r, size)
            a[torch.arange(n), index] = 1.0
            b = torch.zeros(delta.shape[0], r)
            b[:, :n] = delta
        key = f"{PEFT_PREFIX}{module}"
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = a, b
    for name, (delta, index, _) in parsed.items():
        target = targets[name]
        if target.kind != "bias":
            continue
        if target.module not in weights:
            raise ValueError(f"Bias delta {name!r} has no weight delta in the same module.")
        bias = torch.zeros(target.size)
        bias[index.to(torch.int64)] = delta.to(torch.float32)
        out[f"{PEFT_PREFIX}{target.module}.lora_B.bias"] = bias
    return out, ranks


def _tensor_shape(target, layout: AttentionLayout) -> tuple[int, ...]:
    """The full shape of a restricted tensor: a bias [size], a q/k/v weight [size, d], o_proj [d, size]."""
    if target.kind == "bias":
        return (target.size,)
    return (target.size, layout.hidden_size) if target.dim == 0 else (layout.hidden_size, target.size)


def lora_config(ranks: Mapping[str, int], *, base_model: str, uniform_rank: bool, lora_bias: bool):
    """The `peft.LoraConfig` of `lora_tensors`' output: exact module names, scaling 1 everywhere."""
    from peft import LoraConfig

    width = max(ranks.values())
    patterns = {} if uniform_rank else {m: r for m, r in ranks.items() if r != width}
    return LoraConfig(
        r=width,
        lora_alpha=width,
        rank_pattern=dict(patterns),
        alpha_pattern=dict(patterns),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        bias="none",
        lora_bias=lora_bias,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )


def save_adapter(
    deltas: Mapping[str, torch.Tensor],
    layout: AttentionLayout,
    selection: HeadSelection,
    directory: str | os.PathLike,
    *,
    base_model: str,
    uniform_rank: bool = False,
    o_proj_has_bias: bool = False,
    replace_any: bool = False,
) -> AdapterInfo:
    """Write trained deltas as a PEFT LoRA adapter directory (see the module docstring).

    Args:
        deltas, layout, selection, uniform_rank: as in `lora_tensors`.
        directory: the adapter directory. Written atomically (`atomic_directory`): built in a hidden sibling
            directory and renamed into place, so a kill or a failed write leaves the previous adapter or nothing.
            An existing directory is replaced as a whole, and only when it is an earlier adapter (holds
            adapter_config.json) or empty, unless `replace_any`.
        base_model: ``base_model_name_or_path`` of the adapter: the base it applies to (a 4-bit base's name
            gives a QLoRA-style adapter over that base).
        o_proj_has_bias: whether the model's o_proj has a bias (only matters with bias deltas and o_proj columns).
        replace_any: replace whatever `directory` holds (for a directory the caller owns, e.g. a run's adapter/).
    """
    from safetensors.torch import save_file

    tensors, ranks = lora_tensors(deltas, layout, selection, uniform_rank=uniform_rank)
    lora_bias = any(k.endswith(".lora_B.bias") for k in tensors)
    o_modules = {lp.o_module for lp in layout.layers}
    if lora_bias and not o_proj_has_bias and o_modules & set(ranks):
        raise ValueError(
            "The deltas hold q/k/v bias rows and o_proj columns, but o_proj has no bias: PEFT's lora_bias (where the "
            "bias rows go) is one switch for every module and cannot merge into a bias-free o_proj. Train without "
            "alps_restrict_o_proj to export this model as an adapter."
        )
    if lora_bias:  # every module of a lora_bias adapter has a lora_B.bias; o_proj's adds nothing
        for module in ranks:
            key = f"{PEFT_PREFIX}{module}.lora_B"
            tensors.setdefault(f"{key}.bias", torch.zeros(tensors[f"{key}.weight"].shape[0]))
    directory = os.fspath(directory)
    config = lora_config(ranks, base_model=base_model, uniform_rank=uniform_rank, lora_bias=lora_bias)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    replaceable = None if replace_any else _is_adapter_dir
    with atomic_directory(directory, replaceable=replaceable, what="PEFT adapter") as temp:
        config.save_pretrained(temp)
        save_file(tensors, os.path.join(temp, ADAPTER_WEIGHTS), {"format": "pt"})
        selection.save(os.path.join(temp, ADAPTER_HEADS))
        size = sum(os.path.getsize(os.path.join(temp, f)) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    return AdapterInfo(directory, dict(ranks), uniform_rank, size)


def _is_adapter_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def delta_file_to_adapter(
    base_path: str | os.PathLike,
    delta_path: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    uniform_rank: bool = False,
) -> AdapterInfo:
    """Convert an ``alps_delta.safetensors`` into a PEFT adapter over `base_path` (which only its config is read
    from: a full-precision or a quantized base directory, or a hub id in the local cache).

    ``base_model_name_or_path`` is `base_path` as given, so a hub id stays a hub id.
    """
    base_dir = _resolve_checkpoint_dir(base_path)
    check_output_outside_inputs(directory, base_dir, delta_path)
    config_path = os.path.join(base_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{base_dir!r} has no config.json: pass the base model's Hugging Face directory.")
    config = read_config(config_path)
    tensors, selection, metadata = load_delta_file(delta_path)
    if metadata.get("rest_trained") == "true":
        raise ValueError(
            f"{os.fspath(delta_path)!r} comes from a run that also trained the rest of the network "
            "(alps_train_non_attention=True: the MLP, norms and embeddings moved too), which a q/k/v adapter cannot "
            "hold. Use the merged checkpoint that run saved, or train with alps_train_non_attention=False."
        )
    selection.check_compatible(config)
    try:
        layout = AttentionLayout.from_config(config)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    o_bias = bool(config.get("attention_bias", False)) or bool(config.get("o_proj_bias", False))
    try:
        lora_tensors(tensors, layout, selection)  # checks every delta against the model before anything is written
    except ValueError as err:
        raise ValueError(f"{os.fspath(delta_path)!r}: {err}") from None
    return save_adapter(
        tensors,
        layout,
        selection,
        directory,
        base_model=os.fspath(base_path),
        uniform_rank=uniform_rank,
        o_proj_has_bias=o_bias,
    )
