"""Tasks, batches and measurements of the real-model experiment (`real_model.reproduce`) on SmolLM2-135M-Instruct.

- Task families: generated (user message, answer) pairs with a fixed answer format, in disjoint splits drawn from
  one seeded stream (`make_splits`). Every prompt is rendered with the tokenizer's chat template (SmolLM2 adds its
  default system prompt); the answer is followed by the end-of-turn token.
- `ChatBatch`: left-padded, so that every answer ends at the last position and the model computes the logits of the
  last `keep` positions only (``logits_to_keep``); the labels cover those positions (answer + end of turn).
  Rotary attention depends on relative positions only, so left padding changes nothing but the padding.
- `score_items`: exact match of greedy decoding per item, in one teacher-forced pass (greedy decoding yields the
  answer and stops if and only if the argmax at every answer position, given the right prefix, is the answer token),
  and the answer-token loss. `greedy_agreement` checks that equivalence against real `generate` on a subset.
- Forgetting: perplexity on the standard library's pydoc_data topics (documentation text no arm trains on); the
  knowledge questions are in `real_model.knowledge`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common.finetune_loop import batch_indices

Pair = tuple[str, str]

# Common short English words (lower case, distinct first two letters are not required).
WORDS = (
    "apple bread chair dog eagle fish grape house island jacket kite lemon mouse night ocean pencil queen river "
    "snake table umbrella violin window yogurt zebra anchor basket candle desert engine forest garden hammer "
    "iron jungle kettle ladder magnet needle orange planet rabbit saddle tiger valley wagon bottle cloud dragon "
    "feather guitar honey insect jelly kitten lion mirror nest onion parrot rocket silver tomato wheel badge "
    "cactus donkey falcon goat helmet igloo jar koala lamp melon noodle otter pepper quilt robot sugar turtle "
    "vase whale yacht bamboo cookie dolphin flute glove horse ink juice knife lizard monkey nut owl piano raven "
    "shoe train uncle wolf butter copper drum frog gold hat iceberg jeep kiwi leaf moon nurse oven pearl ring "
    "star tent van wall"
).split()


def addition(rng: random.Random) -> Pair:
    """Three-digit addition: 'What is 347 + 589? Reply with the number only.' -> '936'."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a} + {b}? Reply with the number only.", str(a + b)


def two_step(rng: random.Random) -> Pair:
    """Two-step arithmetic: 'What is 47 + 58 - 19? ...' -> '86' (two-digit operands)."""
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b} - {c}? Reply with the number only.", str(a + b - c)


def _words(rng: random.Random, n: int) -> list[str]:
    return rng.sample(WORDS, n)


def sort_words(rng: random.Random, n: int = 5) -> Pair:
    """Alphabetical order: 'Sort these words alphabetically: pear, dog, ...' -> 'dog, pear, ...'."""
    words = _words(rng, n)
    prompt = f"Sort these words alphabetically: {', '.join(words)}. Reply with the sorted words only."
    return prompt, ", ".join(sorted(words))


def reverse_words(rng: random.Random, n: int = 7) -> Pair:
    """Reverse the order of n words: 'Reverse the order of these words: a b c' -> 'c b a'."""
    words = _words(rng, n)
    prompt = f"Reverse the order of these words: {' '.join(words)}. Reply with the reversed words only."
    return prompt, " ".join(reversed(words))


# The held-out family: facts about people to one line of JSON, youngest first (`people_to_json`).
NAMES = (
    "Anna Ben Clara David Emma Frank Grace Henry Iris Jack Kate Leo Mia Noah Olga Paul Rosa Sam Tina Victor"
).split()
CITIES = "Paris Rome Berlin Madrid Vienna Oslo Dublin Lisbon Prague Athens Warsaw Tokyo Cairo Lima Quito".split()


