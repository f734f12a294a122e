"""Checks that refuse bad ALPS combinations before training, and the one transformers check ALPS relaxes.

Used by `AlpsTrainerMixin` before and right after TRL builds the trainer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import transformers

from alps_trl.localization.anatomy import unwrap_model
from alps_trl.localization.selection import HeadSelection
from alps_trl.restriction import resolve_mode
from alps_trl.trainers.config import AlpsArguments


def model_init_kwargs(args: Any) -> dict:
    """`args.model_init_kwargs` as a dict (empty when unset)."""
    return dict(getattr(args, "model_init_kwargs", None) or {})


PEFT_MESSAGE = (
    "ALPS trains selected attention heads itself and cannot be combined with PEFT: drop peft_config (and pass an "
    "unwrapped model), or use the plain TRL trainer for LoRA."
)


def refuse_before_init(model: Any, args: Any, peft_config: Any, alps: AlpsArguments) -> None:
    """Errors that can be raised before TRL loads or wraps anything."""
    if peft_config is not None or hasattr(model, "peft_config"):
        raise ValueError(PEFT_MESSAGE)
    if isinstance(model, torch.nn.Module):
        resolve_mode(alps.alps_mode, model)
        if alps.alps_heads:
            HeadSelection.load(alps.alps_heads).check_compatible(unwrap_model(model))
    # Reentrant activation checkpointing needs no refusal: transformers' checkpointing enable (either name) makes the
    # embedding output require grad, so segments with frozen inputs still pass gradients to the selected rows
    # (tests/test_trainer_errors.py compares the gradients with and without it).


def refuse_deepspeed_mask(args: Any, mode: str) -> None:
    """Mask mode needs the real gradients in `param.grad`; DeepSpeed ZeRO keeps them in its own partitions."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and mode == "mask":
        raise ValueError(
            f"alps_mode='mask' does not work under DeepSpeed (ZeRO stage {getattr(plugin, 'zero_stage', '?')}): "
            "DeepSpeed moves and partitions gradients where ALPS cannot zero frozen rows. Use alps_mode='delta', "
            "or train with DDP / FSDP2."
        )


# Optimizers whose update of a row does not depend on that row's gradient alone, or that step before ALPS masks:
# GaLore/APOLLO project gradients to low rank (rows mix) and build their own groups (decay reaches frozen rows);
# LOMO/AdaLOMO update the weights inside backward; torch.optim.ASGD shrinks every weight by its `lambd` term.
_ROW_MIXING_OPTIMIZERS = ("galore", "apollo", "lomo")
_ROW_MIXING_OPTIMIZER_CLASSES = ("ASGD",)


def refuse_mask_optimizer(args: Any, mode: str, optimizer_cls: type | None = None) -> None:
    """Refuse, in mask mode, an optimizer that would move the frozen rows.

    Args:
        args: the training arguments (``args.optim`` is checked against `_ROW_MIXING_OPTIMIZERS`).
        mode: the resolved restriction mode; only "mask" is checked.
        optimizer_cls: the class of the trainer's ``optimizer_cls_and_kwargs``, if any.
    """
    if mode != "mask":
        return
    optim = str(getattr(getattr(args, "optim", ""), "value", getattr(args, "optim", "")))
    if optimizer_cls is not None:
        optim = optimizer_cls.__name__
        bad = optim in _ROW_MIXING_OPTIMIZER_CLASSES
    else:
        bad = any(key in optim for key in _ROW_MIXING_OPTIMIZERS)
    if bad:
        raise ValueError(
            f"The optimizer {optim!r} cannot keep the unselected heads' q/k/v rows frozen in alps_mode='mask': it "
            "mixes rows of a weight's update (GaLore/APOLLO low-rank projections, which also decay every row), "
            "updates weights inside backward before ALPS masks the gradients (LOMO), or shrinks weights whose "
            "gradient is zero (ASGD). Use an element-wise optimizer (adamw_torch, adamw_torch_fused, adafactor, sgd, "
            "8-bit AdamW, ...), or alps_mode='delta'."
        )


def refuse_fsdp1(trainer: Any) -> None:
    """FSDP1 flattens parameters into 1-D views on which no per-row gradient hook fires: only FSDP2 works."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is not None and getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "ALPS supports FSDP2 only: FSDP1 flattens parameters, so the rows of frozen heads cannot be masked. Set "
            "fsdp_version: 2 in the accelerate config (see recipes/accelerate_configs/fsdp2.yaml)."
        )


@contextlib.contextmanager
def accept_quantized_base():
    """Let `transformers.Trainer` accept a quantized base without a PEFT adapter.

    Trainer refuses "purely quantized" models because nothing in them could train; ALPS adds its
    trainable deltas right after TRL's constructor. The other checks of
    `transformers.trainer_utils.validate_quantization_for_training` (torch.compile, quantization
    methods that cannot train) still run.
    """
    module = transformers.trainer
    original = getattr(module, "validate_quantization_for_training", None)
    if original is None:
        yield
        return

    def validate(model):
        if getattr(model, "is_quantized", False) and not hasattr(model, "peft_config"):
            if hasattr(model, "_orig_mod"):
                raise ValueError("ALPS cannot train a torch.compile'd quantized model: pass the uncompiled model.")
            quantizer = getattr(model, "hf_quantizer", None)
            if quantizer is not None and not quantizer.is_trainable:
                method = quantizer.quantization_config.quant_method
                raise ValueError(f"Models quantized with {method} cannot be fine-tuned (transformers says so).")
            return None
        return original(model)

    module.validate_quantization_for_training = validate
    try:
        yield
    finally:
        module.validate_quantization_for_training = original
