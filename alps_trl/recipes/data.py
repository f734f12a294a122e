"""Dataset formatting for the ALPS recipes: the paper's datasets in the formats TRL's trainers expect.

Pure functions on single examples (dicts), plus `format_dataset` that maps them over a `datasets.Dataset`.
Nothing here downloads anything: the recipes call `datasets.load_dataset` with the user's hub id or path
and hand the result to `format_dataset`.

The paper formats every dataset with the Stanford Alpaca prompt template. Each source dataset is first
reduced to an `Example` (instruction, input, output) or a `Preference` (instruction, chosen, rejected);
a template then renders it as TRL's prompt-completion format (`{"prompt": str, "completion": str}`) or
preference format (`{"prompt": str, "chosen": str, "rejected": str}`). With template "chat" the same
records become conversational (lists of role/content messages) and the tokenizer's chat template applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


class Example(NamedTuple):
    """One supervised example: a task instruction, optional context, and the target response."""

    instruction: str
    input: str
    output: str


class Preference(NamedTuple):
    """One preference pair: an instruction and a preferred and a dispreferred response."""

    instruction: str
    chosen: str
    rejected: str


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for `instruction` (and `input` when non-empty), ending with '### Response:\\n'."""
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction.strip())


# ---- extraction: one function per source dataset ----------------------------------------------------------------


def _text(example: dict[str, Any], column: str) -> str:
    value = example[column]
    return "" if value is None else str(value)


def _first_exchange(messages: Sequence[dict[str, str]], source: str) -> tuple[str, str]:
    """The first user message and the assistant reply that follows it."""
    for i, msg in enumerate(messages[:-1]):
        if msg.get("role") == "user" and messages[i + 1].get("role") == "assistant":
            return msg["content"], messages[i + 1]["content"]
    raise ValueError(f"{source}: no user message followed by an assistant message in {list(messages)!r:.200}.")


def _last_assistant(messages: Sequence[dict[str, str]] | str, source: str) -> str:
    if isinstance(messages, str):
        return messages
    for msg in reversed(messages):
        if msg.get("role") == "assistant":
            return msg["content"]
    raise ValueError(f"{source}: no assistant message in {list(messages)!r:.200}.")


def extract_alpaca(example: dict[str, Any]) -> Example:
    """tatsu-lab/alpaca, sahil2801/CodeAlpaca-20k and the like: instruction, input, output."""
    return Example(_text(example, "instruction"), _text(example, "input"), _text(example, "output"))


def extract_mathinstruct(example: dict[str, Any]) -> Example:
    """TIGER-Lab/MathInstruct: instruction, output (the `source` column is ignored)."""
    return Example(_text(example, "instruction"), "", _text(example, "output"))


def extract_magicoder_evol(example: dict[str, Any]) -> Example:
    """ise-uiuc/Magicoder-Evol-Instruct-110K: instruction, response."""
    return Example(_text(example, "instruction"), "", _text(example, "response"))


def extract_magicoder_oss(example: dict[str, Any]) -> Example:
    """ise-uiuc/Magicoder-OSS-Instruct-75K: problem, solution."""
    return Example(_text(example, "problem"), "", _text(example, "solution"))


def extract_camel_math(example: dict[str, Any]) -> Example:
    """camel-ai/math: message_1 (the problem), message_2 (the solution)."""
    return Example(_text(example, "message_1"), "", _text(example, "message_2"))


def extract_ultrachat(example: dict[str, Any]) -> Example:
    """HuggingFaceH4/ultrachat_200k: the first user/assistant exchange of `messages` (Alpaca is single-turn)."""
    instruction, output = _first_exchange(example["messages"], "ultrachat example")
    return Example(instruction, "", output)


