"""Exact match of greedy generations on held-out prompts: what the recipes report before and after training.

A loss going down says little to a user; "the model now answers 87 of 100
held-out prompts exactly, and here are three of its answers before and after" does. The prompts and
reference answers come from an evaluation split in TRL's formats: prompt-completion (SFT) or preference
(DPO, where the reference is the chosen answer). Prompts may be plain strings or conversations (lists of
role/content messages, rendered with the tokenizer's chat template).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from alps_trl.localization.anatomy import unwrap_model


@dataclass
class GenerationResult:
    """Greedy generations for a list of prompts and their exact-match score against the references."""

    prompts: list[str]
    references: list[str]
    generations: list[str]
    matches: list[bool] = field(default_factory=list)
    rewards: dict[str, float] = field(default_factory=dict)  # GRPO: mean reward per reward function

    @property
    def exact_match(self) -> float:
        """Fraction of generations equal to their reference after stripping whitespace, in [0, 1]."""
        return sum(self.matches) / len(self.matches) if self.matches else 0.0


def _content(value: Any) -> str:
    """The text of a completion: a string, or the content of the last message of a conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    raise ValueError(f"Cannot read a reference answer from {value!r:.200}.")


# Where a split's reference answer is, by training kind: SFT, DPO, GRPO.
ANSWER_COLUMNS = ("completion", "chosen", "solution", "answer")


def prompts_and_references(dataset: Any, limit: int | None = None) -> tuple[list[Any], list[str]]:
    """(prompts, reference answers) of an evaluation split in TRL's prompt-completion or preference format.

    The reference is the ``completion`` (SFT), the ``chosen`` answer (DPO) or the ``solution`` (GRPO). Rows are
    taken in order, at most
    `limit`. Raises ValueError when the split has no prompt column or no completion/chosen column.
    """
    columns = list(getattr(dataset, "column_names", None) or [])
    answer = next((c for c in ANSWER_COLUMNS if c in columns), None)
    if "prompt" not in columns or answer is None:
        raise ValueError(
            f"Generation evaluation needs 'prompt' and one of {ANSWER_COLUMNS} columns; the evaluation split has "
            f"{columns}. Set --eval_generations 0 to skip it."
        )
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    rows = dataset.select(range(n))
    prompts = list(rows["prompt"])
    references = [_content(a).strip() for a in rows[answer]]
    return prompts, references


def render_prompt(tokenizer: Any, prompt: Any) -> str:
    """A prompt as the text the model continues: chat-template rendering with the generation prompt for messages."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


@contextlib.contextmanager
def _generation_mode(model: torch.nn.Module, tokenizer: Any) -> Iterator[None]:
    """Eval mode, left padding (decoder-only batches) and no cache-disabling flags, restored on exit."""
    was_training, side = model.training, tokenizer.padding_side
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    tokenizer.padding_side = "left"
    if use_cache is not None:
        model.config.use_cache = True
    try:
        yield
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
        if use_cache is not None:
            model.config.use_cache = use_cache


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    references: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    desc: str = "Generating",
    disable_progress: bool = False,
) -> GenerationResult:
    """Greedy-decode every prompt (batched, left-padded) and score exact match against `references`.

    Args:
        model: a causal LM (possibly wrapped); runs on its own device under no_grad.
        tokenizer: its tokenizer; needs a pad token (the eos token is used when it has none).
        prompts: strings, or conversations rendered with the chat template.
        references: the expected answers, one per prompt.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references.")
    inner = unwrap_model(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [render_prompt(tokenizer, p) for p in prompts]
    device = next(inner.parameters()).device
    generations: list[str] = []
    with _generation_mode(inner, tokenizer), torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=disable_progress):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            out = inner.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            generations += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    generations = [g.strip() for g in generations]
    plain = [p if isinstance(p, str) else _content(p) for p in prompts]
    matches = [g == r.strip() for g, r in zip(generations, references)]
    return GenerationResult(plain, list(references), generations, matches)


def comparison_lines(before: GenerationResult | None, after: GenerationResult, examples: int = 3) -> list[str]:
    """'Exact match on N held-out prompts: before X% -> after Y%' and `examples` prompts with both answers."""
    n = len(after.matches)
    head = f"Exact match on {n} held-out prompts (greedy): "
    head += f"before {100 * before.exact_match:.1f}% -> after " if before is not None else ""
    lines = [head + f"{100 * after.exact_match:.1f}%"]
    if after.rewards:
        for name, value in after.rewards.items():
            was = f"before {before.rewards[name]:.3f} -> after " if before is not None and before.rewards else ""
            lines.append(f"Mean reward {name} on the same prompts (greedy): {was}{value:.3f}")
    for i in range(min(examples, n)):
        lines.append(f"  prompt:   {after.prompts[i]!r}")
        if before is not None:
            lines.append(f"  before:   {before.generations[i]!r}")
        lines.append(f"  after:    {after.generations[i]!r}")
        lines.append(f"  expected: {after.references[i]!r}")
    return lines
