"""The jobs of a `real_model.reproduce` run, in order of information, and running them: every job whose result file
is missing runs, one after the other, with progress and an ETA from measured job times."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.common.run_info import write_json
from benchmarks.real_model import ablations
from benchmarks.real_model.config import ARMS, NEEDS_TASK_MODEL, STAGES, SWEEP_ARM, Sizes, arms_on
from benchmarks.real_model.store import Store

if TYPE_CHECKING:
    from benchmarks.real_model.reproduce import RealModelExperiment


@dataclass
class Job:
    name: str
    path: str
    kind: str  # for the ETA: jobs of one kind take about as long
    run: Callable[[], dict]


def plan(
    exp: RealModelExperiment,
    families: list[str],
    arms: list[str],
    seeds: list[int] | None,
    parts: tuple[str, ...] = (ablations.HEAD_CHOICE, *ablations.PARTS),
) -> list[Job]:
    """Every job of the run in order of information, each once; dependencies (task model, lr sweep) come just
    before the first job that needs them. The head-choice part first, then the ablation parts (cheapest first),
    seed by seed; an ablation variant that is a head-choice arm is that arm's job at the seeds that arm runs."""
    st, s = exp.store, exp.sizes
    jobs: dict[str, Job] = {}

    def arm_seeds(arm: str | None) -> list[int]:
        if arm is None:
            return []
        return s.main_seeds if ARMS[arm].many_seeds else s.other_seeds

    def add(name: str, path: str, kind: str, run: Callable[[], dict]) -> None:
        jobs.setdefault(path, Job(name, path, kind, run))

    def base(fam: str) -> None:
        add(f"{fam}: base model", st.base(fam), "base", lambda: exp.base_job(fam))

    def task_model(fam: str) -> None:
        add(
            f"{fam}: task model (full fine-tune on A)",
            st.task_model(fam),
            "task_model",
            lambda: exp.task_model_job(fam),
        )

    def sweep(fam: str, lr_family: str) -> None:
        arm = SWEEP_ARM[lr_family]
        for lr in s.lr_grid[lr_family]:
            name = f"{fam}: {lr_family} lr sweep ({arm}, seed 0, lr {lr:g})"
            add(
                name,
                st.sweep(fam, lr_family, lr),
                f"train:{lr_family}",
                lambda f=fam, a=arm, r=lr: exp.run_arm(f, a, 0, r, True),
            )

    def run(fam: str, arm: str, seed: int) -> None:
        lr_family = ARMS[arm].lr_family
        if arm in NEEDS_TASK_MODEL:
            task_model(fam)
        sweep(fam, lr_family)
        name, path = f"{fam}: {arm} seed {seed}", st.run(fam, arm, seed)
        if seed == 0 and SWEEP_ARM[lr_family] == arm:
            add(name, path, "copy", lambda: exp.from_sweep(fam, lr_family))
        else:
            add(
                name,
                path,
                f"train:{lr_family}",
                lambda: exp.run_arm(fam, arm, seed, exp.chosen_lr(fam, lr_family)),
            )

    def run_variant(fam: str, v: ablations.Variant, seed: int) -> None:
        if ablations.reused(v, seed, arm_seeds(v.reuse)):
            return run(fam, v.reuse, seed)
        if v.heads == "alps":
            task_model(v.heads_from or fam)
        if v.part == "metric":
            add(
                f"{fam}: metric part, task model retrained and scored by every metric",
                st.metric_task_model(fam),
                "task_model",
                lambda: exp.metric_selections_job(fam),
            )
        kind = "train:full" if v.rest_trains else f"train:{v.lr_family}"
        name, path = f"{fam}: {v.part} {v.label} seed {seed}", st.ablation_run(v.part, fam, v.name, seed)
        if v.lr_family not in exp.ablation.lr_grid:
            sweep(fam, v.lr_family)
            return add(name, path, kind, lambda: exp.run_variant(fam, v, seed))
        picker = ablations.sweeper(v)
        for lr in exp.ablation.lr_grid[v.lr_family]:  # the family's own sweep, at seed 0
            point = f"{fam}: {v.lr_family} lr sweep ({picker.label}, seed 0, lr {lr:g})"
            add(point, st.sweep(fam, v.lr_family, lr), kind, lambda r=lr: exp.run_variant(fam, picker, 0, r))
        if seed == 0 and picker == v:
            return add(name, path, "copy", lambda: {"part": v.part, **exp.from_sweep(fam, v.lr_family)})
        add(name, path, kind, lambda: exp.run_variant(fam, v, seed))

    add("base: knowledge questions and perplexity", st.knowledge(), "knowledge", exp.knowledge_job)
    if ablations.HEAD_CHOICE in parts:
        for stage in (*STAGES, ("full", "lora")):
            for fam in families:
                base(fam)
                for seed in sorted(set(s.main_seeds) | set(s.other_seeds)):  # seed by seed: pairs complete early
                    for arm in (a for a in stage if a in arms_on(fam, s.heldout, arms)):
                        if seed in arm_seeds(arm):
                            if seeds is None or seed in seeds:
                                run(fam, arm, seed)
    # Cheapest part first, so that whole tables complete early; the references each table shows come along.
    # Table 1 shows the head-only ALPS and Random arms, and Full (the head-choice arm's files where Full is not one of
    # the family's Table 1 variants: `AblationSizes.table1_only`).
    references = {
        "ratio": ("random",),
        "metric": ("random",),
        "transfer": ("alps", "random"),
        "table1": ("alps", "random"),
    }
    for part in ("transfer", "metric", "ratio", "table1"):
        if part not in parts:
            continue
        for seed in (x for x in ablations.all_seeds(exp.ablation) if seeds is None or x in seeds):
            for fam in families:
                every = ablations.variants(part, fam, families, exp.ablation, s.ratio)
                found = [v for v in every if seed in ablations.seeds_of(v, exp.ablation)]
                if not found:
                    continue
                base(fam)
                refs = [arm for arm in references[part] if part != "table1" or seed in arm_seeds(arm)]
                if part == "table1" and "full" not in {v.name for v in every} and seed in arm_seeds("full"):
                    refs.append("full")
                before, after = ([], refs) if part == "table1" else (refs, [])  # Table 1's own rows first
                for arm in before:
                    run(fam, arm, seed)
                for v in found:
                    run_variant(fam, v, seed)
                for arm in after:
                    run(fam, arm, seed)
    return list(jobs.values())


