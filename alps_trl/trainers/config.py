"""Training configuration: the `alps_*` options and the TRL configs that carry them.

`AlpsArguments` holds only the ALPS options. `AlpsSFTConfig` / `AlpsDPOConfig` / `AlpsGRPOConfig` combine them
with TRL's `SFTConfig` / `DPOConfig` / `GRPOConfig`, so `TrlParser`, `HfArgumentParser`, YAML recipes and CLI flags
(`--alps_ratio 0.1`) work unchanged. A plain TRL config given to an ALPS trainer gets the defaults below.

As in TRL's configs, a field with a fixed set of values lists it as `metadata["choices"]`: `--help` shows it, and
`validate_alps` checks every such field against that one list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig, GRPOConfig, SFTConfig

from alps_trl.localization.scoring import METRICS
from alps_trl.localization.selection import STRATEGIES, validate_ratio
from alps_trl.localization.weights import FETCH_MODES
from alps_trl.restriction import MODES
from alps_trl.trainers.private_api import CONFIG_SHIMS

# Fraction of the planned optimizer steps that the probe runs when `alps_probe_steps` is None: the paper's cheap
# task model is an attention-only fine-tune on about 10% of the data.
PROBE_FRACTION = 0.1
# Default importance budget: the probe's (10% of the planned steps x gradient accumulation micro-batches per
# process), capped so that a long run's pre-step stays a few minutes of forward/backward passes.
IMPORTANCE_MAX_BATCHES = 64
# The trainers' head scores: the weight distances of `alps_trl.localization.scoring`, or the data-driven importance.
TRAINER_METRICS = (*METRICS, "importance")


@dataclass
class AlpsArguments:
    """ALPS options: how heads are localized and how the update is restricted to them.

    Where the heads come from is the first applying entry of `alps_trl.trainers.head_sources.HEAD_SOURCES`.
    """

    alps_ratio: float = field(
        default=0.1,
        metadata={"help": "Fraction of all attention heads that train, in (0, 1]. The paper uses 0.1."},
    )
    alps_task_model: str | None = field(
        default=None,
        metadata={
            "help": "A model of the same architecture already tuned for the task (local dir, .gguf file or cached hub "
            "id; with alps_fetch='qkv' also a hub id that is not cached, of which only the q/k/v bytes are read). Its "
            "q/k/v weights are compared with the checkpoint the trained model was loaded from to score heads."
        },
    )
    alps_fetch: str | None = field(
        default=None,
        metadata={
            "help": "'qkv': alps_task_model may be a hub id that is not in the local cache; only its q/k/v rows are "
            "read, with HTTP range requests (HF_ENDPOINT, HF_TOKEN), and cached under $ALPS_TRL_CACHE (default "
            "~/.cache/alps_trl). None: nothing is downloaded.",
            "choices": list(FETCH_MODES),
        },
    )
    alps_task_revision: str | None = field(
        default=None,
        metadata={"help": "Branch, tag or commit of alps_task_model on the hub (None: main)."},
    )
    alps_heads: str | None = field(
        default=None,
        metadata={"help": "Path to a saved head selection (alps_heads.json) to reuse; skips localization."},
    )
    alps_metric: str = field(
        default="pad",
        metadata={
            "help": "Head score for alps_strategy top_k. 'pad' (Wasserstein-1) is the paper's; the weight distances "
            "compare the task model (or the probe's) with the base. 'importance' needs no task model: the absolute "
            "gradient of the training loss with respect to a gate on each head's output, summed over training "
            "batches (Michel et al. 2019).",
            "choices": list(TRAINER_METRICS),
        },
    )
    alps_strategy: str = field(
        default="top_k",
        metadata={
            "help": "Head selection: the top-scoring heads, or a random baseline that needs no scores.",
            "choices": list(STRATEGIES),
        },
    )
    alps_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature of the head distributions used by the score (> 0)."},
    )
    alps_seed: int = field(
        default=0,
        metadata={"help": "Seed of the random / layer_consistent selection strategies."},
    )
    alps_probe_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of the attention-only probe fine-tune that derives a task model when neither "
            "alps_task_model nor alps_heads is given (and alps_metric is not 'importance'). None: a tenth of the "
            "planned training steps (at least 1). "
            "0 disables the probe (then a task model or heads file is required)."
        },
    )
    alps_importance_batches: int | None = field(
        default=None,
        metadata={
            "help": "Training batches per process that alps_metric='importance' scores on (each process a different "
            f"share). None: a tenth of the planned training steps x gradient_accumulation_steps, at least 1, at most "
            f"{IMPORTANCE_MAX_BATCHES}."
        },
    )
    alps_mode: str = field(
        default="auto",
        metadata={
            "help": "How the update is restricted: 'mask' (zero gradient rows of unselected heads), 'delta' "
            "(frozen base + trainable per-head deltas; required for 4-bit bases) or 'auto' (delta for quantized "
            "bases, mask otherwise).",
            "choices": list(MODES),
        },
    )
    alps_train_non_attention: bool = field(
        default=True,
        metadata={
            "help": "Train everything outside the q/k/v projections (MLP, norms, embeddings, o_proj) as usual, "
            "as in the paper's main results. False freezes it: only the selected heads' q/k/v rows train."
        },
    )
    alps_restrict_o_proj: bool = field(
        default=False,
        metadata={"help": "Also restrict o_proj to the selected heads' input columns (not part of the paper)."},
    )
    alps_save_adapter: bool = field(
        default=False,
        metadata={
            "help": "Also save the trained heads as a PEFT LoRA adapter in output_dir/adapter (for PeftModel, "
            "transformers' load_adapter, vLLM's --enable-lora) when the model is saved. Head-only training only "
            "(alps_train_non_attention=False, or a 4-bit base)."
        },
    )
    alps_adapter_uniform_rank: bool = field(
        default=False,
        metadata={
            "help": "Give every module of the saved adapter the largest rank (zero-padded, the same update), for "
            "servers that take one LoRA rank (vLLM's --max-lora-rank). False: per-module ranks (rank_pattern)."
        },
    )
    alps_trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom code when reading the config of alps_task_model. Off by default."},
    )

    def __post_init__(self) -> None:
        # In AlpsSFTConfig(AlpsArguments, SFTConfig) the next __post_init__ is the TRL config's.
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.validate_alps()

    def validate_alps(self) -> None:
        """Check the `alps_*` values; raise ValueError naming the field and the accepted values."""
        try:
            self.alps_ratio = validate_ratio(self.alps_ratio)
        except ValueError as err:
            raise ValueError(f"alps_ratio: {err}") from None
        for f in dataclasses.fields(AlpsArguments):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            unset = value is None and f.default is None  # an optional choice left at None (alps_fetch: off)
            if choices is not None and not unset and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not known; choose one of {', '.join(map(str, choices))}.")
        if self.alps_metric == "importance" and self.alps_task_model:
            raise ValueError(
                "alps_metric='importance' scores heads on the training data and uses no task model, but "
                f"alps_task_model={self.alps_task_model!r} is set. Drop alps_task_model, or choose a weight distance "
                f"({', '.join(METRICS)}) to score against the task model."
            )
        if self.alps_importance_batches is not None and int(self.alps_importance_batches) < 1:
            raise ValueError(
                "alps_importance_batches must be >= 1 (or None for the default budget), "
                f"got {self.alps_importance_batches!r}."
            )
        if not float(self.alps_temperature) > 0:
            raise ValueError(f"alps_temperature must be > 0, got {self.alps_temperature!r}.")
        if self.alps_probe_steps is not None and int(self.alps_probe_steps) < 0:
            raise ValueError(
                "alps_probe_steps must be >= 0 (or None for 10% of the training steps), "
                f"got {self.alps_probe_steps!r}."
            )


@dataclass
class AlpsSFTConfig(AlpsArguments, *CONFIG_SHIMS, SFTConfig):
    """`trl.SFTConfig` plus the `alps_*` options of `AlpsArguments` (TRL's fields first: ``AlpsSFTConfig("out")``
    sets output_dir, as ``SFTConfig("out")`` does)."""


@dataclass
class AlpsDPOConfig(AlpsArguments, *CONFIG_SHIMS, DPOConfig):
    """`trl.DPOConfig` plus the `alps_*` options of `AlpsArguments` (TRL's fields first: ``AlpsDPOConfig("out")``
    sets output_dir, as ``DPOConfig("out")`` does)."""


@dataclass
class AlpsGRPOConfig(AlpsArguments, *CONFIG_SHIMS, GRPOConfig):
    """`trl.GRPOConfig` plus the `alps_*` options of `AlpsArguments` (TRL's fields first: ``AlpsGRPOConfig("out")``
    sets output_dir, as ``GRPOConfig("out")`` does)."""


def alps_arguments_of(args: Any) -> AlpsArguments:
    """The ALPS options of any training config: its own `alps_*` values, or the defaults for a plain TRL config."""
    if isinstance(args, AlpsArguments):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(AlpsArguments) if hasattr(args, f.name)}
    return AlpsArguments(**values)


def planned_probe_steps(alps: AlpsArguments, planned_training_steps: int) -> int:
    """Probe length in optimizer steps: `alps_probe_steps`, or 10% of the planned training steps (at least 1)."""
    if alps.alps_probe_steps is not None:
        return int(alps.alps_probe_steps)
    return _tenth_of(planned_training_steps)


def planned_importance_batches(alps: AlpsArguments, planned_training_steps: int, accumulation: int) -> int:
    """Batches per process that importance scores: `alps_importance_batches`, or the probe's default budget.

    Default: 10% of the planned optimizer steps (at least 1) x `accumulation` micro-batches, capped at
    `IMPORTANCE_MAX_BATCHES`.
    """
    if alps.alps_importance_batches is not None:
        return int(alps.alps_importance_batches)
    return min(IMPORTANCE_MAX_BATCHES, _tenth_of(planned_training_steps) * max(1, int(accumulation)))


def _tenth_of(planned_training_steps: int) -> int:
    import math

    return max(1, math.ceil(PROBE_FRACTION * max(1, int(planned_training_steps))))
