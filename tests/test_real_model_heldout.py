"""The held-out family of the real-model benchmark without a model: its generator, the pre-registered arms a run plans
on it, the candidate's heads, and the verdict the report computes from result files."""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict

import numpy as np
import pytest

from benchmarks.common.run_info import write_json
from benchmarks.common.selection_controls import random_from_upper_half
from benchmarks.real_model import ablations, heldout
from benchmarks.real_model.config import ARMS, GROWABLE, HELDOUT_ARMS, Sizes
from benchmarks.real_model.plan import plan
from benchmarks.real_model.reproduce import RealModelExperiment
from benchmarks.real_model.store import Store
from benchmarks.real_model.tasks import GENERATORS, make_splits


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_people_to_json_answers_hold_exactly_the_facts_youngest_first(n):
    rng = random.Random(n)
    for _ in range(50):
        prompt, answer = GENERATORS[f"people{n}"](rng)
        facts = re.findall(r"(\w+) is (\d+) and lives in (\w+)", prompt)
        parsed = json.loads(answer)
        assert len(facts) == len(parsed) == n and "\n" not in answer
        assert [list(p) for p in parsed] == [["name", "age", "city"]] * n
        assert [(p["name"], str(p["age"]), p["city"]) for p in parsed] == sorted(facts, key=lambda f: int(f[1]))
        assert len({p["age"] for p in parsed}) == n  # distinct ages: one right order


def test_times_to_24h_converts_every_time_in_order():
    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = GENERATORS["times2"](rng)
        written = re.findall(r"(\d+):(\d\d) (AM|PM)", prompt)
        converted = [(h % 12 + (12 if p == "PM" else 0), m) for h, m, p in ((int(h), m, p) for h, m, p in written)]
        assert answer == ", ".join(f"{h:02d}:{m}" for h, m in converted) and len(written) == 2
    assert GENERATORS["times2"](random.Random(3))[1].count(":") == 2


def test_held_out_splits_are_disjoint_at_the_run_sizes():
    s = Sizes()
    splits = make_splits(GENERATORS[s.families["times"]], {"A": 1000, "B": 1000, "val": 100, "test": 200}, 0)
    prompts = [p for items in splits.values() for p, _ in items]
    assert len(prompts) == len(set(prompts)) == 2300


def _paths(tmp_path, families) -> dict[str, set[int]]:
    store = Store(str(tmp_path))
    exp = RealModelExperiment(Sizes(), store, "cpu", print, ablations.AblationSizes())
    found: dict[str, set[int]] = {}
    for job in plan(exp, families, list(ARMS), None, (ablations.HEAD_CHOICE, *ablations.PARTS)):
        rel = os.path.relpath(job.path, store.root)
        if os.path.basename(rel).startswith("seed"):
            found.setdefault(os.path.dirname(rel), set()).add(int(os.path.basename(rel)[4:-5]))
    return found


def test_held_out_family_plans_only_the_preregistered_arms(tmp_path):
    found = _paths(tmp_path, ["arithmetic", "text", "times"])
    on_heldout = {k for k in found if "/times/" in f"/{k}/"}
    five, three = {0, 1, 2, 3, 4}, {0, 1, 2}
    expected = {
        "runs/times/alps": five,
        "runs/times/random": five,
        "runs/times/importance": five,
        "runs/times/random_upper": five,
        "runs/times/full": three,
        "runs/times/lora": three,
        "ablations/table1/times/alps_rest": five,
        "ablations/table1/times/random_rest": five,
        "ablations/table1/times/importance_rest": five,
    }
    assert {k: found[k] for k in on_heldout} == expected
    assert set(HELDOUT_ARMS) == {k.split("/")[-1] for k in expected if k.startswith("runs/")}
    # The candidate runs on the held-out family only; the first two families keep their arms and transfer parts.
    assert not any(k.endswith("random_upper") for k in found if "times" not in k)
    assert found["ablations/transfer/text/from_arithmetic"] == {0, 1}
    assert not any("from_times" in k for k in found)


def test_a_run_directory_may_gain_the_held_out_family_but_not_change_one(tmp_path):
    store = Store(str(tmp_path))
    old = asdict(Sizes())
    old["families"] = {"arithmetic": "addition", "text": "reverse8"}
    del old["heldout"]
    write_json(store.path("config.json"), old)
    store.check_config(asdict(Sizes()), growable=GROWABLE)
    assert store.load(store.path("config.json"))["families"]["times"] == Sizes().families["times"]
    changed = asdict(Sizes())
    changed["families"]["text"] = "reverse7"
    with pytest.raises(SystemExit, match="families"):
        store.check_config(changed, growable=GROWABLE)


