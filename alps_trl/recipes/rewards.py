"""Verifiable rewards for the GRPO recipe (TRL's reward-function signature: completions plus dataset columns).

Each takes ``completions`` (strings, or chat messages ``[{"role": "assistant", "content": ...}]``) and returns one
float per completion. `REWARDS` maps the names `recipes/grpo_alps.py --reward_funcs` accepts to the functions.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the content of the last message of a chat completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        return str(completion[-1].get("content", ""))
    return str(completion)


def exact_answer(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion, stripped, is exactly the solution (e.g. "37"), else 0.0."""
    return [float(completion_text(c).strip() == str(s).strip()) for c, s in zip(completions, solution, strict=True)]


def answer_correct(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the last number in the completion equals the solution ("2 + 3 = 5" and "5" both score for "5"),
    else 0.0: the answer a grader would extract, whatever the format."""
    scores = []
    for c, s in zip(completions, solution, strict=True):
        numbers = _NUMBER.findall(completion_text(c))
        scores.append(float(bool(numbers) and numbers[-1] == str(s).strip()))
    return scores


def answer_format(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 for a bare number (the format the prompt asks for); a reply that contains a number scores 0.5 divided
    by its number of words (so shorter replies score higher, and a group of replies always differs); else 0.0."""
    scores = []
    for c in completions:
        text = completion_text(c).strip()
        if _NUMBER.fullmatch(text):
            scores.append(1.0)
        elif _NUMBER.search(text):
            scores.append(0.5 / len(text.split()))
        else:
            scores.append(0.0)
    return scores


def boxed_answer(completions: list[Any], solution: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the last ``\\boxed{...}`` of the completion equals the solution (spaces ignored), else 0.0: the
    answer convention of math datasets such as trl-lib/DeepMath-103K."""
    scores = []
    for c, s in zip(completions, solution, strict=True):
        boxed = _last_boxed(completion_text(c))
        scores.append(float(boxed is not None and boxed.replace(" ", "") == str(s).replace(" ", "")))
    return scores


def boxed_format(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the completion ends its reasoning with a ``\\boxed{...}`` answer, else 0.0."""
    return [float(_last_boxed(completion_text(c)) is not None) for c in completions]


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


REWARDS = {
    "answer_correct": answer_correct,
    "exact_answer": exact_answer,
    "answer_format": answer_format,
    "boxed_answer": boxed_answer,
    "boxed_format": boxed_format,
}


def reward_functions(names: list[str]) -> list:
    """The reward functions named in `names` (a clear error names the known ones)."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"Unknown reward function(s) {unknown}; choose from {sorted(REWARDS)}.")
    return [REWARDS[n] for n in names]