# Prior seconds per job kind at the default sizes on 2 CPU cores (the ETA uses measured times once it has them).
PRIOR_S = {"knowledge": 60, "base": 40, "task_model": 180, "train:heads": 95, "train:lora": 100, "train:full": 130}


def estimate(kind: str, sizes: Sizes, device: str) -> float:
    """Prior seconds for a job of `kind`: `PRIOR_S` scaled by the training tokens, a GPU taken as 20x faster."""
    seconds = PRIOR_S.get(kind, 0.0)
    if kind.startswith("train:"):
        seconds *= sizes.steps * sizes.batch / (30 * 16)
    elif kind == "task_model":
        seconds *= sizes.task_model_steps * sizes.batch / (60 * 16)
    return seconds / (20 if device == "cuda" else 1)


# Rebuilding the report costs a few seconds: during a run, at most this often (and always at the end).
REPORT_EVERY_S = 600


def throttled(seconds: float, fn: Callable[[], None]) -> Callable[[], None]:
    """`fn`, run when called at least `seconds` after its last run (the first call runs it)."""
    last = [-math.inf]

    def call() -> None:
        if time.time() - last[0] >= seconds:
            fn()
            last[0] = time.time()

    return call


def pending(jobs: list[Job]) -> list[Job]:
    """The jobs whose result file is missing, in order."""
    return [j for j in jobs if not os.path.isfile(j.path)]


def job_cost(measured: dict[str, list[float]], sizes: Sizes, device: str) -> Callable[[str], float]:
    """Seconds a job of a kind is expected to take: the median measured time of its kind (one diverged run is slow),
    else the prior `estimate`."""

    def cost(kind: str) -> float:
        times = measured.get(kind)
        return statistics.median(times) if times else estimate(kind, sizes, device)

    return cost


def list_jobs(jobs: list[Job], store: Store, sizes: Sizes, device: str) -> list[str]:
    """The pending jobs, one line each (name, file, kind, expected minutes), then the total: a dry run."""
    todo = pending(jobs)
    cost = job_cost(store.job_times(), sizes, device)
    lines = [
        f"{j.name}  ->  {os.path.relpath(j.path, store.root)}  [{j.kind}, ~{cost(j.kind) / 60:.1f} min]" for j in todo
    ]
    total = sum(cost(j.kind) for j in todo)
    lines.append(
        f"{len(jobs)} jobs planned, {len(jobs) - len(todo)} already done, {len(todo)} to run; "
        f"about {total / 60:.0f} min ({total / 3600:.2f} h) at the measured median time of each job kind"
    )
    return lines


def execute(jobs: list[Job], store: Store, sizes: Sizes, device: str, log, after_each) -> None:
    """Run every job whose file is missing, in order; print progress and an ETA from measured job times."""
    todo = pending(jobs)
    log(f"{len(jobs)} jobs planned, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    measured = store.job_times()
    cost = job_cost(measured, sizes, device)

    for i, job in enumerate(todo):
        start = time.time()
        log(f"[{i + 1}/{len(todo)}] {job.name} ...")
        result = job.run()
        wall = time.time() - start
        result["job"] = {
            "name": job.name,
            "kind": job.kind,
            "wall_s": wall,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        write_json(job.path, result)
        measured.setdefault(job.kind, []).append(wall)
        left = sum(cost(j.kind) for j in todo[i + 1 :])
        detail = ""
        if "arm" in result:
            em, know = 100 * result["test"]["exact_match"], 100 * result["knowledge"]["accuracy"]
            detail = f": test EM {em:.1f}%, knowledge {know:.0f}%, ppl {result['ppl']:.2f}"
        log(
            f"[{i + 1}/{len(todo)}] done in {wall:.0f}s{detail}; about {left / 60:.0f} min left "
            f"(ETA {time.strftime('%H:%M', time.localtime(time.time() + left))})"
        )
        after_each()
