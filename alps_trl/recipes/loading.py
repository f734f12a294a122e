"""Models and datasets of a recipe run: the model (or its name, for TRL to load), the tokenizer of a toy run, the
flash-attention fallback, the k-bit device map, GGUF conversion, and the formatted train/test splits."""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging

from alps_trl.recipes.data import format_dataset

logger = logging.get_logger(__name__)

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# Oldest GPU generation (CUDA compute capability) each flash-attention version runs on.
FLASH_ATTN_MIN_CAPABILITY = {"flash_attention_2": (8, 0), "flash_attention_3": (9, 0)}


def resolve_attn_implementation(requested: str | None) -> str | None:
    """`requested`, or "sdpa" (with one warning per process) if flash-attention is asked for but unusable here:
    no CUDA device, the package missing, or a GPU older than the version supports (FA2: Ampere, FA3: Hopper)."""
    if not requested or not requested.startswith("flash_attention"):
        return requested
    import torch
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = is_flash_attn_3_available() if requested == "flash_attention_3" else is_flash_attn_2_available()
    minimum = FLASH_ATTN_MIN_CAPABILITY.get(requested, (8, 0))
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif not available:
        reason = "the flash-attn package is not installed; `pip install flash-attn --no-build-isolation` adds it"
    elif tuple(torch.cuda.get_device_capability()) < minimum:
        major, minor = torch.cuda.get_device_capability()
        reason = (
            f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}, and {requested} needs "
            f"{minimum[0]}.{minimum[1]} or newer"
        )
    else:
        return requested
    logger.warning_once(f"attn_implementation={requested!r} is unavailable ({reason}); using 'sdpa' instead.")
    return "sdpa"


def kbit_device_map() -> dict[str, Any] | str:
    """Device map for a bitsandbytes-quantized base: the whole model on this process's GPU (or the CPU)."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        return {"": PartialState().local_process_index}
    return "cpu"


def model_init_kwargs(model_args, training_args) -> dict[str, Any]:
    """`from_pretrained` keyword arguments from TRL's ModelConfig (as TRL's scripts build them)."""
    kwargs: dict[str, Any] = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=resolve_attn_implementation(model_args.attn_implementation),
        dtype=model_args.dtype,
    )
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def load_model(model_args, training_args, quantization_config):
    """What to give the trainer as `model`: the name (TRL loads it), or a quantized model loaded here.

    A quantized base is loaded by the script, on this process's device, because TRL casts every trainable
    parameter of a quantized model it loads itself to bf16 (meant for LoRA), which ALPS does not want.
    """
    if quantization_config is None:
        training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
        return model_args.model_name_or_path
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = model_init_kwargs(model_args, training_args)
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    kwargs.setdefault("device_map", kbit_device_map())
    training_args.model_init_kwargs = None
    return AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, quantization_config=quantization_config, **kwargs
    )


def build_demo_model(model_dir: str, seed: int, attn_implementation: str | None = "sdpa"):
    """Model and tokenizer of a toy run: a randomly initialised (seeded) fp32 model from `model_dir`/config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation=resolve_attn_implementation(attn_implementation) or "sdpa"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def resolve_recipe_model(name_or_path: str, gguf_file: str | None = None) -> str:
    """The path the trainer loads: `name_or_path`, or the converted directory of a GGUF file (`localization.gguf`).

    The main process converts first (once, cached by content); the other processes then find it done.
    """
    from accelerate import PartialState

    from alps_trl.localization.gguf import resolve_gguf_file, resolve_model_path

    if resolve_gguf_file(name_or_path, gguf_file) is None:
        return name_or_path
    with PartialState().main_process_first():
        return resolve_model_path(name_or_path, gguf_file)


def load_model_and_tokenizer(script_args, training_args, model_args) -> tuple[Any, Any]:
    """(model or name for TRL to load, tokenizer or None) for a recipe run; a GGUF model is converted first."""
    from trl import get_quantization_config

    if model_args.model_name_or_path is None:
        raise ValueError("No model: pass --model_name_or_path (a hub id, a checkpoint directory or a .gguf file).")
    if script_args.random_init:
        return build_demo_model(model_args.model_name_or_path, training_args.seed, model_args.attn_implementation)
    model_args.model_name_or_path = resolve_recipe_model(model_args.model_name_or_path, script_args.gguf_file)
    return load_model(model_args, training_args, get_quantization_config(model_args)), None


# ---- data ----------------------------------------------------------------------------------------------------------


def load_raw_dataset(path_or_id: str, config_name: str | None = None, streaming: bool = False):
    """`datasets.load_dataset` for a hub id, a local dataset directory, or one data file (split "train")."""
    from datasets import load_dataset

    ext = os.path.splitext(path_or_id)[1].lower()
    if os.path.isfile(path_or_id) and ext in DATA_FILE_BUILDERS:
        return load_dataset(DATA_FILE_BUILDERS[ext], data_files={"train": path_or_id}, streaming=streaming)
    return load_dataset(path_or_id, name=config_name, streaming=streaming)


def prepare_datasets(script_args, kind: str, want_eval: bool):
    """Load and format the train (and, if `want_eval`, test) split for "sft", "preference" or "grpo" training.

    Returns (train_dataset, eval_dataset or None). Missing splits and columns raise ValueError here,
    before any model is built.
    """
    name = script_args.dataset_name
    if not name:
        raise ValueError("No dataset: pass --dataset_name (a hub id, a local directory or a .jsonl file).")
    raw = load_raw_dataset(name, script_args.dataset_config, script_args.dataset_streaming)
    splits = list(raw.keys())
    if script_args.dataset_train_split not in raw:
        raise ValueError(
            f"Dataset {name!r} has no split {script_args.dataset_train_split!r} (it has {splits}); "
            "set --dataset_train_split."
        )

    def fmt(ds):
        if kind == "grpo":  # prompts (and the reward functions' columns) as they are: TRL's GRPO format
            if "prompt" not in (ds.column_names or []):
                raise ValueError(f"GRPO needs a 'prompt' column; {name!r} has {ds.column_names}.")
            return ds
        return format_dataset(
            ds, kind, fmt=script_args.dataset_format, template=script_args.prompt_template, dataset_name=name
        )

    train = fmt(raw[script_args.dataset_train_split])
    if not want_eval:
        return train, None
    if script_args.dataset_test_split not in raw:
        raise ValueError(
            f"Evaluation needs split {script_args.dataset_test_split!r}, but dataset {name!r} has {splits}. Set "
            "--dataset_test_split, or turn evaluation off (--eval_strategy no, --eval_before_and_after false)."
        )
    return train, fmt(raw[script_args.dataset_test_split])
