"""The ALPS paper's experiments in miniature, on CPU, with synthetic data.

Usage:
    python -m benchmarks.miniature.reproduce            # full run: RESULTS.md, RESULTS.json, figures/ in
                                                        # benchmarks/results/miniature/
    python -m benchmarks.miniature.reproduce --quick    # pipeline smoke test (~1-2 min), into a temporary directory

Protocol (see RESULTS.md for the numbers):
1. Pretrain a small Llama-architecture model on a "general" instruction corpus (copy, reverse, sort, count,
   upper-case, fact look-up; Alpaca template). This is the base model M_B.
2. Task model M_T: fine-tune M_B on two-digit addition (dataset A, a data slice disjoint from the one the methods
   train on). Heads are localized from (M_B, M_T) with `alps_trl.localize_heads`.
3. Learning rates per method family (full-network, head-restricted, LoRA) from a sweep on seed 0, scored on the
   validation split only (task accuracy, ties broken by lower general-corpus loss).
4. From M_B, fine-tune on dataset A with every method and seed; report held-out exact match (greedy decoding of the
   answer) and the general corpus accuracy/loss before and after (forgetting); ablations over the ratio and the
   metric, two controls, and transfer of heads localized on A to dataset B (same task, other phrasing).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from alps_trl.localization.localize import localize_heads
from benchmarks.common import finetune_loop as loop
from benchmarks.common import selection_controls as controls
from benchmarks.common.run_info import MINIATURE_RESULTS, REPO
from benchmarks.miniature import report
from benchmarks.miniature import tasks as data

DEFAULT_OUTPUT = os.path.join(REPO, MINIATURE_RESULTS)


@dataclass
class Scale:
    """Every size, step count and learning-rate grid of a run."""

    hidden: int = 64
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    pretrain_steps: int = 1000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    general_train_size: int = 20000
    task_train_size: int = 3000
    task_model_steps: int = 120
    task_model_lr: float = 1e-3
    ft_steps: int = 120
    ft_batch: int = 32
    eval_per_general_task: int = 50
    eval_task: int = 300
    val_task: int = 200
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {"full": (3e-4, 6e-4, 1e-3), "heads": (3e-4, 6e-4, 1e-3), "lora": (1e-3, 3e-3, 1e-2)}
    )
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
    metrics: tuple[str, ...] = ("kl", "cosine", "euclidean")
    lora_rank: int = 8
    weight_decay: float = 0.1


QUICK = Scale(
    hidden=32,
    layers=2,
    heads=4,
    kv_heads=2,
    pretrain_steps=10,
    pretrain_batch=16,
    general_train_size=600,
    task_train_size=200,
    task_model_steps=3,
    ft_steps=3,
    ft_batch=8,
    eval_per_general_task=8,
    eval_task=24,
    val_task=24,
    seeds=(0, 1),
    lr_grid={"full": (1e-3,), "heads": (1e-3,), "lora": (3e-3,)},
    ratios=(1.0,),
    metrics=("cosine",),
    lora_rank=2,
)


# ---- model and data -----------------------------------------------------------------------------------------------


def build_model(scale: Scale, tok: data.CharTokenizer) -> torch.nn.Module:
    """A randomly initialised Llama-architecture causal LM of the scale's shape (float32, sdpa)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=scale.hidden,
        intermediate_size=3 * scale.hidden,
        num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads,
        num_key_value_heads=scale.kv_heads,
        max_position_embeddings=64,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


_TEMPLATES: dict[tuple, torch.nn.Module] = {}


def model_from(state: dict, scale: Scale, tok: data.CharTokenizer) -> torch.nn.Module:
    """A fresh model holding `state` (a deep copy of a cached template: cheaper than building from the config)."""
    key = (scale.hidden, scale.layers, scale.heads, scale.kv_heads, tok.vocab_size)
    if key not in _TEMPLATES:
        _TEMPLATES[key] = build_model(scale, tok)
    model = copy.deepcopy(_TEMPLATES[key])
    model.load_state_dict(state)
    return model


@dataclass
class Splits:
    general_train: list
    general_val: dict
    general_test: dict
    task: dict  # name -> {"train", "model_train", "val", "test"}


