"""The ablation sections of RESULTS_REAL.md: the ratio curve, the scoring metric, transfer and the paper's Table 1
setting, one table each, marked with the paper's table it mirrors. Input: `real_model.report.collect_ablations`."""

from __future__ import annotations

from benchmarks.real_model.ablations import PAPER_TABLE, percent
from benchmarks.real_model.tables import MISSING, fmt_bootstrap, fmt_interval, mean_std

DIFF_NOTE = (
    "Differences are paired (same seeds, same batches) over the seeds both rows have: mean [95% t interval over "
    "seeds] and, after the semicolon, [95% bootstrap over test items pooled across those seeds]. With 2 seeds the t "
    "interval is wide (t = 12.7 at 1 degree of freedom, 2.78 at 4 with 5 seeds); the bootstrap shows item noise only."
)


def _em(runs: list[dict], seeds: list[int]) -> str:
    if not runs:
        return MISSING
    return f"{mean_std([r['test']['exact_match'] for r in runs])} ({len(runs)}/{len(seeds)})"


SELF = "—"  # a row compared with itself


def _diff(paired: dict, key: str, pairs: bool = False) -> str:
    """The paired difference against `key`'s row; `pairs`: followed by the number of seeds it pairs."""
    if key not in paired:
        return SELF
    p = paired[key]
    if p is None:
        return MISSING
    n = f" ({len(p['seeds'])} seeds)" if pairs else ""
    return f"{fmt_interval(p['em'])}; {fmt_bootstrap(p)}{n}"


def _forgetting(runs: list[dict]) -> tuple[str, str]:
    if not runs:
        return MISSING, MISSING
    return mean_std([r["knowledge"]["accuracy"] for r in runs]), mean_std([r["ppl"] for r in runs], 1, 2)


def _trainable(runs: list[dict]) -> str:
    counts = sorted({r["trainable"] for r in runs})
    if not counts:
        return MISSING
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"


def _lr(runs: list[dict]) -> str:
    return ", ".join(sorted({f"{r['lr']:g}" for r in runs})) or MISSING


def sections(ab: dict) -> list[str]:
    """Every ablation part that has data or was planned: ratio, metric, transfer, Table 1."""
    seeds, t1 = ab["seeds"], ab["table1"]
    many = ""
    if t1.get("many_seed_variants") and t1.get("many_seeds") != seeds:
        many = (
            f" except in the Table 1 setting, where {', '.join(t1['many_seed_variants'])} and the head-only "
            f"references run seeds {t1['many_seeds']}"
        )
    lines = [
        "## The paper's ablations on this model",
        "",
        f"Same model, data, training sizes and learning-rate choice as above; seeds {seeds} for every row{many} (a "
        "row that is a head-choice arm is that arm's runs at these seeds, not a rerun; at a seed that arm does not "
        "run, the row trains exactly as the arm, into its own file). " + DIFF_NOTE,
        "",
    ]
    lines += _ratio(ab["ratio"], seeds)
    lines += _metric(ab["metric"], seeds)
    lines += _transfer(ab["transfer"], seeds)
    lines += _table1(t1)
    lines += _sweeps(ab["sweeps"])
    return lines