def people_to_json(rng: random.Random, n: int = 3) -> Pair:
    """Structured output: n people (distinct names and ages) as facts in random order -> one line of JSON, a list of
    objects with the keys name, age, city, youngest first.

    'Write these facts as one line of JSON ...: Anna is 34 and lives in Oslo; Ben is 29 and lives in Rome; ...' ->
    '[{"name": "Ben", "age": 29, "city": "Rome"}, {"name": "Anna", "age": 34, "city": "Oslo"}, ...]'.
    """
    names, ages = rng.sample(NAMES, n), rng.sample(range(18, 91), n)
    people = [{"name": m, "age": a, "city": rng.choice(CITIES)} for m, a in zip(names, ages)]
    facts = "; ".join(f"{p['name']} is {p['age']} and lives in {p['city']}" for p in people)
    prompt = (
        "Write these facts as one line of JSON, a list of objects with the keys name, age and city, youngest "
        f"first: {facts}. Reply with the JSON only."
    )
    return prompt, json.dumps(sorted(people, key=lambda p: p["age"]))


MONTHS = "January February March April May June July August September October November December".split()


def dates_to_iso(rng: random.Random, n: int = 2) -> Pair:
    """Format conversion: n dates written out -> ISO 8601, comma-separated, in the given order.

    'Write these dates in ISO format (YYYY-MM-DD), separated by commas: 5 March 1990, 21 July 2003. ...' ->
    '1990-03-05, 2003-07-21' (days 1-28, years 1950-2030).
    """
    dates = [(rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)) for _ in range(n)]
    written = ", ".join(f"{d} {MONTHS[m - 1]} {y}" for y, m, d in dates)
    prompt = (
        f"Write these dates in ISO format (YYYY-MM-DD), separated by commas: {written}. Reply with the dates only."
    )
    return prompt, ", ".join(f"{y:04d}-{m:02d}-{d:02d}" for y, m, d in dates)


def times_to_24h(rng: random.Random, n: int = 2) -> Pair:
    """Format conversion: n clock times in 12-hour form -> 24-hour form (HH:MM), comma-separated, in order.

    'Write these times in 24-hour format (HH:MM), separated by commas: 3:45 PM, 9:05 AM. ...' -> '15:45, 09:05'.
    """
    times = [(rng.randint(1, 12), rng.randint(0, 59), rng.choice(("AM", "PM"))) for _ in range(n)]
    written = ", ".join(f"{h}:{m:02d} {p}" for h, m, p in times)
    prompt = f"Write these times in 24-hour format (HH:MM), separated by commas: {written}. Reply with the times only."
    return prompt, ", ".join(f"{h % 12 + (12 if p == 'PM' else 0):02d}:{m:02d}" for h, m, p in times)


GENERATORS: dict[str, Callable[[random.Random], Pair]] = {
    "addition": addition,
    "two_step": two_step,
    "sort5": sort_words,
    "sort4": lambda rng: sort_words(rng, 4),
    "reverse7": reverse_words,
    "reverse8": lambda rng: reverse_words(rng, 8),
    **{f"people{n}": (lambda rng, n=n: people_to_json(rng, n)) for n in range(2, 7)},
    **{f"dates{n}": (lambda rng, n=n: dates_to_iso(rng, n)) for n in range(1, 5)},
    **{f"times{n}": (lambda rng, n=n: times_to_24h(rng, n)) for n in range(1, 5)},
}


def make_splits(generator: Callable[[random.Random], Pair], sizes: dict[str, int], seed: int) -> dict[str, list]:
    """Disjoint splits (no prompt in two splits or twice in one) of the sizes given, in the order of `sizes`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list] = {}
    for name, size in sizes.items():
        items: list[Pair] = []
        attempts = 0
        while len(items) < size:
            attempts += 1
            if attempts > 100 * size + 1000:
                raise RuntimeError(f"Could not draw {size} distinct items for split {name!r}.")
            prompt, answer = generator(rng)
            if prompt not in seen:
                seen.add(prompt)
                items.append((prompt, answer))
        out[name] = items
    return out


# ---- tokenization and batches -------------------------------------------------------------------------------------


class ChatEncoder:
    """Token ids of chat-rendered prompts (cached) and of answers followed by the end-of-turn token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        self._prompts: dict[str, list[int]] = {}

    def prompt_ids(self, user: str) -> list[int]:
        if user not in self._prompts:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
            self._prompts[user] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._prompts[user]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.eos_id]


