"""Dataset formatting (recipes.data): every paper dataset layout -> TRL's formats, on small in-code samples."""

import pytest
from datasets import Dataset

from alps_trl.recipes.data import (
    ALPACA_PROMPT_NO_INPUT,
    FORMATS,
    alpaca_prompt,
    check_columns,
    detect_format,
    format_dataset,
    format_example,
)

# One row per source dataset, with the columns (and extra columns) the real datasets have.
SAMPLES = {
    "alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5", "text": "ignored"},
    "codealpaca": {"instruction": "Reverse a list.", "input": "[1, 2]", "output": "x[::-1]"},
    "mathinstruct": {"instruction": "What is 6 * 7?", "output": "42", "source": "data/CoT/gsm_rft.json"},
    "magicoder": {"instruction": "Write hello world in C.", "response": 'puts("hi");'},
    "magicoder_oss": {"problem": "Sum a list.", "solution": "sum(xs)", "lang": "python", "seed": "..."},
    "camel_math": {"message_1": "Solve x + 1 = 2.", "message_2": "x = 1", "role_1": "Mathematician", "topic;": "t"},
    "ultrachat": {
        "prompt": "Hi there",
        "prompt_id": "abc",
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye!"},
        ],
    },
    "ultrafeedback": {
        "prompt": "Capital of France?",
        "prompt_id": "p1",
        "chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Rome."}],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    },
}
EXPECTED = {  # (instruction, input, response) as rendered by the Alpaca template
    "alpaca": ("Add 2 and 3.", "", "5"),
    "codealpaca": ("Reverse a list.", "[1, 2]", "x[::-1]"),
    "mathinstruct": ("What is 6 * 7?", "", "42"),
    "magicoder": ("Write hello world in C.", "", 'puts("hi");'),
    "magicoder_oss": ("Sum a list.", "", "sum(xs)"),
    "camel_math": ("Solve x + 1 = 2.", "", "x = 1"),
    "ultrachat": ("Hi there", "", "Hello!"),
}


def test_alpaca_template_matches_stanford_alpaca():
    assert alpaca_prompt("Do it.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo it.\n\n### Response:\n"
    )
    assert alpaca_prompt("Do it.", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write "
        "a response that appropriately completes the request.\n\n### Instruction:\nDo it.\n\n### Input:\nctx\n\n"
        "### Response:\n"
    )
    assert alpaca_prompt("Do it.", "  ") == ALPACA_PROMPT_NO_INPUT.format(instruction="Do it.")


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_sft_formats_render_prompt_completion(fmt):
    instruction, inp, response = EXPECTED[fmt]
    out = format_example(SAMPLES[fmt], fmt, "alpaca")
    assert out == {"prompt": alpaca_prompt(instruction, inp), "completion": response}


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_sft_formats_chat_template_is_conversational(fmt):
    out = format_example(SAMPLES[fmt], fmt, "chat")
    if fmt == "ultrachat":  # the whole multi-turn conversation is kept
        assert out == {"messages": SAMPLES["ultrachat"]["messages"]}
        return
    instruction, inp, response = EXPECTED[fmt]
    assert out["prompt"] == [{"role": "user", "content": instruction + (f"\n\n{inp}" if inp else "")}]
    assert out["completion"] == [{"role": "assistant", "content": response}]


def test_ultrafeedback_to_preference():
    out = format_example(SAMPLES["ultrafeedback"], "ultrafeedback", "alpaca")
    assert out == {"prompt": alpaca_prompt("Capital of France?"), "chosen": "Paris.", "rejected": "Rome."}
    chat = format_example(SAMPLES["ultrafeedback"], "ultrafeedback", "chat")
    assert chat["chosen"] == [{"role": "assistant", "content": "Paris."}]
    # Plain strings and a conversational prompt are read too.
    plain = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "A", "rejected": "B"}
    assert format_example(plain, "ultrafeedback") == {"prompt": alpaca_prompt("Q?"), "chosen": "A", "rejected": "B"}


@pytest.mark.parametrize(
    "columns,kind,expected",
    [
        (["instruction", "input", "output", "text"], "sft", "alpaca"),
        (["instruction", "output", "source"], "sft", "mathinstruct"),
        (["instruction", "response"], "sft", "magicoder"),
        (["problem", "solution", "lang"], "sft", "magicoder_oss"),
        (["message_1", "message_2", "role_1"], "sft", "camel_math"),
        (["prompt", "prompt_id", "messages"], "sft", "ultrachat"),
        (["prompt", "completion"], "sft", "trl"),
        (["text"], "sft", "trl"),
        (["prompt", "chosen", "rejected", "score_chosen"], "preference", "ultrafeedback"),
        (["chosen", "rejected"], "preference", "trl"),
    ],
)
def test_detect_format_by_columns(columns, kind, expected):
    assert detect_format(columns, kind) == expected


def test_detect_format_by_hub_id_wins_over_columns():
    cols = ["instruction", "input", "output"]
    assert detect_format(cols, "sft", "sahil2801/CodeAlpaca-20k") == "codealpaca"
    assert detect_format(["instruction", "output"], "sft", "TIGER-Lab/MathInstruct") == "mathinstruct"


def test_unknown_layout_names_the_columns():
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\].*--dataset_format"):
        detect_format(["question", "answer"], "sft", "my/data")


def test_missing_column_is_named():
    with pytest.raises(ValueError, match=r"column\(s\) \['response'\] missing.*'magicoder'"):
        check_columns(["instruction", "output"], "magicoder", "sft")
    with pytest.raises(ValueError, match="preference data, but this recipe trains on sft"):
        check_columns(["prompt", "chosen", "rejected"], "ultrafeedback", "sft")
    with pytest.raises(ValueError, match="dataset_format='trl' needs"):
        check_columns(["question"], "trl", "sft")
    with pytest.raises(ValueError, match="Unknown dataset format 'nope'"):
        check_columns(["a"], "nope", "sft")


def test_format_dataset_maps_and_drops_source_columns():
    ds = Dataset.from_list([SAMPLES["mathinstruct"], {**SAMPLES["mathinstruct"], "output": "43"}])
    out = format_dataset(ds, "sft")
    assert out.column_names == ["prompt", "completion"]
    assert out[1]["completion"] == "43"
    prefs = Dataset.from_list([SAMPLES["ultrafeedback"]])
    assert format_dataset(prefs, "preference").column_names == ["prompt", "chosen", "rejected"]
    trl_ready = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    assert format_dataset(trl_ready, "sft") is trl_ready


def test_format_dataset_checks_columns_before_mapping():
    ds = Dataset.from_list([{"instruction": "x", "output": "y"}])
    with pytest.raises(ValueError, match=r"\['response'\] missing"):
        format_dataset(ds, "sft", fmt="magicoder")


def test_every_format_has_a_sample():
    assert set(FORMATS) == set(SAMPLES)


def test_format_streaming_dataset():
    ds = Dataset.from_list([SAMPLES["camel_math"]]).to_iterable_dataset()
    (row,) = list(format_dataset(ds, "sft"))
    assert row == {"prompt": alpaca_prompt("Solve x + 1 = 2."), "completion": "x = 1"}