def make_splits(scale: Scale) -> Splits:
    general_train = data.make_split(list(data.GENERAL_TASKS.values()), "train", scale.general_train_size, seed=0)
    seen = {i for i, _ in general_train}
    n = scale.eval_per_general_task
    general_val = {k: data.make_split(g, "val", n, seed=0, exclude=seen) for k, g in data.GENERAL_TASKS.items()}
    general_test = {k: data.make_split(g, "test", n, seed=0, exclude=seen) for k, g in data.GENERAL_TASKS.items()}
    task = {}
    for name, gen in data.TASKS.items():
        train = data.make_split(gen, "train", scale.task_train_size, seed=0)
        # The task model sees its own slice of the task's training data (another seed), like a public specialist.
        model_train = data.make_split(gen, "train", scale.task_train_size, seed=1)
        seen_t = {i for i, _ in train} | {i for i, _ in model_train}
        task[name] = {
            "train": train,
            "model_train": model_train,
            "val": data.make_split(gen, "val", scale.val_task, seed=0, exclude=seen_t),
            "test": data.make_split(gen, "test", scale.eval_task, seed=0, exclude=seen_t),
        }
    return Splits(general_train, general_val, general_test, task)


# ---- evaluation ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: torch.nn.Module, tok: data.CharTokenizer, pairs: list, chunk: int = 200) -> tuple[float, float]:
    """(exact-match accuracy, mean answer-token loss) of `pairs`.

    Exact match of greedy decoding is computed in one teacher-forced pass: greedy decoding reproduces the answer and
    its eos token if and only if the argmax at every answer position, given the correct prefix, is the answer token.
    """
    model.eval()
    correct, loss_sum, tokens = 0, 0.0, 0
    for start in range(0, len(pairs), chunk):
        b = data.collate(tok, pairs[start : start + chunk])
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
        labels = b.labels[:, 1:]
        mask = labels != -100
        correct += int(((logits.argmax(-1) == labels) | ~mask).all(-1).sum())
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")
        loss_sum += float(loss)
        tokens += int(mask.sum())
    model.train()
    return correct / len(pairs), loss_sum / max(tokens, 1)


def evaluate_general(model, tok, general: dict) -> dict:
    """Per-task accuracy on the general corpus, their mean, and the mean answer-token loss over all tasks."""
    per_task, losses = {}, []
    for name, pairs in general.items():
        acc, loss = evaluate(model, tok, pairs)
        per_task[name] = acc
        losses.append(loss)
    return {"acc": statistics.mean(per_task.values()), "loss": statistics.mean(losses), "per_task": per_task}


# ---- training stages ----------------------------------------------------------------------------------------------