def test_candidate_draws_from_the_more_important_half_by_seed():
    from alps_trl.localization.selection import HeadSelection, select_top_k

    scores = np.random.default_rng(0).random((30, 9)).astype(np.float32)
    scored = HeadSelection(30, 9, 3, select_top_k(scores, 27), scores=scores, metric="importance")
    median = np.median(scores)
    draws = [random_from_upper_half(scored, seed) for seed in (0, 1, 0)]
    for d in draws:
        assert len(d.heads) == 27 == len(set(d.heads))
        assert all(scores[layer, head] > median for layer, head in d.heads)
    assert draws[0].heads == draws[2].heads != draws[1].heads
    assert draws[0].heads != scored.heads  # a draw, not the top heads


def _run(seed: int, em: float, n: int = 20) -> dict:
    right = round(em * n)
    return {
        "seed": seed,
        "test": {"exact_match": right / n, "correct": [True] * right + [False] * (n - right)},
        "knowledge": {"accuracy": 0.5},
        "ppl": 20.0,
    }


def _write(store: Store, fam: str, name: str, ems: list[float]) -> None:
    for seed, em in enumerate(ems):
        if name.endswith("_rest"):
            write_json(store.ablation_run("table1", fam, name, seed), _run(seed, em))
        else:
            write_json(store.run(fam, name, seed), _run(seed, em))


def test_verdict_follows_the_preregistered_criteria_and_waits_for_every_seed(tmp_path):
    store = Store(str(tmp_path))
    meta = {"sizes": asdict(Sizes(families={"times": "times2"}))}
    _write(store, "times", "random_rest", [0.40, 0.50, 0.45, 0.55, 0.50])
    _write(store, "times", "alps_rest", [0.60, 0.70, 0.65, 0.75, 0.70])  # +20 at every seed: above 0
    _write(store, "times", "importance_rest", [0.60, 0.70, 0.65, 0.75, 0.70])  # ALPS ties it: not below 0
    _write(store, "times", "random", [0.50, 0.40, 0.60, 0.45, 0.55])
    _write(store, "times", "importance", [0.30, 0.20, 0.40, 0.25, 0.35])  # -20 at every seed: below 0
    _write(store, "times", "random_upper", [0.50, 0.45])  # two of five seeds
    d = heldout.collect(store, meta)
    verdicts = {r["comparison"]["key"]: r["verdict"] for r in d["heldout"]["times"]}
    assert verdicts == {"P1": "holds", "P2": "holds", "P3": "fails", "P4": "pending (2/5 seeds)"}
    rest, head_only = d["settings"]["rest"], d["settings"]["head-only"]
    assert rest["recommended"] == "Importance + rest"  # the cheapest source nothing beats
    assert head_only["recommended"] == "Random"
    lines = "\n".join(heldout.section(d, ["times"]))
    assert "| P1 | ALPS + rest − Random + rest | 5 | +20.0 [+20.0, +20.0] |" in lines
    assert "**fails**" in lines and "Random + rest on times" not in lines


def test_readme_verdict_and_recommendation_are_the_committed_results():
    """The README's held-out verdict table and the intervals its recommendation cites are what `heldout.collect`
    computes today from the committed result files (not copied by hand and left to drift)."""
    from recipe_helpers import REPO

    from benchmarks.real_model.tables import fmt_bootstrap, fmt_interval

    results = os.path.join(REPO, "benchmarks", "results", "real_model")
    with open(os.path.join(results, "config.json")) as f:
        d = heldout.collect(Store(results), {"sizes": json.load(f)})
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    for r in d["heldout"]["times"]:
        p, key = r["paired"], r["comparison"]["key"]
        row = next(line for line in readme.splitlines() if line.startswith(f"| {key} | "))
        assert f"| {fmt_interval(p['em'])} | {fmt_bootstrap(p)} |" in row, row
        assert f"| {r['verdict']}" in row.replace("**", ""), (row, r["verdict"])
    assert d["settings"]["rest"]["recommended"] == "Random + rest"
    assert d["settings"]["head-only"]["recommended"] == "Random"
    # Every "source − Random" interval of the recommendation table, family by family.
    table = readme[readme.index("| Setting | Use | Evidence") : readme.index("In both settings random heads")]
    for setting, source, prefix in [
        ("rest", "alps_rest", "ALPS + rest − Random + rest"),
        ("rest", "importance_rest", "Importance + rest − Random + rest"),
        ("head-only", "alps", "ALPS − Random"),
        ("head-only", "importance", "Importance − Random"),
    ]:
        row = next(r for r in d["settings"][setting]["rows"] if r["source"] == source)
        cited = [fmt_interval(row["families"][fam]["minus_random"]["em"]) for fam in ("arithmetic", "text", "times")]
        text = table[table.index(prefix) + len(prefix) :].replace("**", "")
        assert re.sub(r" \([^)]*\)", "", text).startswith(" " + "; ".join(cited)), (prefix, cited)
