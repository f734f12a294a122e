"""The real-model benchmark's bookkeeping without a model: which jobs a run plans and where their files go, the
config check that lets a run's directory resume with more seeds, and how the report picks each row's runs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

from benchmarks.common.run_info import write_json
from benchmarks.real_model import ablations, report
from benchmarks.real_model.config import ARMS, Sizes
from benchmarks.real_model.plan import list_jobs, plan
from benchmarks.real_model.reproduce import RealModelExperiment
from benchmarks.real_model.store import Store

FAMILIES = ["arithmetic", "text"]


def _table1_paths(tmp_path) -> dict[str, set[int]]:
    store = Store(str(tmp_path))
    exp = RealModelExperiment(Sizes(), store, "cpu", print, ablations.AblationSizes())
    found: dict[str, set[int]] = {}
    for job in plan(exp, FAMILIES, list(ARMS), None, ("table1",)):
        rel = os.path.relpath(job.path, store.root)
        if rel.endswith(".json") and "seed" in os.path.basename(rel):
            found.setdefault(os.path.dirname(rel), set()).add(int(os.path.basename(rel)[4:-5]))
    return found


def test_table1_many_seed_rows_run_five_seeds_and_full_keeps_the_head_choice_files(tmp_path):
    found = _table1_paths(tmp_path)
    for fam in FAMILIES:
        for name in ("alps_rest", "random_rest", "importance_rest"):
            assert found[f"ablations/table1/{fam}/{name}"] == {0, 1, 2, 3, 4}
        for name in ("lc_rest", "wo_attn", "lora128"):
            assert found[f"ablations/table1/{fam}/{name}"] == {0, 1}
        # Full: the head-choice arm's files at its seeds, its own files at the others.
        assert found[f"runs/{fam}/full"] == {0, 1, 2}
        assert found[f"ablations/table1/{fam}/full"] == {3, 4}


def test_list_jobs_names_only_missing_files(tmp_path):
    store = Store(str(tmp_path))
    exp = RealModelExperiment(Sizes(), store, "cpu", print, ablations.AblationSizes())
    jobs = plan(exp, ["text"], list(ARMS), [4], ("table1",))
    write_json(store.ablation_run("table1", "text", "alps_rest", 4), {"seed": 4})
    lines = list_jobs(jobs, store, Sizes(), "cpu")
    assert not any("alps_rest/seed4.json" in line for line in lines)
    assert any("ablations/table1/text/full/seed4.json" in line for line in lines)
    assert lines[-1].startswith(f"{len(jobs)} jobs planned, 1 already done, {len(jobs) - 1} to run")


def test_ablation_config_may_gain_or_grow_the_seed_lists_only(tmp_path):
    store = Store(str(tmp_path))
    name = os.path.join("ablations", "config.json")
    old = asdict(ablations.AblationSizes())
    for key in ablations.GROWABLE:
        del old[key]
    write_json(store.path(name), old)
    new = asdict(ablations.AblationSizes())

    store.check_config(new, name, growable=ablations.GROWABLE, write=False)  # a dry run: accepted, not recorded
    assert store.load(store.path(name)) == old
    store.check_config(new, name, growable=ablations.GROWABLE)
    assert store.load(store.path(name)) == json.loads(json.dumps(new))

    fewer = dict(new, table1_many_seeds=[0, 1])
    with pytest.raises(SystemExit, match="table1_many_seeds"):
        store.check_config(fewer, name, growable=ablations.GROWABLE)
    with pytest.raises(SystemExit, match="seeds"):
        store.check_config(dict(new, seeds=[0, 1, 2]), name, growable=ablations.GROWABLE)
    with pytest.raises(SystemExit, match="table1_many_seeds"):  # growable only where the caller says so
        store.check_config(dict(new, table1_many_seeds=[0, 1, 2, 3, 4, 5]), name)


def _run(seed: int, em: float, n: int = 10) -> dict:
    right = round(em * n)
    return {
        "seed": seed,
        "test": {"exact_match": em, "correct": [True] * right + [False] * (n - right)},
        "knowledge": {"accuracy": 0.5},
        "ppl": 20.0,
        "trainable": 1,
        "lr": 1e-4,
    }


def test_table1_rows_read_each_seed_from_one_place_and_pair_shared_seeds(tmp_path):
    store = Store(str(tmp_path))
    sizes, ab = Sizes(families={"text": "reverse8"}), ablations.AblationSizes(table1_families=["text"])
    for seed in (0, 1, 2):
        write_json(store.run("text", "full", seed), _run(seed, 0.5))
    write_json(store.run("text", "full", 3), _run(3, 0.0))  # a head-choice file beyond that arm's seeds: not Table 1's
    for seed in (3, 4):
        write_json(store.ablation_run("table1", "text", "full", seed), _run(seed, 0.9))
    write_json(store.ablation_run("table1", "text", "full", 1), _run(1, 0.0))  # shadowed by the head-choice file
    for seed in range(5):
        write_json(store.ablation_run("table1", "text", "random_rest", seed), _run(seed, 0.6))
    for seed in (0, 1):
        write_json(store.ablation_run("table1", "text", "lc_rest", seed), _run(seed, 0.7))
    meta = {
        "sizes": asdict(sizes),
        "ablation": asdict(ab),
        "arms": {k: asdict(v) for k, v in ARMS.items()},
    }
    rows = {r["label"]: r for r in report.collect_ablations(store, meta)["table1"]["families"]["text"]}

    full = rows["Full"]
    assert [(r["seed"], r["test"]["exact_match"]) for r in full["runs"]] == [
        (0, 0.5),
        (1, 0.5),
        (2, 0.5),
        (3, 0.9),
        (4, 0.9),
    ]
    assert full["seeds"] == [0, 1, 2, 3, 4] and full["paired"]["random_rest"]["seeds"] == [0, 1, 2, 3, 4]
    lc = rows["LC 10% + rest"]
    assert lc["seeds"] == [0, 1] and lc["paired"]["full"]["seeds"] == [0, 1]
    assert lc["paired"]["full"]["em"][0] == pytest.approx(0.2)
    assert rows["ALPS 10% + rest"]["runs"] == [] and rows["ALPS 10% + rest"]["paired"]["full"] is None
