"""The recipe scripts' own arguments and the checks that run on them before anything heavy.

`AlpsScriptArguments` (TRL's `ScriptArguments` fields plus data format, evaluation and GGUF options), the refusal
of unknown `alps_*` keys, whether a run is the built-in demo, `parse_recipe_args` (TRL's `--config` YAML plus CLI
overrides, demo defaults first) and the PEFT refusal. The rest of what the recipes share lives beside it:
`loading` (models and datasets), `demo` (the offline demo's defaults), `report` (the end-of-run summary).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from alps_trl.recipes.data import FORMAT_CHOICES, TEMPLATES
from alps_trl.recipes.demo import demo_defaults, demo_model_file

__all__ = [
    "AlpsScriptArguments",
    "check_alps_options",
    "is_demo_run",
    "parse_recipe_args",
    "check_no_peft",
    "check_adapter_export",
]


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


def check_adapter_export(training_args, model_args) -> None:
    """`alps_save_adapter` needs head-only training (or a quantized base, where only the deltas train): refuse the
    run before any data or model is loaded, with the trainer's reason."""
    quantized = getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False)
    if training_args.alps_save_adapter and training_args.alps_train_non_attention and not quantized:
        from alps_trl.restriction.peft_export import NON_ATTENTION_MESSAGE

        raise ValueError(NON_ATTENTION_MESSAGE)


def check_no_peft(model_args) -> None:
    if getattr(model_args, "use_peft", False):
        raise ValueError(
            "--use_peft is not supported by the ALPS recipes: ALPS restricts training to the selected heads itself. "
            "Drop use_peft (and the lora_* options), or use TRL's own scripts for LoRA."
        )
