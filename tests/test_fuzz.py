"""Fuzzing the readers: mutated and truncated checkpoints, GGUF files, heads files, delta files and configs.

Each input goes through a public entry point (`alps-localize`, `alps-merge` with and without ``--to-peft``,
`open_pair` + `localize_heads`, `HeadSelection.load`) under a time and memory bound, and must give the correct
result or a one-line refusal naming the file (see tests/fuzz_harness.py). The counts per format are printed
(``-s`` shows them) and written to ``fuzz_counts.json`` in the test's tmp dir. The everyday run is small and
seeded; ``-m slow`` runs ten times as many inputs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from fuzz_harness import (
    Tally,
    copy_dir,
    flip_bytes,
    mutate_json,
    mutate_safetensors,
    run_api,
    run_cli,
    split_safetensors,
    truncate,
    write,
    write_gguf,
)

from alps_trl.localization.selection import HeadSelection
from alps_trl.testing import tiny_model

RATIO = 0.25
QKV = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkv"]


# ---- the unmutated files ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The real files the fuzzer mutates, and the results of the unmutated ones."""
    from restriction_helpers import selection_for

    from alps_trl.localization.localize import localize_heads
    from alps_trl.restriction import build_restriction

    root = tmp_path_factory.mktemp("fuzz")
    base, task = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in task.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    base.save_pretrained(root / "base")
    task.save_pretrained(root / "task")
    write_gguf(base, str(root / "base.gguf"))
    write_gguf(task, str(root / "task.gguf"))
    ref = localize_heads(str(root / "base"), str(root / "task"), ratio=RATIO)
    ref_gguf = localize_heads(str(root / "base.gguf"), str(root / "task.gguf"), ratio=RATIO)
    ref.save(root / "alps_heads.json")
    model = tiny_model("llama", seed=0)
    restriction = build_restriction(model, selection_for(model), "delta", train_non_attention=False)
    restriction.install(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for d in [m for m in model.modules() if type(m).__name__ == "HeadDelta"]:
            d.weight.copy_(torch.randn(d.weight.shape, generator=gen))
    restriction.save_delta(model, root / "alps_delta.safetensors", base_model="tiny")
    return {
        "root": str(root),
        "ref_heads": ref.heads,
        "ref_gguf_heads": ref_gguf.heads,
        "selection": ref,
    }


# ---- per-format drivers ---------------------------------------------------------------------------------------
def _heads_of(path: str) -> list[tuple[int, int]]:
    return [tuple(h) for h in json.load(open(path))["heads"]]


def _safetensors_oracle(path: str, config_dir: str, base: str):
    """What the bytes at `path` should give, read by the safetensors library: ("heads", heads), ("error", why),
    or None where the library refuses the file (then only the unmutated result is correct)."""
    from safetensors.torch import load_file

    from alps_trl.localization.localize import localize_heads
    from alps_trl.localization.weights import open_weight_source

    try:
        tensors = load_file(path)
    except Exception:  # noqa: BLE001
        return None
    try:
        src = open_weight_source(tensors, config=os.path.join(config_dir, "config.json"))
        return ("heads", localize_heads(base, src, ratio=RATIO).heads)
    except Exception as err:  # noqa: BLE001
        return ("error", f"{type(err).__name__}: {err}")


def _expect_heads(got, oracle, ref) -> str | None:
    if oracle is None:
        return None if got == ref else f"{got} != unmutated {ref}"
    if oracle[0] == "error":
        return f"succeeded where the bytes read by safetensors give {oracle[1][:200]}"
    return None if got == oracle[1] else f"{got} != {oracle[1]} (safetensors' reading)"


def fuzz_safetensors(corpus, rng: random.Random, n: int, tally: Tally) -> None:
    from alps_trl.cli.localize import main
    from alps_trl.localization.localize import localize_heads
    from alps_trl.localization.scoring import open_pair

    root = corpus["root"]
    base = os.path.join(root, "base")
    original = open(os.path.join(root, "task", "model.safetensors"), "rb").read()
    work = copy_dir(os.path.join(root, "task"), os.path.join(root, "st_work"))
    target = os.path.join(work, "model.safetensors")
    out = os.path.join(root, "st_heads.json")
    for i in range(n):
        data, label = mutate_safetensors(original, rng, QKV)
        write(target, data)
        oracle = _safetensors_oracle(target, work, base)
        paths = (target, work)
        if i % 2 == 0:
            if os.path.exists(out):
                os.remove(out)
            outcome = run_cli(
                main,
                [base, work, "-o", out, "-q", "--ratio", str(RATIO)],
                "alps-localize",
                paths,
                lambda oracle=oracle: _expect_heads(_heads_of(out), oracle, corpus["ref_heads"]),
            )
            tally.add("safetensors/alps-localize", label, outcome)
        else:

            def call():
                b, t = open_pair(base, work)
                return localize_heads(b, t, ratio=RATIO).heads

            outcome = run_api(call, paths, lambda got, oracle=oracle: _expect_heads(got, oracle, corpus["ref_heads"]))
            tally.add("safetensors/open_pair", label, outcome)


CONFIG_KEYS = {
    "num_attention_heads": [8, 4, 16, 6, 7],
    "num_key_value_heads": [2, 1, 4, 3, 8],
    "hidden_size": [64, 32, 128, 60],
    "head_dim": [8, 16, 4, 7],
    "num_hidden_layers": [2, 1, 3, 10**9],
    "model_type": ["llama", "mistral", "gpt2", "phi3"],
}


def fuzz_config(corpus, rng: random.Random, n: int, tally: Tally) -> None:
    from alps_trl.cli.localize import main

    root = corpus["root"]
    base = os.path.join(root, "base")
    work = copy_dir(os.path.join(root, "task"), os.path.join(root, "cfg_work"))
    target = os.path.join(work, "config.json")
    original = json.load(open(os.path.join(root, "task", "config.json")))
    out = os.path.join(root, "cfg_heads.json")
    for _ in range(n):
        if rng.random() < 0.1:
            raw, label = truncate(json.dumps(original).encode(), rng)
            write(target, raw)
        else:
            cfg, label = mutate_json(original, rng, CONFIG_KEYS)
            write(target, json.dumps(cfg))
        if os.path.exists(out):
            os.remove(out)

        def check():
            got = _heads_of(out)
            return None if got == corpus["ref_heads"] else f"{got} != unmutated {corpus['ref_heads']}"

        argv = [base, work, "-o", out, "-q", "--ratio", str(RATIO)]
        tally.add("config.json/alps-localize", label, run_cli(main, argv, "alps-localize", (target,), check))


HEADS_KEYS = {
    "num_layers": [2, 1, 3, 0],
    "num_heads": [8, 4, 16, 0],
    "num_kv_heads": [2, 1, 8, 3, 0],
    "heads": [[[0, 1]], [[0, -1]], [[5, 0]], [[0, 99]], [[0, 1, 2]], [[0]], [["0", "1"]], [[0.5, 1]], [[None, 1]], []],
    "scores": [None, [[0.0] * 8] * 2, [[0.0] * 8], [["x"] * 8] * 2, [[1e308 * 10] * 8] * 2],
    "fingerprint": ["0" * 16, None],
    "format_version": [1, 2, "1"],
    "format": ["alps_trl.head_selection", "other"],
    "head_dim": [8, 16, None],
    "hidden_size": [64, 32, None],
    "ratio": [0.25, -1, "x"],
    "provenance": [{}, [1, 2], "x", None],
}


def _heads_check(selection, layout):
    """A loaded selection must be in range of the model it was accepted for."""
    mask = selection.mask_array()
    if mask.shape != (layout.num_layers, layout.num_heads) or int(mask.sum()) != len(selection.heads):
        return f"mask of shape {mask.shape} for {len(selection.heads)} heads"
    selection.kv_mask_array()
    return None


def fuzz_heads(corpus, rng: random.Random, n: int, tally: Tally) -> None:
    from alps_trl.localization.weights import open_weight_source

    root = corpus["root"]
    layout = open_weight_source(os.path.join(root, "base")).layout
    original = json.load(open(os.path.join(root, "alps_heads.json")))
    target = os.path.join(root, "heads_work.json")
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            raw, label = truncate(json.dumps(original).encode(), rng)
        elif r < 0.3:
            raw, label = flip_bytes(json.dumps(original).encode(), rng)
        else:
            data, label = mutate_json(original, rng, HEADS_KEYS)
            if rng.random() < 0.5 and "fingerprint" in data:
                del data["fingerprint"]  # so that the edit is not caught by the fingerprint alone
                label += ", fingerprint dropped"
            raw = json.dumps(data).encode()
        write(target, raw)

        def call():
            sel = HeadSelection.load(target)
            sel.check_compatible(layout)
            return sel

        tally.add("alps_heads.json/load", label, run_api(call, (target,), lambda sel: _heads_check(sel, layout)))


def fuzz_gguf(corpus, rng: random.Random, n: int, tally: Tally) -> None:
    """Mutated task GGUF through alps-localize (GGUFStore); a success must read what upstream gguf reads."""
    import gguf

    from alps_trl.cli.localize import main

    root = corpus["root"]
    base = os.path.join(root, "base.gguf")
    original = open(os.path.join(root, "task.gguf"), "rb").read()
    data_offset = gguf.GGUFReader(os.path.join(root, "task.gguf")).data_offset
    target = os.path.join(root, "gguf_work.gguf")
    out = os.path.join(root, "gguf_heads.json")
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            data, label = truncate(original, rng)
        elif r < 0.85:
            data, label = flip_bytes(original, rng, 0, data_offset)
        else:
            data, label = flip_bytes(original, rng, data_offset, len(original))
        write(target, data)
        if os.path.exists(out):
            os.remove(out)
        argv = [base, target, "-o", out, "-q", "--ratio", str(RATIO)]
        outcome = run_cli(main, argv, "alps-localize", (target,), lambda: _gguf_check(target, base, _heads_of(out)))
        tally.add("gguf/alps-localize", label, outcome)


def _gguf_check(path: str, base: str, got) -> str | None:
    """Upstream gguf's reading of the accepted file, through a state-dict source, must give the same heads."""
    import gguf

    from alps_trl.localization.gguf import GGUFStore, unpermute_rows
    from alps_trl.localization.localize import localize_heads
    from alps_trl.localization.weights import open_weight_source

    config = GGUFStore(path).config
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[2] not in ("attn_q", "attn_k", "attn_v"):
            continue
        values = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
        values = values.reshape([int(x) for x in reversed(t.shape.tolist())])
        if parts[2] != "attn_v":
            heads = config["num_attention_heads"] if parts[2] == "attn_q" else config["num_key_value_heads"]
            values = unpermute_rows(values, heads)
        role = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj"}[parts[2]]
        tensors[f"model.layers.{parts[1]}.self_attn.{role}.{parts[3]}"] = torch.from_numpy(values.copy())
    expected = localize_heads(base, open_weight_source(tensors, config=config), ratio=RATIO).heads
    return None if got == expected else f"{got} != {expected} (upstream gguf's reading)"


def _merge_oracle(delta_path: str, base_file: str):
    from safetensors.torch import load_file

    from alps_trl.restriction.delta_checkpoint import merge_state_dict

    try:
        deltas = load_file(delta_path)
    except Exception:  # noqa: BLE001
        return None
    try:
        return ("tensors", merge_state_dict(load_file(base_file), deltas))
    except Exception as err:  # noqa: BLE001
        return ("error", f"{type(err).__name__}: {err}")


def fuzz_delta(corpus, rng: random.Random, n: int, tally: Tally) -> None:
    from safetensors.torch import load_file

    from alps_trl.cli.merge import main

    root = corpus["root"]
    base = os.path.join(root, "base")
    base_file = os.path.join(base, "model.safetensors")
    source = os.path.join(root, "alps_delta.safetensors")
    original = open(source, "rb").read()
    header, _ = split_safetensors(original)
    names = [k for k in header if k != "__metadata__"]
    reference = _merge_oracle(source, base_file)[1]
    target = os.path.join(root, "delta_work.safetensors")
    for i in range(n):
        data, label = mutate_safetensors(original, rng, names)
        write(target, data)
        out = os.path.join(root, f"merged_{i}")
        if i % 3 == 2:

            def check(out=out):
                loaded = load_file(os.path.join(out, "adapter_model.safetensors"))
                return None if loaded else "empty adapter"

            outcome = run_cli(main, [base, target, out, "--to-peft"], "alps-merge", (target,), check)
            tally.add("alps_delta/alps-merge --to-peft", label, outcome)
        else:
            oracle = _merge_oracle(target, base_file)

            def check(out=out, oracle=oracle):
                merged = load_file(os.path.join(out, "model.safetensors"))
                if oracle is not None and oracle[0] == "error":
                    return f"succeeded where the bytes read by safetensors give {oracle[1][:200]}"
                expected = reference if oracle is None else oracle[1]
                bad = [k for k in expected if not torch.equal(expected[k], merged.get(k, torch.empty(0)))]
                return f"tensors differ: {bad[:3]}" if bad else None

            outcome = run_cli(main, [base, target, out], "alps-merge", (target,), check)
            tally.add("alps_delta/alps-merge", label, outcome)
        shutil.rmtree(out, ignore_errors=True)


def run_all(corpus, seed: int, scale: int, tmp_path) -> Tally:
    tally = Tally()
    tracemalloc.start()
    try:
        fuzz_safetensors(corpus, random.Random(seed), 40 * scale, tally)
        fuzz_config(corpus, random.Random(seed + 1), 20 * scale, tally)
        fuzz_heads(corpus, random.Random(seed + 2), 40 * scale, tally)
        fuzz_gguf(corpus, random.Random(seed + 3), 30 * scale, tally)
        fuzz_delta(corpus, random.Random(seed + 4), 24 * scale, tally)
    finally:
        tracemalloc.stop()
    report = {"counts": tally.counts, "defects": tally.defects}
    (tmp_path / "fuzz_counts.json").write_text(json.dumps(report, indent=1))
    print(f"\nfuzz (seed {seed}, scale {scale}):\n{tally.table()}")
    for fmt, label, detail in tally.defects[:40]:
        print(f"DEFECT {fmt}: {label}: {detail}")
    return tally


def _assert_clean(tally: Tally) -> None:
    assert not tally.defects, "\n".join(f"{f}: {lbl}: {d}" for f, lbl, d in tally.defects[:20])


def test_fuzz_inputs_are_read_correctly_or_refused_in_one_line(corpus, tmp_path):
    _assert_clean(run_all(corpus, seed=0, scale=1, tmp_path=tmp_path))


@pytest.mark.slow
def test_fuzz_inputs_many(corpus, tmp_path):
    _assert_clean(run_all(corpus, seed=1000, scale=10, tmp_path=tmp_path))
