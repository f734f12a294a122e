"""Deterministic synthetic instruction data for the miniature ALPS reproduction.

Everything is generated from integer seeds with `random.Random`, so two runs produce the same corpus.

- A "general" corpus: a mixture of small instruction tasks (copy, reverse, sort letters, count, capitalize, and
  look-up of facts from a fixed invented table) in the Alpaca prompt template. It plays the role of the broad
  pretraining/instruction data whose skills fine-tuning may erase (the paper's MMLU/ARC-C forgetting check).
- A downstream task: multi-digit addition (three-digit number plus 1-3), in two formats ("dataset A" and a
  differently phrased "dataset B") for the paper's transfer experiment (heads localized on one dataset of a task
  reused on another dataset of the same task).

`CharTokenizer` keeps sequences short: the two fixed pieces of the Alpaca template are single tokens, everything else
is one token per character. Examples are (prompt, answer) string pairs; the loss and the exact-match metric cover the
answer tokens and the end-of-sequence token.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from benchmarks.common.finetune_loop import batch_indices

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n"
)
ALPACA_RESPONSE = "\n\n### Response:\n"

PAD, EOS = "<pad>", "<eos>"
_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " :?+-=,.'"


def alpaca_prompt(instruction: str) -> str:
    """The Alpaca template (no-input variant) up to and including the response header."""
    return f"{ALPACA_HEADER}{instruction}{ALPACA_RESPONSE}"


class CharTokenizer:
    """Greedy tokenizer: the Alpaca header and response marker are one token each, the rest one token per character.

    Ids: 0 = pad, 1 = eos, 2 = header, 3 = response marker, then the characters of `_CHARS`.
    """

    def __init__(self) -> None:
        self.pieces = [PAD, EOS, ALPACA_HEADER, ALPACA_RESPONSE, *_CHARS]
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.pad_id, self.eos_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for special in (ALPACA_HEADER, ALPACA_RESPONSE):
                if text.startswith(special, i):
                    ids.append(self.index[special])
                    i += len(special)
                    break
            else:
                if text[i] not in self.index:
                    raise ValueError(f"Character {text[i]!r} is not in the synthetic vocabulary.")
                ids.append(self.index[text[i]])
                i += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids if i not in (self.pad_id, self.eos_id))


# ---- general tasks ------------------------------------------------------------------------------------------------


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 5)
    return f"copy: {w}", w


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 4)
    return f"reverse: {w}", w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 4)
    return f"sort: {w}", "".join(sorted(w))


def _count(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 1, 6)
    return f"count: {w}", str(len(w))


def _capitalize(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 5)
    return f"upper: {w}", w.upper()


def fact_table(num_facts: int = 16, seed: int = 1234) -> list[tuple[str, str]]:
    """A fixed table of invented (country, capital) facts: the 'knowledge' the general corpus teaches."""
    rng = random.Random(seed)
    seen, facts = set(), []
    while len(facts) < num_facts:
        country = _word(rng, 4, 6).capitalize()
        if country in seen:
            continue
        seen.add(country)
        facts.append((country, _word(rng, 3, 5).capitalize()))
    return facts


_FACTS = fact_table()


def _lookup(rng: random.Random) -> tuple[str, str]:
    country, capital = rng.choice(_FACTS)
    return f"capital of {country}?", capital


GENERAL_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "upper": _capitalize,
    "lookup": _lookup,
}

# ---- the downstream task: addition in two formats -----------------------------------------------------------------


def _operands(rng: random.Random) -> tuple[int, int]:
    # A three-digit number plus 1-3: carries run through up to three digits (399 + 2 = 401). Harder formats
    # (two-digit + two-digit) stayed near 10% exact match within this benchmark's step budget for every method.
    return rng.randint(100, 999), rng.randint(1, 3)


def _add_a(rng: random.Random) -> tuple[str, str]:
    a, b = _operands(rng)
    return f"add: {a}+{b}", str(a + b)


def _add_b(rng: random.Random) -> tuple[str, str]:
    # Same computation (a + b), phrased as solving a subtraction for its unknown.
    a, b = _operands(rng)
    return f"x-{b}={a}, x?", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {"add_a": _add_a, "add_b": _add_b}

# Disjoint seed streams per split, so a held-out example is never drawn from the training stream. For the
# synthetic string tasks collisions between splits are still possible by chance; `make_split` removes them.
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def make_split(
    generator: Callable[[random.Random], tuple[str, str]] | Sequence[Callable[[random.Random], tuple[str, str]]],
    split: str,
    size: int,
    seed: int = 0,
    exclude: set[str] | None = None,
) -> list[tuple[str, str]]:
    """`size` (instruction, answer) pairs from one generator or a round-robin mixture of several.

    Held-out splits drop any instruction in `exclude` (pass the training instructions) except for the fact look-up,
    whose questions are by design the memorized facts.
    """
    gens = [generator] if callable(generator) else list(generator)
    rng = random.Random(seed * 7919 + _SPLIT_OFFSET[split])
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < size:
        attempts += 1
        if attempts > 50 * size:
            raise RuntimeError("Could not draw enough distinct held-out examples; lower the split size.")
        gen = gens[len(out) % len(gens)]
        instruction, answer = gen(rng)
        if exclude and instruction in exclude and gen is not _lookup:
            continue
        out.append((instruction, answer))
    return out


@dataclass
class Batch:
    """input_ids / labels: long [B, T] (labels -100 outside the answer); attention_mask: long [B, T]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


def collate(tok: CharTokenizer, pairs: Sequence[tuple[str, str]]) -> Batch:
    """Right-padded batch whose labels cover the answer and the eos token only."""
    rows, labels = [], []
    for instruction, answer in pairs:
        prompt = tok.encode(alpaca_prompt(instruction))
        target = tok.encode(answer) + [tok.eos_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        mask[i, : len(r)] = 1
    return Batch(ids, lab, mask)


def batches(
    tok: CharTokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, steps: int, seed: int
) -> list[Batch]:
    """`steps` training batches drawn by shuffled epochs over `pairs` (deterministic in `seed`)."""
    return [collate(tok, [pairs[i] for i in take]) for take in batch_indices(len(pairs), batch_size, steps, seed)]