def extract_ultrafeedback(example: dict[str, Any]) -> Preference:
    """HuggingFaceH4/ultrafeedback_binarized: prompt, chosen, rejected (each a string or a message list)."""
    prompt = example["prompt"]
    if not isinstance(prompt, str):
        prompt = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    return Preference(
        prompt,
        _last_assistant(example["chosen"], "ultrafeedback chosen"),
        _last_assistant(example["rejected"], "ultrafeedback rejected"),
    )


@dataclass(frozen=True)
class DatasetFormat:
    """A source dataset layout: the columns it needs and how to reduce one row to an Example/Preference."""

    name: str
    kind: str  # "sft" | "preference"
    columns: tuple[str, ...]
    extract: Callable[[dict[str, Any]], Example | Preference]
    hub_ids: tuple[str, ...] = ()


# Detection tries these in order, so more specific layouts (more columns) come first.
FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in (
        DatasetFormat("alpaca", "sft", ("instruction", "input", "output"), extract_alpaca, ("tatsu-lab/alpaca",)),
        DatasetFormat(
            "codealpaca", "sft", ("instruction", "input", "output"), extract_alpaca, ("sahil2801/CodeAlpaca-20k",)
        ),
        DatasetFormat(
            "mathinstruct", "sft", ("instruction", "output"), extract_mathinstruct, ("TIGER-Lab/MathInstruct",)
        ),
        DatasetFormat(
            "magicoder",
            "sft",
            ("instruction", "response"),
            extract_magicoder_evol,
            ("ise-uiuc/Magicoder-Evol-Instruct-110K",),
        ),
        DatasetFormat(
            "magicoder_oss",
            "sft",
            ("problem", "solution"),
            extract_magicoder_oss,
            ("ise-uiuc/Magicoder-OSS-Instruct-75K",),
        ),
        DatasetFormat("camel_math", "sft", ("message_1", "message_2"), extract_camel_math, ("camel-ai/math",)),
        DatasetFormat("ultrachat", "sft", ("messages",), extract_ultrachat, ("HuggingFaceH4/ultrachat_200k",)),
        DatasetFormat(
            "ultrafeedback",
            "preference",
            ("prompt", "chosen", "rejected"),
            extract_ultrafeedback,
            ("HuggingFaceH4/ultrafeedback_binarized",),
        ),
    )
}
# Datasets already in a TRL format pass through untouched with dataset_format "trl".
TRL_LAYOUTS = {
    "sft": (("prompt", "completion"), ("messages",), ("text",)),
    "preference": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
}
FORMAT_CHOICES = ("auto", "trl", *FORMATS)


def render(record: Example | Preference, template: str = "alpaca") -> dict[str, Any]:
    """Render an Example as TRL prompt-completion, or a Preference as TRL preference data.

    template "alpaca": plain strings with the Alpaca prompt. template "chat": conversational messages
    (the Example's input, when present, is appended to the instruction after a blank line).
    """
    if template not in TEMPLATES:
        raise ValueError(f"Unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}.")
    if isinstance(record, Example):
        if template == "alpaca":
            return {"prompt": alpaca_prompt(record.instruction, record.input), "completion": record.output}
        content = record.instruction if not record.input.strip() else f"{record.instruction}\n\n{record.input}"
        return {
            "prompt": [{"role": "user", "content": content}],
            "completion": [{"role": "assistant", "content": record.output}],
        }
    if template == "alpaca":
        return {"prompt": alpaca_prompt(record.instruction), "chosen": record.chosen, "rejected": record.rejected}
    return {
        "prompt": [{"role": "user", "content": record.instruction}],
        "chosen": [{"role": "assistant", "content": record.chosen}],
        "rejected": [{"role": "assistant", "content": record.rejected}],
    }