def pretrain(scale: Scale, tok, splits: Splits, log) -> dict:
    """Train the base model M_B on the general corpus; returns its state dict."""
    torch.manual_seed(1000)
    model = build_model(scale, tok)
    bl = data.batches(tok, splits.general_train, scale.pretrain_batch, scale.pretrain_steps, seed=1000)
    losses = loop.train(loop.prepare(model, loop.Method("pretrain", "full")), bl, scale.pretrain_lr, 0.1)
    log(f"pretrain: {scale.pretrain_steps} steps, final loss {statistics.mean(losses[-10:]):.3f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(base_state, scale, tok, method: loop.Method, batches: list, lr: float, seed: int):
    """Fine-tune a fresh copy of the base with `method`; returns (model, trainable parameter count)."""
    torch.manual_seed(seed)
    model = model_from(base_state, scale, tok)
    prep = loop.prepare(model, method)
    trainable = loop.trainable_parameters(prep)
    loop.train(prep, batches, lr, scale.weight_decay)
    return prep.model, trainable


def make_task_model(base_state, scale, tok, pairs: list, seed: int) -> torch.nn.Module:
    """M_T: full fine-tuning of the base on the task (its own data slice)."""
    bl = data.batches(tok, pairs, scale.ft_batch, scale.task_model_steps, seed=seed)
    model, _ = finetune(base_state, scale, tok, loop.Method("task_model", "full"), bl, scale.task_model_lr, seed)
    return model


# ---- the experiment -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    table: str
    method: str
    family: str
    seed: int
    lr: float
    trainable: int
    task_acc: float
    task_loss: float
    gen_acc: float
    gen_loss: float
    gen_per_task: dict
    dataset: str = "add_a"
    split: str = "test"


class MiniatureExperiment:
    def __init__(self, scale: Scale, log) -> None:
        self.scale = scale
        self.log = log
        self.tok = data.CharTokenizer()
        self.splits = make_splits(scale)
        self.runs: list[Run] = []
        self.sweep: list[Run] = []
        self.timings: dict[str, float] = {}

    def _batches(self, dataset: str, seed: int) -> list:
        pairs = self.splits.task[dataset]["train"]
        return data.batches(self.tok, pairs, self.scale.ft_batch, self.scale.ft_steps, seed=seed)

    def run_one(self, table, method, family, dataset, seed, lr, split="test", batches=None) -> Run:
        bl = batches if batches is not None else self._batches(dataset, seed)
        model, trainable = finetune(self.base_state, self.scale, self.tok, method, bl, lr, seed)
        general = self.splits.general_val if split == "val" else self.splits.general_test
        task_acc, task_loss = evaluate(model, self.tok, self.splits.task[dataset][split])
        gen = evaluate_general(model, self.tok, general)
        run = Run(
            table,
            method.name,
            family,
            seed,
            lr,
            trainable,
            task_acc,
            task_loss,
            gen["acc"],
            gen["loss"],
            gen["per_task"],
            dataset,
            split,
        )
        self.log(
            f"  [{table}] {method.name:<22} seed {seed} lr {lr:.0e}: task {task_acc:.3f}  general {gen['acc']:.3f} "
            f"(loss {gen['loss']:.3f})  trainable {trainable}"
        )
        return run

    def stage(self, name: str):
        experiment = self

        class _Timer:
            def __enter__(self):
                self.t = time.time()
                experiment.log(f"== {name}")

            def __exit__(self, *exc):
                experiment.timings[name] = time.time() - self.t

        return _Timer()

    def localize(self) -> None:
        s = self.scale
        base = model_from(self.base_state, s, self.tok)
        self.task_models = {}
        for dataset in data.TASKS:
            self.task_models[dataset] = make_task_model(
                self.base_state, s, self.tok, self.splits.task[dataset]["model_train"], seed=100
            )
            acc, _ = evaluate(self.task_models[dataset], self.tok, self.splits.task[dataset]["val"])
            self.log(f"task model {dataset}: val accuracy {acc:.3f}")
        tm = self.task_models["add_a"]
        self.sel = {"alps": localize_heads(base, tm, ratio=0.1, metric="pad")}
        for r in s.ratios:
            self.sel[f"alps_{round(r * 100)}"] = localize_heads(base, tm, ratio=r, metric="pad")
        for m in s.metrics:
            self.sel[f"metric_{m}"] = localize_heads(base, tm, ratio=0.1, metric=m)
        self.sel["alps_from_b"] = localize_heads(base, self.task_models["add_b"], ratio=0.1, metric="pad")
        self.sel["bottom"] = controls.lowest_k(self.sel["alps"])
        self.log(self.sel["alps"].summary())

    def methods(self, seed: int) -> dict[str, tuple[loop.Method, str]]:
        """Every (method, lr family) of the main tables, for one seed."""
        from alps_trl.localization.localize import localize_heads as loc

        base = model_from(self.base_state, self.scale, self.tok)
        tm = self.task_models["add_a"]
        rnd = loc(base, tm, ratio=0.1, strategy="random", seed=seed)
        lc = loc(base, tm, ratio=0.1, strategy="layer_consistent", seed=seed)
        h = lambda name, sel: (loop.Method(name, "heads", selection=sel), "heads")  # noqa: E731
        lora = f"LoRA r={self.scale.lora_rank}"
        return {
            "Full": (loop.Method("Full", "full"), "full"),
            "w/o attn": (loop.Method("w/o attn", "wo_attn"), "full"),
            "Random 10%": h("Random 10%", rnd),
            "LC 10%": h("LC 10%", lc),
            lora: (loop.Method(lora, "lora", lora_rank=self.scale.lora_rank), "lora"),
            "ALPS 10%": h("ALPS 10%", self.sel["alps"]),
            "Random, ALPS footprint": h(
                "Random, ALPS footprint", controls.random_same_footprint(self.sel["alps"], seed)
            ),
            "Lowest-scoring 10%": h("Lowest-scoring 10%", self.sel["bottom"]),
            **{
                f"ALPS {round(r * 100)}%": h(f"ALPS {round(r * 100)}%", self.sel[f"alps_{round(r * 100)}"])
                for r in self.scale.ratios
            },
            **{f"ALPS 10% ({m})": h(f"ALPS 10% ({m})", self.sel[f"metric_{m}"]) for m in self.scale.metrics},
        }

    def lr_sweep(self) -> None:
        """Seed 0, validation split only: the lr of each family maximizes its members' mean val accuracy."""
        lora = f"LoRA r={self.scale.lora_rank}"
        members = {"full": ["Full"], "heads": ["ALPS 10%", "Random 10%", "LC 10%"], "lora": [lora]}
        methods = self.methods(0)
        bl = self._batches("add_a", 0)
        self.lr = {}
        for family, names in members.items():
            best = None
            for lr in self.scale.lr_grid[family]:
                runs = [self.run_one("sweep", methods[n][0], family, "add_a", 0, lr, "val", bl) for n in names]
                self.sweep.extend(runs)
                key = (statistics.mean(r.task_acc for r in runs), -statistics.mean(r.gen_loss for r in runs))
                if best is None or key > best[0]:
                    best = (key, lr)
            self.lr[family] = best[1]
            self.log(f"lr[{family}] = {best[1]:.0e}")

    def main_runs(self) -> None:
        for seed in self.scale.seeds:
            bl = self._batches("add_a", seed)
            for name, (method, family) in self.methods(seed).items():
                table = "main"
                if name.startswith("ALPS") and "(" in name:
                    table = "metric"
                elif name.startswith("ALPS") and name != "ALPS 10%":
                    table = "ratio"
                elif name in ("Random, ALPS footprint", "Lowest-scoring 10%"):
                    table = "controls"
                self.runs.append(self.run_one(table, method, family, "add_a", seed, self.lr[family], batches=bl))

    def transfer_runs(self) -> None:
        """Dataset B (same task, other phrasing): heads localized on A vs heads localized on B vs Random vs Full."""
        base = model_from(self.base_state, self.scale, self.tok)
        for seed in self.scale.seeds:
            bl = self._batches("add_b", seed)
            rnd = localize_heads(base, self.task_models["add_b"], ratio=0.1, strategy="random", seed=seed)
            plan = [
                (loop.Method("Full", "full"), "full"),
                (loop.Method("Random 10%", "heads", selection=rnd), "heads"),
                (loop.Method("ALPS 10%, heads from A", "heads", selection=self.sel["alps"]), "heads"),
                (loop.Method("ALPS 10%, heads from B", "heads", selection=self.sel["alps_from_b"]), "heads"),
            ]
            for method, family in plan:
                self.runs.append(self.run_one("transfer", method, family, "add_b", seed, self.lr[family], batches=bl))

    def run(self) -> None:
        s = self.scale
        with self.stage("pretrain"):
            self.base_state = pretrain(s, self.tok, self.splits, self.log)
            base = model_from(self.base_state, s, self.tok)
            self.num_params = sum(p.numel() for p in base.parameters())
            self.base_general = evaluate_general(base, self.tok, self.splits.general_test)
            self.base_task = {k: evaluate(base, self.tok, v["test"])[0] for k, v in self.splits.task.items()}
            self.log(f"base general {self.base_general}, base task {self.base_task}")
        with self.stage("task models + localization"):
            self.localize()
        with self.stage("lr sweep (seed 0, validation split)"):
            self.lr_sweep()
        with self.stage("main, controls, ratio and metric ablations"):
            self.main_runs()
        with self.stage("transfer"):
            self.transfer_runs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 seeds: checks the pipeline only")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where RESULTS.md and figures/ go (default: benchmarks/results/miniature/; --quick: a new temporary "
        "directory, so that a smoke run never overwrites the committed results)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the models are tiny, and on a shared "
        "machine one thread wastes less time waiting than two)",
    )
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix="alps_reproduce_quick_") if args.quick else DEFAULT_OUTPUT
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    scale = copy.deepcopy(QUICK if args.quick else Scale())
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    log(f"scale: {asdict(scale)}")
    exp = MiniatureExperiment(scale, log)
    exp.run()
    runtime = time.time() - start
    os.makedirs(args.output_dir, exist_ok=True)
    paths = report.figures(exp, os.path.join(args.output_dir, "figures"))
    command = "python -m benchmarks.miniature.reproduce" + (" --quick" if args.quick else "")
    if args.output_dir != DEFAULT_OUTPUT:
        command += f" --output-dir {args.output_dir}"
    results = os.path.join(args.output_dir, "RESULTS.md")
    report.write_report(exp, results, command, runtime, paths)
    dump = os.path.join(args.output_dir, "RESULTS.json")
    with open(dump, "w") as f:
        json.dump(
            {
                "scale": asdict(scale),
                "lr": exp.lr,
                "base_general": exp.base_general,
                "runs": [asdict(r) for r in exp.sweep + exp.runs],
                "selections": {k: v.to_dict() for k, v in exp.sel.items()},
            },
            f,
            indent=1,
        )
    log(f"wrote {results}, {dump} and {len(paths)} figures in {runtime / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