@dataclass
class ChatBatch:
    """input_ids / attention_mask: long [B, T], left-padded; labels: long [B, keep], the last `keep` positions
    (-100 outside answer + end of turn); forward_kwargs: {"logits_to_keep": keep} for the model call."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    forward_kwargs: dict[str, Any] = field(default_factory=dict)


def collate(encoder: ChatEncoder, pairs: Sequence[Pair], device: torch.device | str = "cpu") -> ChatBatch:
    prompts = [encoder.prompt_ids(p) for p, _ in pairs]
    answers = [encoder.answer_ids(a) for _, a in pairs]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    keep = max(len(a) for a in answers) + 1
    ids = torch.full((len(pairs), width), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        row = p + a
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
        labels[i, width - len(a) :] = torch.tensor(a)
    return ChatBatch(ids.to(device), mask.to(device), labels[:, width - keep :].to(device), {"logits_to_keep": keep})


def train_batches(
    encoder: ChatEncoder, pairs: Sequence[Pair], batch_size: int, steps: int, seed: int, device="cpu"
) -> list[ChatBatch]:
    """`steps` batches by shuffled epochs over `pairs` (the same for every arm of a seed)."""
    return [
        collate(encoder, [pairs[i] for i in take], device)
        for take in batch_indices(len(pairs), batch_size, steps, seed)
    ]


def as_model_inputs(batch: ChatBatch) -> dict[str, Any]:
    """The batch as keyword arguments of a model call (for `alps_trl.head_importance`)."""
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
        **batch.forward_kwargs,
    }


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---- measurements -------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_items(
    model: torch.nn.Module,
    encoder: ChatEncoder,
    pairs: Sequence[Pair],
    *,
    batch_size: int = 50,
    device="cpu",
    amp: torch.dtype | None = None,
) -> dict[str, Any]:
    """Per-item exact match of greedy decoding (teacher-forced) and the mean answer-token loss.

    Returns {"correct": list[bool] in item order, "exact_match": float in [0, 1], "loss": float (mean over answer
    tokens, end of turn included)}.
    """
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        b = collate(encoder, pairs[start : start + batch_size], device)
        with autocast(device, amp):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, **b.forward_kwargs).logits
        logits = logits[:, :-1].float()
        labels = b.labels[:, 1:]
        valid = labels != -100
        correct += (((logits.argmax(-1) == labels) | ~valid).all(-1)).tolist()
        loss_sum += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
        tokens += int(valid.sum())
    model.train(was_training)
    return {"correct": correct, "exact_match": sum(correct) / max(len(correct), 1), "loss": loss_sum / max(tokens, 1)}


def greedy_agreement(
    model, encoder: ChatEncoder, pairs: Sequence[Pair], correct: Sequence[bool], *, device="cpu", amp=None
) -> dict[str, Any]:
    """Real greedy decoding of `pairs` (recipes.generation_eval) against the teacher-forced `correct` flags."""
    from alps_trl.recipes.generation_eval import generate_answers

    max_new = max(len(encoder.answer_ids(a)) for _, a in pairs) + 2
    with autocast(device, amp):
        result = generate_answers(
            model,
            encoder.tokenizer,
            [[{"role": "user", "content": p}] for p, _ in pairs],
            [a for _, a in pairs],
            max_new_tokens=max_new,
            batch_size=50,
            disable_progress=True,
        )
    agree = sum(m == bool(c) for m, c in zip(result.matches, correct))
    return {"items": len(pairs), "agree": agree, "generated_exact_match": result.exact_match}


def pydoc_rows(tokenizer: Any, num_tokens: int, seq_len: int) -> torch.Tensor:
    """long [num_tokens // seq_len, seq_len]: the first tokens of the stdlib's pydoc topics, sorted by topic name."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    rows = num_tokens // seq_len
    if len(ids) < rows * seq_len:
        raise ValueError(f"pydoc_data holds {len(ids)} tokens, fewer than the {rows * seq_len} asked for.")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


@torch.no_grad()
def perplexity(model, rows: torch.Tensor, *, batch_size: int = 8, device="cpu", amp=None) -> float:
    """exp(mean next-token loss) over `rows` (long [N, T]); every row is one independent window."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start : start + batch_size].to(device)
        with autocast(device, amp):
            logits = model(input_ids=chunk).logits
        logits = logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="sum"))
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)
