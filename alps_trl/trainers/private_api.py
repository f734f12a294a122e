"""Every private transformers / TRL / accelerate / torch API that alps_trl overrides, calls or patches, in one list,
and the shims for what differs between the supported versions.

Why each one is needed (no public extension point does the job) is in `PRIVATE_API`'s entries. pyproject.toml caps
transformers and trl below the next minor release that was not tested (`SUPPORTED`), and tests/test_private_api.py
checks each signature below against the installed packages, so an upgrade that moves one of them fails there,
loudly, before any trainer runs.

Where the supported versions differ in something alps_trl touches, one function at the end of this module handles
it; nothing else in the package looks at a version.

Replaced by public extension points (no longer touched): localization and the restriction's install run from the
constructor and `train()`; attaching after ``accelerator.prepare`` is the ``on_train_begin`` callback; decay of the
selected rows is the ``on_pre_optimizer_step`` callback; the optimizer's decay groups come from the public
`Trainer.get_decay_parameter_names`; gradient masking follows `Trainer.training_step`; the final save gathers the
deltas in the public `Trainer.save_model`, which every process calls.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The supported range of each package whose internals alps_trl touches: [floor, cap). pyproject.toml, the README's
# "Supported versions" table and .ci/compat (which installs the oldest and the newest pair) follow it, which
# tests/test_private_api.py checks. transformers 5.25 needs kernels>=0.19.1, which the build environment cannot
# install yet, so it is untested and stays outside the cap.
SUPPORTED: dict[str, tuple[str, str]] = {"trl": ("1.14", "1.17"), "transformers": ("5.22", "5.25")}
# The (trl, transformers) pairs .ci/compat installs exactly: the oldest and the newest supported.
COMPAT_PAIRS: tuple[tuple[str, str], ...] = (("1.14.2", "5.22.2"), ("1.16.0", "5.24.0"))


@dataclass(frozen=True)
class PrivateUse:
    """One private API: where it lives, how alps_trl uses it, why, and the parameters it is used with."""

    target: str  # "package.module:Object.attribute"
    use: str  # "override" | "call" | "patch" | "attribute"
    where: str  # the alps_trl module that touches it
    why: str
    parameters: tuple[str, ...] | None = None  # for callables: the parameter names relied on, in order


PRIVATE_API: tuple[PrivateUse, ...] = (
    PrivateUse(
        "transformers.trainer:Trainer._save",
        "override",
        "trainers.mixin",
        "delta mode writes base + deltas merged (and the delta file) under the standard file names; no public hook "
        "lets a trainer change the state dict that checkpoints and save_model write",
        ("self", "output_dir", "state_dict"),
    ),
    PrivateUse(
        "transformers.trainer:Trainer._load_from_checkpoint",
        "override",
        "trainers.mixin",
        "resuming delta mode loads the merged checkpoint as the original base plus its deltas",
        ("self", "resume_from_checkpoint", "model"),
    ),
    PrivateUse(
        "transformers.trainer:Trainer._load_best_model",
        "override",
        "trainers.mixin",
        "load_best_model_at_end in delta mode: the same base + deltas loading as a resume",
        ("self",),
    ),
    PrivateUse(
        "trl.trainer.dpo_trainer:DPOTrainer._precompute_ref_logps",
        "override",
        "trainers.dpo",
        "several processes and an in-memory dataset: TRL's file cache would live on rank 0 only; the log-probs are "
        "gathered in memory instead",
        ("self", "dataset", "name", "batch_size"),
    ),
    PrivateUse(
        "trl.trainer.dpo_trainer:DPOTrainer._precompute_engine",
        "attribute",
        "trainers.dpo",
        "the DeepSpeed engine TRL builds once for precomputing reference log-probs (reused as TRL does)",
    ),
    PrivateUse(
        "trl.generation.vllm_generation:VLLMGeneration._iter_named_params",
        "patch",
        "trainers.vllm_sync",
        "delta mode: vLLM must receive base + delta for the restricted q/k/v and no delta tensors; sync_weights "
        "has no hook for what it pushes",
        ("self",),
    ),
    PrivateUse(
        "trl.generation.vllm_generation:VLLMGeneration._weight_metadata",
        "attribute",
        "trainers.vllm_sync",
        "server mode announces each push's tensors from this cached list; a push of the changed q/k/v only must "
        "announce those (set before sync_weights, the full list kept for complete pushes)",
    ),
    PrivateUse(
        "trl.generation.vllm_generation:VLLMGeneration._fix_param_name_to_vllm",
        "call",
        "trainers.vllm_sync",
        "the names vLLM receives, to match the deltas to the pushed tensors",
        ("self", "name"),
    ),
    PrivateUse(
        "transformers.trainer:Trainer._prepare_inputs",
        "call",
        "trainers.probe",
        "the probe and importance scoring feed batches exactly as a training step does (device, dtype)",
        ("self", "inputs"),
    ),
    PrivateUse(
        "transformers.trainer:Trainer._remove_unused_columns",
        "call",
        "trainers.probe",
        "the probe's loader drops the columns the model does not take, as the training loader does",
        ("self", "dataset", "description"),
    ),
    PrivateUse(
        "transformers.trainer:Trainer._get_collator_with_removed_columns",
        "call",
        "trainers.probe",
        "the same for iterable datasets",
        ("self", "data_collator", "description"),
    ),
    PrivateUse(
        "trl.trainer.sft_trainer:SFTTrainer._metrics",
        "attribute",
        "trainers.probe",
        "the probe's compute_loss calls add to TRL's metric buffers; they are restored so logs show training only",
    ),
    PrivateUse(
        "trl.trainer.dpo_trainer:DPOTrainer._total_train_tokens",
        "attribute",
        "trainers.probe",
        "TRL's token counter (DPO, SFT), restored after the probe like the metric buffers",
    ),
    PrivateUse(
        "transformers.trainer:validate_quantization_for_training",
        "patch",
        "trainers.checks",
        "Trainer refuses a quantized model without a PEFT adapter; ALPS adds its own trainable deltas",
        ("model",),
    ),
    PrivateUse(
        "torch.distributed.tensor._utils:compute_local_shape_and_global_offset",
        "call",
        "restriction.rows",
        "which rows of a (possibly uneven) Shard(0) DTensor this process holds",
        ("global_shape", "mesh", "placements"),
    ),
    PrivateUse(
        "torch.distributed.tensor:DTensor._local_tensor",
        "attribute",
        "restriction.rows",
        "the local shard of a gradient or parameter, written in place (to_local() may return a copy)",
    ),
    PrivateUse(
        "torch._dynamo.eval_frame:OptimizedModule._orig_mod",
        "attribute",
        "trainers.checks",
        "recognizes a torch.compile'd quantized model, which ALPS refuses (unwrapping itself is accelerate's)",
    ),
    PrivateUse(
        "torch.ops.mkldnn:_is_mkldnn_bf16_supported",
        "call",
        "recipes.demo",
        "whether this CPU computes bf16 natively (the demo's autocast choice)",
    ),
)


# ---- differences between the supported versions --------------------------------------------------------------------
# transformers 5.23 renamed gradient checkpointing to activation checkpointing (the old names stay as deprecated
# aliases); 5.22 has the old names only. TRL 1.15 added `trl.trainer.utils.add_fused_lm_head`, which GRPO puts on the
# policy's forward; TRL 1.14 has no fused head.


def _has_training_argument(name: str) -> bool:
    from transformers import TrainingArguments

    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


@dataclass
class _ActivationCheckpointingNames:
    """transformers 5.22: accept the 5.23 names `activation_checkpointing(_kwargs)` in the ALPS configs (and so in
    recipes' YAML and CLI flags), as aliases of `gradient_checkpointing(_kwargs)`, as 5.23+ accept the old ones."""

    activation_checkpointing: bool | None = None
    activation_checkpointing_kwargs: dict[str, Any] | str | None = None

    def __post_init__(self):
        if self.activation_checkpointing is not None:
            self.gradient_checkpointing = self.activation_checkpointing
        if self.activation_checkpointing_kwargs is not None:
            self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
        super().__post_init__()
        self.activation_checkpointing = self.gradient_checkpointing
        self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs


# Bases the ALPS configs add before TRL's config: none where transformers has the new names.
CONFIG_SHIMS: tuple[type, ...] = (
    () if _has_training_argument("activation_checkpointing") else (_ActivationCheckpointingNames,)
)


def enable_activation_checkpointing(model: Any, kwargs: dict[str, Any] | None = None) -> None:
    """`model.activation_checkpointing_enable(kwargs)` (transformers >= 5.23), else `gradient_checkpointing_enable`."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)


def is_activation_checkpointing(model: Any) -> bool:
    """Whether activation checkpointing is on for `model` (either transformers name; False for a non-HF module)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def refresh_trl_forward_patches(copy: Any, *, temperature: float, cast_lm_head_to_fp32: bool) -> None:
    """Give a deep copy of a GRPO policy its own TRL forward patches.

    TRL's GRPO trainer replaces `lm_head.forward` (`cast_lm_head_to_fp32`) and, from TRL 1.15, the model's `forward`
    (fused LM head) by closures over the policy's modules, as instance attributes; `copy.deepcopy` keeps those
    closures, so the copy would compute with the training policy. They are dropped and made again for `copy`.
    """
    import torch

    copy.__dict__.pop("forward", None)
    head = copy.get_output_embeddings()
    if head is not None and head.__dict__.pop("forward", None) is not None:

        def fp32_forward(hidden_states: torch.Tensor) -> torch.Tensor:  # as TRL's cast_lm_head_to_fp32 does
            bias = None if head.bias is None else head.bias.to(torch.float32)
            return torch.nn.functional.linear(hidden_states.to(torch.float32), head.weight.to(torch.float32), bias)

        head.forward = fp32_forward
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:  # TRL 1.14: no fused head; GRPO computes log-probs from the logits
        return
    add_fused_lm_head(copy, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