def _sweeps(sweeps: list[dict]) -> list[str]:
    if not sweeps:
        return []
    lines = [
        "### The ablations' own learning-rate sweeps (validation split, seed 0)",
        "",
        "| Family | Sweep | Run | lr | Val EM % | Val loss | Chosen |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for sw in sweeps:
        for lr, p in zip(sw["grid"], sw["points"]):
            if p is None:
                lines.append(f"| {sw['family']} | {sw['lr_family']} | | {lr:g} | {MISSING} | {MISSING} | |")
                continue
            mark = "**yes**" if sw["chosen"] == lr else ""
            lines.append(
                f"| {sw['family']} | {sw['lr_family']} | {p['variant']['label']} | {lr:g} | "
                f"{100 * p['val']['exact_match']:.1f} | {p['val']['loss']:.3f} | {mark} |"
            )
    return lines + [""]


def _ratio(d: dict, seeds: list[int]) -> list[str]:
    lines = [
        f"### How many heads? Exact match against the share of heads (mirrors the paper's {PAPER_TABLE['ratio']})",
        "",
        f"Family `{d['family']}`, head-only training (everything but the heads' q/k/v rows frozen) at the head "
        "learning rate chosen at 10%, except where a share has its own sweep (Random's seed-0 run on the "
        "validation split picks, as above). ALPS and Importance take the top of their scores, Random draws per seed.",
    ]
    for r in d.get("at_head_lr", []):
        lines.append(
            f"At the 10% head rate ({r['lr']:g}), {r['variant']['label']} (seed {r['seed']}) diverged: exact match "
            f"{100 * r['test']['exact_match']:.1f}%, perplexity {r['ppl']:.0f}; that share therefore sweeps its own."
        )
    lines += [
        "",
        "| Heads | k | lr | ALPS | Random | Importance | ALPS − Random | Importance − Random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in d["rows"]:
        runs = row["runs"]
        lr = _lr([r for found in runs.values() for r in found])
        lines.append(
            f"| {percent(row['ratio'])} | {row['k']} | {lr} | {_em(runs['alps'], seeds)} | "
            f"{_em(runs['random'], seeds)} | "
            f"{_em(runs['importance'], seeds)} | {_diff(row['paired'], 'alps - random')} | "
            f"{_diff(row['paired'], 'importance - random')} |"
        )
    return lines + ["", "![ratio curve](figures/ratio_curve.png)", ""]


def _metric(d: dict, seeds: list[int]) -> list[str]:
    lines = [
        f"### Which distance? The top 10% by each scoring metric (mirrors the paper's {PAPER_TABLE['metric']})",
        "",
        f"Family `{d['family']}`, head-only training. Every metric scores one task model: the head-choice task "
        "model's recipe run again (same batches and schedule), since training is not bit-reproducible across "
        "sittings.",
    ]
    check = d.get("task_model")
    if check:
        lines.append(
            f"Its PAD heads share {check['pad_heads_shared_with_head_choice']}/{len(check['heads']['pad'])} with the "
            f"head-choice run's (largest PAD score difference {check['pad_max_score_difference']:.2g}); that run's "
            "ALPS arm is shown as a reference."
        )
    lines += [
        "",
        "| Metric | Shared heads with PAD | Spearman rho vs PAD | Exact match % | Knowledge % | Perplexity "
        "| − PAD | − Random |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in d["rows"]:
        know, ppl = _forgetting(row["runs"])
        shared = MISSING if row["shared"] is None else f"{row['shared']}/{row['k']}"
        rho = MISSING if row["rho"] is None else f"{row['rho']:+.2f}"
        lines.append(
            f"| {row['label']} | {shared} | {rho} | {_em(row['runs'], seeds)} | {know} | {ppl} | "
            f"{_diff(row['paired'], 'pad')} | {_diff(row['paired'], 'random')} |"
        )
    for label, runs in (
        ("ALPS, head-choice task model (reference)", d["head_choice_alps"]),
        ("Random (reference)", d["random"]),
    ):
        lines.append(f"| {label} | | | {_em(runs, seeds)} | {' | '.join(_forgetting(runs))} | | |")
    return lines + [""]


def _transfer(d: dict, seeds: list[int]) -> list[str]:
    lines = [
        "### Transfer: heads found on one family, trained on the other "
        f"(mirrors the paper's {PAPER_TABLE['transfer']})",
        "",
        "Head-only training on the target family at its own head learning rate; the heads are the other family's "
        "ALPS selection (its task model, PAD).",
        "",
        "| Trained on | Heads | Exact match % | Knowledge % | Perplexity | − own ALPS | − Random |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for fam, row in d["families"].items():
        for label, key in (("own ALPS heads", "own"), (f"ALPS heads of {row['source']}", "transferred")):
            runs = row["runs"][key]
            know, ppl = _forgetting(runs)
            paired = row["paired"]
            diffs = f" | {SELF} | |" if key == "own" else f" | {_diff(paired, 'own')} | {_diff(paired, 'random')} |"
            lines.append(f"| {fam} | {label} | {_em(runs, seeds)} | {know} | {ppl}{diffs}")
        runs = row["runs"]["random"]
        lines.append(f"| {fam} | Random | {_em(runs, seeds)} | {' | '.join(_forgetting(runs))} | | |")
    if d.get("overlap"):
        o = d["overlap"]
        lines += [
            "",
            f"The two families' ALPS selections share {o['overlap']} heads ({o['expected']:.1f} expected at random, "
            f"P = {o['p']:.2g}).",
        ]
    return lines + [""]


def _table1(d: dict) -> list[str]:
    lines = [
        "### The paper's main setting: the rest of the network trains too "
        f"(mirrors the paper's {PAPER_TABLE['table1']})",
        "",
        "`alps_train_non_attention=True`: the MLPs, norms, embeddings and o_proj train as in full fine-tuning, and "
        'only the q/k/v rows of unselected heads stay frozen ("w/o attn": every q/k/v row frozen). These arms use '
        "Full's learning rate (they train almost the whole network); LoRA r128 (q/k/v only, the rest frozen, alpha "
        "256) has its own sweep. The head-only rows are the head-choice arms, for comparison. Exact match: mean ± "
        "std over the row's seeds (runs found / seeds planned); each difference pairs the seeds both rows have (their "
        "number after it).",
        "",
    ]
    for fam, rows in d["families"].items():
        lines += [
            f"Family `{fam}`:",
            "",
            "| Arm | Exact match % | Knowledge % | Perplexity | Trainable params | lr | − Full | − Random + rest |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            runs = row["runs"]
            know, ppl = _forgetting(runs)
            lines.append(
                f"| {row['label']} | {_em(runs, row['seeds'])} | {know} | {ppl} | {_trainable(runs)} | {_lr(runs)} | "
                f"{_diff(row['paired'], 'full', True)} | {_diff(row['paired'], 'random_rest', True)} |"
            )
        lines.append("")
    return lines