def format_example(example: dict[str, Any], fmt: str, template: str = "alpaca") -> dict[str, Any]:
    """Convert one row of source dataset `fmt` to TRL's format with `template` (see `render`)."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown dataset format {fmt!r}; choose one of {', '.join(FORMAT_CHOICES)}.")
    if fmt == "ultrachat" and template == "chat":
        # The chat template can hold the whole multi-turn conversation; Alpaca only the first exchange.
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in example["messages"]]}
    return render(FORMATS[fmt].extract(example), template)


def detect_format(column_names: Sequence[str], kind: str, dataset_name: str | None = None) -> str:
    """Pick the format of a dataset from its name (known hub ids) or its columns.

    Returns a key of FORMATS, or "trl" when the columns already are a TRL layout for `kind`.
    Raises ValueError listing what each format needs when nothing matches.
    """
    cols = set(column_names)
    if dataset_name:
        for f in FORMATS.values():
            if f.kind == kind and any(dataset_name.rstrip("/").endswith(h) for h in f.hub_ids):
                return f.name
    for f in FORMATS.values():
        if f.kind == kind and cols.issuperset(f.columns):
            return f.name
    if any(cols.issuperset(layout) for layout in TRL_LAYOUTS[kind]):
        return "trl"
    raise ValueError(_no_format_message(sorted(cols), kind, dataset_name))


def _no_format_message(cols: list[str], kind: str, dataset_name: str | None) -> str:
    options = "; ".join(f"{f.name}: {', '.join(f.columns)}" for f in FORMATS.values() if f.kind == kind)
    trl = " or ".join("(" + ", ".join(layout) + ")" for layout in TRL_LAYOUTS[kind])
    return (
        f"Cannot tell the format of dataset {dataset_name or ''!s} with columns {cols}. Known {kind} formats and the "
        f"columns they need: {options}; or TRL's own layout {trl} with dataset_format='trl'. Rename the columns or "
        "set --dataset_format."
    )


def check_columns(column_names: Sequence[str], fmt: str, kind: str) -> None:
    """Raise ValueError naming every missing column if a dataset with `column_names` cannot be read as `fmt`."""
    cols = set(column_names)
    if fmt == "trl":
        if not any(cols.issuperset(layout) for layout in TRL_LAYOUTS[kind]):
            layouts = " or ".join("(" + ", ".join(layout) + ")" for layout in TRL_LAYOUTS[kind])
            raise ValueError(
                f"dataset_format='trl' needs the columns {layouts} for {kind} training; the dataset has "
                f"{sorted(cols)}."
            )
        return
    if fmt not in FORMATS:
        raise ValueError(f"Unknown dataset format {fmt!r}; choose one of {', '.join(FORMAT_CHOICES)}.")
    spec = FORMATS[fmt]
    if spec.kind != kind:
        raise ValueError(f"Dataset format {fmt!r} holds {spec.kind} data, but this recipe trains on {kind} data.")
    missing = [c for c in spec.columns if c not in cols]
    if missing:
        raise ValueError(
            f"Dataset column(s) {missing} missing: format {fmt!r} needs {list(spec.columns)}, the dataset has "
            f"{sorted(cols)}. Pick the right --dataset_format or rename the columns."
        )


def format_dataset(dataset, kind: str, *, fmt: str = "auto", template: str = "alpaca", dataset_name=None, **map_kw):
    """Convert a `datasets.Dataset` (or `IterableDataset`) to TRL's SFT ("sft") or preference ("preference") format.

    Checks the columns first (clear error before any mapping); with fmt "trl" returns the dataset as is.
    Extra keyword arguments go to `Dataset.map` (e.g. num_proc).
    """
    columns = dataset.column_names
    if columns is None:  # a streaming dataset whose features are unknown until the first row
        columns = list(next(iter(dataset)).keys())
    if fmt == "auto":
        fmt = detect_format(columns, kind, dataset_name)
    check_columns(columns, fmt, kind)
    if fmt == "trl":
        return dataset
    if hasattr(dataset, "__len__"):  # only map-style datasets show a progress bar
        map_kw.setdefault("desc", f"Formatting {fmt} with the {template} template")
    return dataset.map(format_example, fn_kwargs={"fmt": fmt, "template": template}, remove_columns=columns, **map_kw)
