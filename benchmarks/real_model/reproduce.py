"""Does head choice matter on a real model? ALPS against random and data-driven heads on SmolLM2-135M-Instruct.

Usage:
    python -m benchmarks.real_model.reproduce --output-dir DIR                # full run (resumable; ~3 h, 2 cores)
    python -m benchmarks.real_model.reproduce --quick                         # pipeline check, < 5 min, temp dir
    python -m benchmarks.real_model.reproduce --output-dir DIR --report-only  # rebuild RESULTS_REAL.md from DIR
    python -m benchmarks.real_model.reproduce --output-dir DIR --list-jobs    # dry run: the jobs a run would do
    python -m benchmarks.real_model.reproduce --device cuda --output-dir DIR  # larger configuration for a GPU
    ... --families arithmetic --arms alps random importance --seeds 0 1       # filters
    ... --parts ratio metric transfer table1                                  # only the paper's ablations (~1.5 h)

The committed run's directory is benchmarks/results/real_model: a command on it skips every finished job.

Parts (default: all): `headchoice`, the question below; and the paper's ablations (`real_model.ablations`), each
its own table: `ratio` (Table 4: 2-50% of the heads), `metric` (Table 5: PAD, KL, JS, Euclidean, cosine), `transfer`
(Table 2: one family's heads trained on the other) and `table1` (Table 1: the rest of the network trains too, with
LC, w/o attn, LoRA r128 and Full). An ablation row that is a head-choice arm reuses that arm's result files. The
ablations run seeds 0-1, Table 1's ALPS, Random and Importance + rest and Full seeds 0-4 (`ablations.AblationSizes`).

Protocol (RESULTS_REAL.md states the sizes): three task families on which the base scores ~0% (`real_model.tasks`):
addition and reversing words, and `times`, held out (`Sizes.heldout`: only the arms of the pre-registered test
run on it, `config.arms_on`, with the candidate `random_upper`; `real_model.heldout` reports the verdict). Each has
disjoint splits A (the task model's data), B (the arms' training data), validation and test. ALPS's task model is
a full fine-tune on A; PAD (`alps_trl.localize_heads`) picks 10% of the heads. Every head arm trains only its heads'
q/k/v rows (delta restriction, everything else frozen) on B; Full and LoRA r8 (q/k/v) are references. All arms of a
seed see the same batches in the same order, with the same steps and schedule (warmup 10%, cosine to 10%, AdamW, weight
decay 0.1, clip 1.0, bf16 autocast where native). The learning rate of each method family is picked on the validation
split at seed 0 (the chosen point is that arm's seed-0 result). Measured per run: exact match of greedy decoding on
the test split, test loss, and forgetting (perplexity on pydoc_data, accuracy on knowledge questions the base answers).

Every finished piece (base evaluation, task model, selection, sweep point, (family, arm, seed) result) is a JSON file
under --output-dir, written atomically the moment it finishes; a rerun skips what exists, and the report is rebuilt
from whatever is there. Work runs in order of information: one family's ALPS / Random / Importance seeds first.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from benchmarks.common import finetune_loop as loop
from benchmarks.common import selection_controls as controls
from benchmarks.common.run_info import REAL_MODEL_RESULTS
from benchmarks.real_model import ablations, report
from benchmarks.real_model import knowledge as rk
from benchmarks.real_model import tasks as rt
from benchmarks.real_model.config import ARMS, CALIBRATION, CUDA, GROWABLE, NEEDS_TASK_MODEL, QUICK, Sizes
from benchmarks.real_model.plan import REPORT_EVERY_S, execute, list_jobs, plan, throttled
from benchmarks.real_model.store import Store


class RealModelExperiment:
    """The model, data and every job of a run (`plan.plan` orders them); the model loads only when a job needs it."""

    def __init__(
        self,
        sizes: Sizes,
        store: Store,
        device: str,
        log: Callable[[str], None],
        ablation: ablations.AblationSizes | None = None,
    ) -> None:
        self.sizes, self.store, self.device, self.log = sizes, store, torch.device(device), log
        self.ablation = ablation or ablations.AblationSizes()
        self.splits = {
            fam: rt.make_splits(
                rt.GENERATORS[gen],
                {"A": sizes.split_a, "B": sizes.split_b, "val": sizes.val, "test": sizes.test},
                sizes.data_seed,
            )
            for fam, gen in sizes.families.items()
        }
        self._base = None
        self._batches: dict[tuple[str, int], list] = {}

    # ---- lazily loaded pieces -----------------------------------------------------------------------------------
    def _load(self) -> None:
        from transformers import AutoTokenizer

        from benchmarks.common import smollm2

        _, directory = smollm2.model_paths()
        self._base = smollm2.load_model(directory).to(self.device)
        self._base.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.encoder = rt.ChatEncoder(self.tokenizer)
        self.amp = smollm2.autocast_dtype(self.device)
        self.ppl_rows = rt.pydoc_rows(self.tokenizer, self.sizes.ppl_tokens, self.sizes.ppl_seq)

    @property
    def base(self) -> torch.nn.Module:
        if self._base is None:
            self._load()
        return self._base

    def batches(self, fam: str, seed: int) -> list:
        key = (fam, seed)
        if key not in self._batches:
            s = self.sizes
            self.base  # noqa: B018 (loads the tokenizer)
            self._batches[key] = rt.train_batches(
                self.encoder, self.splits[fam]["B"], s.batch, s.steps, seed, self.device
            )
        return self._batches[key]

    def evaluate(self, model, fam: str, split: str) -> dict:
        r = rt.score_items(
            model,
            self.encoder,
            self.splits[fam][split],
            batch_size=self.sizes.eval_batch,
            device=self.device,
            amp=self.amp,
        )
        return {"exact_match": r["exact_match"], "loss": r["loss"], "correct": r["correct"]}

    def forgetting(self, model) -> dict:
        questions = [(q, a) for q, a in self.store.load(self.store.knowledge())["kept"]]
        k = rk.knowledge_eval(
            model,
            self.tokenizer,
            questions,
            device=self.device,
            amp=self.amp,
            max_new_tokens=self.sizes.knowledge_new_tokens,
        )
        ppl = rt.perplexity(model, self.ppl_rows, device=self.device, amp=self.amp)
        return {"knowledge": {"accuracy": k["accuracy"], "correct": k["correct"]}, "ppl": ppl}

    # ---- base and task model ------------------------------------------------------------------------------------
    def knowledge_job(self) -> dict:
        import random

        s = self.sizes
        candidates = rk.KNOWLEDGE_CANDIDATES[: s.knowledge_candidates]
        r = rk.knowledge_eval(
            self.base,
            self.tokenizer,
            candidates,
            device=self.device,
            amp=self.amp,
            max_new_tokens=s.knowledge_new_tokens,
        )
        right = [(q, a, g) for (q, a), g, c in zip(candidates, r["generations"], r["correct"]) if c]
        random.Random(s.data_seed).shuffle(right)
        kept = right[: s.knowledge]
        return {
            "candidates": len(candidates),
            "base_correct": len(right),
            "kept": [[q, a] for q, a, _ in kept],
            "base_generations": [g for _, _, g in kept],
            "base_ppl": rt.perplexity(self.base, self.ppl_rows, device=self.device, amp=self.amp),
        }

    def base_job(self, fam: str) -> dict:
        test = self.splits[fam]["test"]
        tf = self.evaluate(self.base, fam, "test")
        greedy = rt.greedy_agreement(self.base, self.encoder, test, tf["correct"], device=self.device, amp=self.amp)
        return {
            "family": fam,
            "generator": self.sizes.families[fam],
            "examples": test[:3],
            "test": tf,
            "greedy": greedy,
        }

    def _train_task_model(self, fam: str) -> tuple[torch.nn.Module, list[float]]:
        """ALPS's task model: a full fine-tune of the base on split A (fixed batches, seed 1000)."""
        s = self.sizes
        model = copy.deepcopy(self.base)
        prep = loop.prepare(model, loop.Method("task model", "full"))
        batches = rt.train_batches(self.encoder, self.splits[fam]["A"], s.batch, s.task_model_steps, 1000, self.device)
        losses = loop.train(prep, batches, s.task_model_lr, s.weight_decay, 1.0, self.amp)
        return model, losses

    def task_model_job(self, fam: str) -> dict:
        from alps_trl.localization.localize import localize_heads

        s = self.sizes
        model, losses = self._train_task_model(fam)
        val = self.evaluate(model, fam, "val")
        selection = localize_heads(self.base, model, ratio=s.ratio, metric="pad")
        selection.provenance.update({"task": f"full fine-tune on split A ({s.task_model_steps} steps)"})
        selection.save(self.store.selection(fam, "alps"))
        del model
        gc.collect()
        return {"steps": s.task_model_steps, "lr": s.task_model_lr, "final_loss": losses[-1], "val": val}

    def metric_selections_job(self, fam: str) -> dict:
        """The metric part: the task model retrained exactly as for ALPS, its heads scored by every metric (saved as
        selections/<fam>/metric_<m>.json). Records how closely its PAD heads reproduce the head-choice run's."""
        from alps_trl.localization.localize import localize_heads
        from alps_trl.localization.scoring import METRICS
        from alps_trl.localization.selection import HeadSelection

        s = self.sizes
        model, losses = self._train_task_model(fam)
        found = {}
        for metric in METRICS:
            selection = localize_heads(self.base, model, ratio=s.ratio, metric=metric)
            selection.provenance.update({"task": f"full fine-tune on split A ({s.task_model_steps} steps), retrained"})
            selection.save(self.store.selection(fam, f"metric_{metric}"))
            found[metric] = selection
        del model
        gc.collect()
        alps = HeadSelection.load(self.store.selection(fam, "alps"))
        pad = found["pad"]
        return {
            "family": fam,
            "final_loss": losses[-1],
            "heads": {m: [list(h) for h in sel.heads] for m, sel in found.items()},
            "pad_heads_shared_with_head_choice": len(set(pad.heads) & set(alps.heads)),
            "pad_max_score_difference": float(abs(pad.scores - alps.scores).max()),
        }

    # ---- selections ---------------------------------------------------------------------------------------------
    def selection(self, fam: str, arm: str, seed: int):
        """The heads `arm` trains at `seed` (scored selections are saved under selections/ the first time)."""
        from alps_trl.localization.anatomy import AttentionLayout
        from alps_trl.localization.selection import HeadSelection, num_selected, select_random, selection_for_layout

        s = self.sizes
        layout = AttentionLayout.from_model(self.base)
        if arm in NEEDS_TASK_MODEL:
            alps = HeadSelection.load(self.store.selection(fam, "alps"))
            if arm == "lowest":
                return controls.lowest_k(alps)
            return alps if arm == "alps" else controls.random_same_footprint(alps, seed)
        if arm == "random":
            k = num_selected(s.ratio, layout.num_layers, layout.num_heads)
            heads = select_random(layout.num_layers, layout.num_heads, k, seed)
            return selection_for_layout(
                layout, heads, metric="none", ratio=s.ratio, strategy="random", provenance={"seed": seed}
            )
        source = "importance" if arm.startswith("importance") or arm == "random_upper" else "probe"
        path = self.store.selection(fam, f"{source}_seed{seed}")
        if not os.path.isfile(path):
            start = time.time()
            scored = self._importance(fam, seed, layout) if source == "importance" else self._probe(fam, seed)
            scored.provenance["wall_s"] = round(time.time() - start, 1)
            scored.save(path)
        scored = HeadSelection.load(path)
        if arm == "random_upper":
            return controls.random_from_upper_half(scored, seed)
        return controls.lowest_k(scored) if arm == "importance_lowest" else scored

    def _importance(self, fam: str, seed: int, layout):
        """The trainer's `alps_metric="importance"`: the default budget of batches, first in the seed's order."""
        from alps_trl.localization.importance import head_importance, importance_selection
        from alps_trl.trainers.config import AlpsArguments, planned_importance_batches

        n = planned_importance_batches(AlpsArguments(), self.sizes.steps, 1)
        batches = [rt.as_model_inputs(b) for b in self.batches(fam, seed)[:n]]
        with rt.autocast(self.device, self.amp):
            scores = head_importance(self.base, batches, progress=False, train_mode=True)
        return importance_selection(scores, layout, self.sizes.ratio, num_batches=n, provenance={"seed": seed})

    def _probe(self, fam: str, seed: int):
        """The trainer's probe, as `trainers.probe.run_probe` does it: all q/k/v (rest frozen) for 10% of the steps
        on the seed's first training batches, constant head-family lr, no weight decay, clip 1.0; then PAD."""
        from alps_trl.localization.localize import localize_heads
        from alps_trl.trainers.config import AlpsArguments, planned_probe_steps

        n = planned_probe_steps(AlpsArguments(), self.sizes.steps)
        lr = self.chosen_lr(fam, "heads")
        prep = loop.prepare(copy.deepcopy(self.base), loop.Method("probe", "qkv"))
        optimizer = loop.make_optimizer(prep, lr, 0.0)
        prep.model.train()
        for batch in self.batches(fam, seed)[:n]:
            loop.train_step(prep, optimizer, batch, lr, 0.0, 1.0, self.amp)
        selection = localize_heads(self.base, prep.model, ratio=self.sizes.ratio, metric="pad")
        selection.provenance.update({"task": f"probe ({n} attention-only steps on split B)", "seed": seed, "lr": lr})
        return selection

    # ---- training runs ------------------------------------------------------------------------------------------
    def lr_grid(self, lr_family: str) -> list[float]:
        return self.sizes.lr_grid.get(lr_family) or self.ablation.lr_grid[lr_family]

    def chosen_lr(self, fam: str, lr_family: str) -> float:
        chosen = self.store.chosen_lr(fam, lr_family, self.lr_grid(lr_family))
        if chosen is None:
            raise RuntimeError(f"The {lr_family} learning-rate sweep of {fam} is incomplete.")
        return chosen[0]

    def method(self, fam: str, arm: str, seed: int) -> tuple[loop.Method, object]:
        kind = ARMS[arm].lr_family
        if kind == "full":
            return loop.Method(arm, "full"), None
        if kind == "lora":
            return loop.Method(arm, "lora", lora_rank=self.sizes.lora_rank), None
        sel = self.selection(fam, arm, seed)
        return loop.Method(arm, "heads", selection=sel, mode="delta", train_non_attention=False), sel

    def run_arm(self, fam: str, arm: str, seed: int, lr: float, with_val: bool = False) -> dict:
        method, sel = self.method(fam, arm, seed)
        return self.train_and_measure(fam, arm, seed, lr, method, sel, with_val)

    def variant_selection(self, fam: str, v: ablations.Variant, seed: int):
        """The heads an ablation variant trains on `fam` at `seed`."""
        from alps_trl.localization.anatomy import AttentionLayout
        from alps_trl.localization.selection import HeadSelection

        layout = AttentionLayout.from_model(self.base)
        if v.heads == "alps":
            name = f"metric_{v.metric}" if v.part == "metric" else "alps"
            scored = HeadSelection.load(self.store.selection(v.heads_from or fam, name))
            return ablations.at_ratio(scored, v.ratio, layout)
        if v.heads == "importance":
            return ablations.at_ratio(self.selection(fam, "importance", seed), v.ratio, layout)
        return ablations.drawn(v.heads, layout, v.ratio, seed)

    def run_variant(self, fam: str, v: ablations.Variant, seed: int, lr: float | None = None) -> dict:
        """Train variant `v` at `lr` (default: its lr family's chosen rate); a given `lr` is a sweep point."""
        if v.kind == "heads":
            sel = self.variant_selection(fam, v, seed)
            method = loop.Method(v.name, "heads", selection=sel, mode="delta", train_non_attention=v.rest_trains)
        else:
            sel, method = None, loop.Method(v.name, v.kind, lora_rank=v.lora_rank)
        sweeping = lr is not None
        lr = lr if sweeping else self.chosen_lr(fam, v.lr_family)
        result = self.train_and_measure(fam, v.name, seed, lr, method, sel, with_val=sweeping, greedy_check=False)
        return {"part": v.part, "variant": asdict(v), **result}

    def train_and_measure(
        self,
        fam: str,
        arm: str,
        seed: int,
        lr: float,
        method: loop.Method,
        sel,
        with_val: bool = False,
        greedy_check: bool = True,
    ) -> dict:
        """Train `method` on the seed's batches of split B at `lr`; then every measurement of a run (the check of
        teacher-forced against real greedy decoding at seed 0 unless `greedy_check` is False)."""
        s = self.sizes
        batches = self.batches(fam, seed)
        torch.manual_seed(seed)  # LoRA's initialisation
        prep = loop.prepare(copy.deepcopy(self.base), method)
        trainable = loop.trainable_parameters(prep)
        wall, cpu = time.time(), time.process_time()
        losses = loop.train(prep, batches, lr, s.weight_decay, 1.0, self.amp)
        train_wall, train_cpu = time.time() - wall, time.process_time() - cpu
        start = time.time()
        result = {
            "family": fam,
            "arm": arm,
            "seed": seed,
            "lr": lr,
            "trainable": trainable,
            "heads": None if sel is None else [list(h) for h in sel.heads],
            "kv_groups": None if sel is None else int(sel.kv_mask_array().sum()),
            "losses": losses,
            "train_wall_s": train_wall,
            "step_wall_s": train_wall / len(batches),
            "step_cpu_s": train_cpu / len(batches),
            "test": self.evaluate(prep.model, fam, "test"),
            **self.forgetting(prep.model),
        }
        if with_val:
            result["val"] = self.evaluate(prep.model, fam, "val")
        if seed == 0 and greedy_check:
            pairs = self.splits[fam]["test"][: s.greedy_check]
            flags = result["test"]["correct"][: s.greedy_check]
            result["greedy"] = rt.greedy_agreement(
                prep.model, self.encoder, pairs, flags, device=self.device, amp=self.amp
            )
        result["eval_wall_s"] = time.time() - start
        del prep
        gc.collect()
        return result

    def from_sweep(self, fam: str, lr_family: str) -> dict:
        """The seed-0 result of the arm that picked its family's lr: the chosen sweep point itself."""
        _, point = self.store.chosen_lr(fam, lr_family, self.lr_grid(lr_family))
        return {**point, "from_sweep": True, "sweep_job": point.pop("job", None)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir",
        help=f"where the result files and RESULTS_REAL.md go (the committed run: {REAL_MODEL_RESULTS}; --quick: a "
        "temporary directory)",
    )
    parser.add_argument("--quick", action="store_true", help="one family, one seed, a few steps, tiny evaluation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: more seeds and evaluation items)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the files; no training")
    parser.add_argument(
        "--list-jobs",
        action="store_true",
        help="dry run: print each job the command would run (its result file is missing), one a line, with the "
        "expected time; loads no model and writes nothing",
    )
    parser.add_argument("--families", nargs="+", help="only these task families")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="only these arms (and what they need)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (sweeps always run at seed 0)")
    parser.add_argument("--steps", type=int, help="override the training steps (calibration; changes the sizes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=(ablations.HEAD_CHOICE, *ablations.PARTS),
        default=(ablations.HEAD_CHOICE, *ablations.PARTS),
        help="which parts run (default: all): the head-choice comparison, and the paper's ablations: ratio "
        "(Table 4), metric (Table 5), transfer (Table 2), table1 (Table 1, the rest trainable)",
    )
    args = parser.parse_args(argv)
    sizes = copy.deepcopy(QUICK if args.quick else CUDA if args.device == "cuda" else Sizes())
    ablation = copy.deepcopy(ablations.ABLATION_QUICK if args.quick else ablations.AblationSizes())
    if args.steps:
        sizes.steps = args.steps
    if args.families:
        unknown = set(args.families) - set(sizes.families)
        if unknown:
            parser.error(f"unknown families {sorted(unknown)}; choose from {list(sizes.families)}")
    if args.list_jobs and args.report_only:
        parser.error("--list-jobs and --report-only exclude each other")
    out = args.output_dir or (tempfile.mkdtemp(prefix="alps_real_quick_") if args.quick else None)
    if out is None:
        parser.error("--output-dir is required (except with --quick)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    store = Store(out)
    begin = time.time()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.time() - begin:6.0f}s] {msg}", flush=True)

    command = "python -m benchmarks.real_model.reproduce " + shlex.join(argv)
    meta = {
        "sizes": asdict(sizes),
        "ablation": asdict(ablation),
        "arms": {k: asdict(v) for k, v in ARMS.items()},
        "calibration": CALIBRATION,
    }
    if args.report_only:
        report.write_report(store, meta, command)
        log(f"report rebuilt: {store.path(report.RESULTS_MD)}")
        return 0
    record = not args.list_jobs  # a dry run records nothing
    store.check_config(asdict(sizes), growable=GROWABLE, write=record)
    store.check_config(
        asdict(ablation), os.path.join("ablations", "config.json"), growable=ablations.GROWABLE, write=record
    )
    exp = RealModelExperiment(sizes, store, args.device, log, ablation)
    jobs = plan(exp, args.families or list(sizes.families), args.arms or list(ARMS), args.seeds, tuple(args.parts))
    if args.list_jobs:
        print("\n".join(list_jobs(jobs, store, sizes, args.device)))
        return 0

    def write() -> None:
        report.write_report(store, meta, command)

    sitting = store.start_sitting(command)
    try:
        execute(jobs, store, sizes, args.device, log, after_each=throttled(REPORT_EVERY_S, write))
    finally:
        store.end_sitting(sitting)
        write()
    log(f"done; report: {store.path(report.RESULTS_MD)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
