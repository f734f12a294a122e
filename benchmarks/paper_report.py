"""Tables, figures and RESULTS.md for `reproduce_paper.py` (the paper's Tables 1-5 in miniature).

Works on a finished `reproduce_paper.Experiment` (duck-typed: scale, tok, runs, sweep, lr, sel, base_general,
base_task, num_params, timings). Hand-written text between the interpretation markers and bench_train.py's section
are kept when the report is regenerated.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Any

import synthetic_tasks as data
import torch
from bench_train import BENCH_END, BENCH_START

HERE = os.path.dirname(os.path.abspath(__file__))
INTERPRETATION_START = "<!-- interpretation:start -->"
INTERPRETATION_END = "<!-- interpretation:end -->"
Run = Any  # reproduce_paper.Run
Experiment = Any  # reproduce_paper.Experiment


def _ms(values: list[float], pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    mean = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.3f} ± {sd:.3f}"


def _group(runs: list[Run], table: str, dataset: str = "add_a") -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        if r.table == table and r.dataset == dataset:
            out.setdefault(r.method, []).append(r)
    return out


def _paired(a: list[Run], b: list[Run], attr: str) -> str:
    """Mean and std over seeds of the per-seed difference a - b (in points)."""
    by_seed = {r.seed: getattr(r, attr) for r in b}
    diffs = [100 * (getattr(r, attr) - by_seed[r.seed]) for r in a if r.seed in by_seed]
    if not diffs:
        return "n/a"
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.1f} ± {sd:.1f}"


def _table(groups: dict[str, list[Run]], reference: list[Run] | None, base_gen: float) -> list[str]:
    lines = [
        "| Method | Trainable params | Task acc % (mean ± std) | Δ vs Full (paired, pts) | General acc % after "
        f"(base {100 * base_gen:.1f}) | General loss after | lr |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in groups.items():
        trainable = sorted({r.trainable for r in rs})
        t = f"{trainable[0]:,}" if len(trainable) == 1 else f"{min(trainable):,}-{max(trainable):,}"
        delta = _paired(rs, reference, "task_acc") if reference else "n/a"
        lines.append(
            f"| {name} | {t} | {_ms([r.task_acc for r in rs])} | {delta} | {_ms([r.gen_acc for r in rs])} | "
            f"{_ms([r.gen_loss for r in rs], pct=False)} | {rs[0].lr:.0e} |"
        )
    return lines


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        # The run's own outputs (written before this report) do not make the code it ran "uncommitted".
        own_outputs = [":(exclude,top)benchmarks/RESULTS.md", ":(exclude,top)benchmarks/RESULTS.json"]
        own_outputs.append(":(exclude,top)benchmarks/figures")
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ":/", *own_outputs], cwd=HERE, capture_output=True, text=True
        ).stdout
        return out.stdout.strip() + (" (working tree has uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def figures(exp: Experiment, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    main = _group(exp.runs, "main")
    ratio = _group(exp.runs, "ratio")
    xs, means, sds = [], [], []
    for r in (0.1, *exp.scale.ratios):
        name = f"ALPS {round(r * 100)}%"
        rs = main.get(name) or ratio.get(name)
        accs = [100 * x.task_acc for x in rs]
        xs.append(100 * r)
        means.append(statistics.mean(accs))
        sds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label="ALPS (top-k PAD)")
    for name, style in (("Full", "--"), ("Random 10%", ":"), ("LC 10%", "-.")):
        accs = [100 * x.task_acc for x in main[name]]
        ax.axhline(statistics.mean(accs), linestyle=style, color="gray", label=name)
    ax.set_xlabel("heads trained (% of all heads)")
    ax.set_ylabel("held-out task accuracy (%)")
    ax.set_title("Accuracy vs selection ratio (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy_vs_ratio.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    path = os.path.join(out_dir, "alps_heads_heatmap.png")
    exp.sel["alps"].plot_heatmap(path, title="ALPS 10% selection on the task model (PAD scores)")
    paths.append(path)
    return paths


def write_report(exp: Experiment, path: str, command: str, runtime: float, figure_paths: list[str]) -> None:
    s = exp.scale
    main = _group(exp.runs, "main")
    full = main["Full"]
    base_gen = exp.base_general["acc"]
    lines = [
        "# ALPS in miniature: results",
        "",
        "Generated by `benchmarks/reproduce_paper.py`; every number below comes from the run described here.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"- Runtime: {runtime / 60:.1f} min "
        + "("
        + ", ".join(f"{k}: {v / 60:.1f} min" for k, v in exp.timings.items())
        + ")",
        f"- Git commit: {_git_commit()}",
        f"- Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}",
        "",
        "## Setup",
        "",
        f"- Model: Llama architecture from a config, d={s.hidden}, {s.layers} layers, {s.heads} query heads, "
        f"{s.kv_heads} kv heads (GQA), head_dim {s.hidden // s.heads}, "
        f"{exp.num_params:,} parameters, "
        f"vocabulary {exp.tok.vocab_size} (Alpaca header/response markers as single tokens, characters otherwise).",
        f"- Base model: pretrained {s.pretrain_steps} steps x {s.pretrain_batch} examples (lr {s.pretrain_lr:g}) on a "
        f"mixture of {', '.join(data.GENERAL_TASKS)} in the Alpaca template. "
        f"Its general test accuracy: {100 * base_gen:.1f}% "
        f"({', '.join(f'{k} {100 * v:.0f}%' for k, v in exp.base_general['per_task'].items())}), "
        f"loss {exp.base_general['loss']:.3f}; task accuracy before fine-tuning: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in exp.base_task.items())
        + ".",
        "- Task: multi-digit addition (a three-digit number plus 1-3; carries run through up to three digits). "
        "Dataset A `add: 399+2` -> `401`; dataset B (same task, other phrasing) `x-2=399, x?` -> `401`. "
        f"{s.task_train_size} training examples each; {s.val_task} validation and {s.eval_task} test examples, "
        "disjoint from training.",
        f"- Task model for localization: full fine-tuning of the base for {s.task_model_steps} steps on a disjoint "
        "slice of the task's training data. Heads are scored with `alps_trl.localize_heads` (PAD/W1 unless stated).",
        f"- Fine-tuning: {s.ft_steps} steps x {s.ft_batch} examples, AdamW (0.9, 0.999), weight decay "
        f"{s.weight_decay}, warmup 10%, cosine to 10% of the peak lr, clip 1.0, loss on answer tokens, same batches "
        "for every method of a seed. All head-restricted methods use the library's mask restriction and, as in the "
        f"paper's main table, train the non-attention parameters (MLP, norms, embeddings, o_proj). LoRA: rank "
        f"{s.lora_rank} (alpha {2 * s.lora_rank}) on q/k/v, rest frozen.",
        f"- Seeds {list(s.seeds)}: the seed sets the data order, the Random/LC draws and LoRA's initialisation.",
        "- Metric: exact match of greedy decoding of the answer (computed in one teacher-forced pass, which is "
        "equivalent), on held-out examples. Forgetting: mean exact match over the six general tasks, and their "
        "mean answer-token loss, on held-out general examples.",
        "- Every ± is the standard deviation over seeds; Δ columns are the mean ± std over seeds of the per-seed "
        "(paired) difference.",
        "",
        "### Learning rates (seed 0, validation split only)",
        "",
        "Families: full-network (Full, w/o attn), head-restricted (every ALPS/Random/LC/control row; chosen on the "
        "mean of ALPS 10%, Random 10% and LC 10%), LoRA. Criterion: validation task accuracy, ties broken by lower "
        "general loss.",
        "",
        "| Family | lr | Method | Val task acc % | Val general acc % | Val general loss |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in exp.sweep:
        mark = " **(chosen)**" if exp.lr[r.family] == r.lr else ""
        lines.append(
            f"| {r.family} | {r.lr:.0e}{mark} | {r.method} | {100 * r.task_acc:.1f} | {100 * r.gen_acc:.1f} | "
            f"{r.gen_loss:.3f} |"
        )
    lines += ["", "## Table 1: main comparison (dataset A)", ""]
    lines += _table(main, full, base_gen)
    alps = main["ALPS 10%"]
    lines += [
        "",
        "Paired difference ALPS 10% minus each method (task accuracy, points): "
        + "; ".join(f"{k} {_paired(alps, v, 'task_acc')}" for k, v in main.items() if k != "ALPS 10%")
        + ".",
    ]
    lines += ["", "## Table 1b: controls for the selection", ""]
    ctrl = {"ALPS 10%": main["ALPS 10%"], **_group(exp.runs, "controls")}
    lines += _table(ctrl, full, base_gen)
    lines += [
        "",
        "Paired difference ALPS 10% minus each control (task accuracy, points): "
        + "; ".join(f"vs {k}: {_paired(main['ALPS 10%'], v, 'task_acc')}" for k, v in ctrl.items() if k != "ALPS 10%")
        + ".",
        "",
        "## Table 2: ratio ablation",
        "",
    ]
    ratio = {"ALPS 10%": main["ALPS 10%"], **_group(exp.runs, "ratio")}
    lines += _table(ratio, full, base_gen)
    lines += ["", "## Table 3: metric ablation (10% of heads)", ""]
    metric = {"ALPS 10% (pad)": main["ALPS 10%"], **_group(exp.runs, "metric")}
    lines += _table(metric, full, base_gen)
    overlap = [
        f"{m}: {len(set(exp.sel[f'metric_{m}'].heads) & set(exp.sel['alps'].heads))}/{len(exp.sel['alps'].heads)}"
        for m in s.metrics
    ]
    lines += ["", "Heads shared with the PAD selection: " + ", ".join(overlap) + "."]
    lines += ["", "## Table 4: transfer to dataset B (same task, other phrasing)", ""]
    transfer = _group(exp.runs, "transfer", "add_b")
    lines += _table(transfer, transfer["Full"], base_gen)
    shared = len(set(exp.sel["alps"].heads) & set(exp.sel["alps_from_b"].heads))
    lines += [
        "",
        f"Heads localized on A and on B share {shared} of {len(exp.sel['alps'].heads)} heads. Paired difference "
        "heads-from-A minus heads-from-B: "
        f"{_paired(transfer['ALPS 10%, heads from A'], transfer['ALPS 10%, heads from B'], 'task_acc')} pts; "
        f"heads-from-A minus Random: {_paired(transfer['ALPS 10%, heads from A'], transfer['Random 10%'], 'task_acc')}"
        " pts.",
    ]
    lines += ["", "## Table 5: forgetting on the general corpus (dataset A runs)", ""]
    tasks = list(data.GENERAL_TASKS)
    lines += [
        "| Method | General acc % | Δ vs base (pts) | General loss (base "
        f"{exp.base_general['loss']:.3f}) | " + " | ".join(tasks) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(tasks),
        f"| Base (before fine-tuning) | {100 * base_gen:.1f} | 0 | {exp.base_general['loss']:.3f} | "
        + " | ".join(f"{100 * exp.base_general['per_task'][t]:.0f}" for t in tasks)
        + " |",
    ]
    for name, rs in {**main, **_group(exp.runs, "controls")}.items():
        drops = [100 * (r.gen_acc - base_gen) for r in rs]
        sd = statistics.stdev(drops) if len(drops) > 1 else 0.0
        lines.append(
            f"| {name} | {_ms([r.gen_acc for r in rs])} | {statistics.mean(drops):+.1f} ± {sd:.1f} | "
            f"{_ms([r.gen_loss for r in rs], pct=False)} | "
            + " | ".join(f"{statistics.mean(100 * r.gen_per_task[t] for r in rs):.0f}" for t in tasks)
            + " |"
        )
    lines += [
        "",
        "Paired difference in general accuracy, ALPS 10% minus: "
        + "; ".join(f"{k} {_paired(main['ALPS 10%'], main[k], 'gen_acc')}" for k in main if k != "ALPS 10%")
        + " (points).",
        "",
        "## Figures",
        "",
    ]
    for p in figure_paths:
        rel = os.path.relpath(p, os.path.dirname(os.path.abspath(path)))
        lines.append(f"![{os.path.basename(p)}]({rel})")
    lines += ["", "## Selection (ALPS 10%, PAD)", "", "```", exp.sel["alps"].summary(), "```", ""]
    default = "(No interpretation written for this run yet: read the tables above.)"
    interpretation = _kept_section(path, INTERPRETATION_START, INTERPRETATION_END) or default
    lines += ["## Interpretation", "", INTERPRETATION_START, interpretation, INTERPRETATION_END, ""]
    bench = _kept_section(path, BENCH_START, BENCH_END)
    if bench:
        lines += ["## Training cost (bench_train.py)", "", BENCH_START, bench, BENCH_END, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _kept_section(path: str, start: str, end: str) -> str:
    """Text between the markers in an existing report (hand-written interpretation, bench_train's table), or ''."""
    if not os.path.isfile(path):
        return ""
    text = open(path).read()
    if start in text and end in text:
        return text.split(start, 1)[1].split(end, 1)[0].strip()
    return ""
