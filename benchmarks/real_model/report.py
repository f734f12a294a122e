"""The report built from whatever the output directory of `real_model.reproduce` holds (`store.Store`):
RESULTS_REAL.md, RESULTS_REAL.json and figures/. A missing piece shows as "missing", never as a number. Hand-written
text between the interpretation markers survives a rebuild."""

from __future__ import annotations

import glob
import os
import platform
import sys
import time
from typing import Any

import numpy as np

from benchmarks.common.run_info import git_commit, kept_section, package_versions, write_json, write_text
from benchmarks.real_model import ablation_tables as real_ablation_tables
from benchmarks.real_model import ablations as real_ablations
from benchmarks.real_model import figures as real_figures
from benchmarks.real_model import heldout as real_heldout
from benchmarks.real_model import tables as real_tables
from benchmarks.real_model.config import arms_on
from benchmarks.real_model.stats import overlap_stats, paired, spearman
from benchmarks.real_model.store import Store
from benchmarks.real_model.tables import MISSING

RESULTS_MD = "RESULTS_REAL.md"
RESULTS_JSON = "RESULTS_REAL.json"
MODEL = "SmolLM2-135M-Instruct"
INTERPRETATION_START = "<!-- interpretation:start -->"
INTERPRETATION_END = "<!-- interpretation:end -->"
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "numpy", "scipy", "alps_trl")


# ---- the report -----------------------------------------------------------------------------------------------


def _comparisons(arms: dict) -> list[tuple[str, str]]:
    out = [("alps", other) for other in arms if other != "alps"]
    out += [(a, "random") for a in arms if arms[a]["lr_family"] == "heads" and a not in ("alps", "random")]
    return out


def collect(store: Store, meta: dict) -> dict:
    """Everything the report shows, read from the store (JSON-serializable)."""
    sizes, arms = meta["sizes"], meta["arms"]
    data: dict[str, Any] = {"knowledge": store.load(store.knowledge()), "families": {}}
    for fam in sizes["families"]:
        on = {arm: arms[arm] for arm in arms_on(fam, sizes.get("heldout", []), list(arms))}
        runs = {arm: store.runs(fam, arm) for arm in on}
        sweeps = {
            lf: [store.load(store.sweep(fam, lf, lr)) or {"lr": lr, MISSING: True} for lr in grid]
            for lf, grid in sizes["lr_grid"].items()
        }
        chosen = {lf: (store.chosen_lr(fam, lf, grid) or (None, None))[0] for lf, grid in sizes["lr_grid"].items()}
        data["families"][fam] = {
            "base": store.load(store.base(fam)),
            "task_model": store.load(store.task_model(fam)),
            "runs": runs,
            "sweeps": sweeps,
            "chosen_lr": chosen,
            "paired": {f"{a} - {b}": paired(runs[a], runs[b]) for a, b in _comparisons(on)},
            "selections": _selections(store, fam, sizes),
        }
    data["analysis"] = _selection_analysis(data, sizes)
    if meta.get("ablation"):
        data["ablations"] = collect_ablations(store, meta)
        data["heldout"] = real_heldout.collect(store, meta)
    return data


def collect_ablations(store: Store, meta: dict) -> dict:
    """The ablation parts' runs (restricted to the ablation seeds), paired differences and selection overlaps."""
    from alps_trl.localization.selection import num_selected

    sizes, ab = meta["sizes"], meta["ablation"]
    ab_sizes = real_ablations.AblationSizes(**ab)
    fams, seeds = list(sizes["families"]), ab["seeds"]
    layers, heads = 30, 9  # SmolLM2-135M-Instruct

    def kept(runs: list[dict], wanted: list[int] = seeds) -> list[dict]:
        return [r for r in runs if r["seed"] in wanted]

    def head_choice(fam: str, arm: str, wanted: list[int] = seeds) -> list[dict]:
        return kept(store.runs(fam, arm), wanted)

    def arm_seeds(arm: str) -> list[int]:
        return sizes["main_seeds"] if meta["arms"][arm]["many_seeds"] else sizes["other_seeds"]

    def runs_of(fam: str, v: real_ablations.Variant) -> list[dict]:
        """`v`'s runs at its seeds: its head-choice arm's file where `v` reuses it, else its own."""
        wanted = real_ablations.seeds_of(v, ab_sizes)
        found = store.ablation_runs(v.part, fam, v.name)
        if v.reuse:
            shared = arm_seeds(v.reuse)
            found = [r for r in found if not real_ablations.reused(v, r["seed"], shared)]
            found += [r for r in store.runs(fam, v.reuse) if real_ablations.reused(v, r["seed"], shared)]
        return sorted(kept(found, wanted), key=lambda r: r["seed"])

    def variants(part: str, fam: str) -> list[real_ablations.Variant]:
        return real_ablations.variants(part, fam, fams, ab_sizes, sizes["ratio"])

    out: dict[str, Any] = {"seeds": seeds, "sweeps": []}
    for fam in fams:
        for lf, grid in ab["lr_grid"].items():
            points = [store.load(store.sweep(fam, lf, lr)) for lr in grid]
            if any(points):
                chosen = store.chosen_lr(fam, lf, grid)
                out["sweeps"].append(
                    {"family": fam, "lr_family": lf, "points": points, "grid": grid, "chosen": chosen and chosen[0]}
                )
    fam = ab["ratio_family"]
    rows = []
    for ratio in ab["ratios"]:
        runs = {v.heads: runs_of(fam, v) for v in variants("ratio", fam) if v.ratio == ratio}
        rows.append(
            {
                "ratio": ratio,
                "k": num_selected(ratio, layers, heads),
                "runs": runs,
                "paired": {f"{a} - random": paired(runs[a], runs["random"]) for a in ("alps", "importance")},
            }
        )
    # Runs kept from before a share got its own sweep (trained at the 10% head rate), reported as a note.
    earlier = glob.glob(store.path("ablations", "ratio_at_head_lr", fam, "*", "seed*.json"))
    out["ratio"] = {"family": fam, "rows": rows, "at_head_lr": [store.load(f) for f in sorted(earlier)]}

    fam = ab["metric_family"]
    found = variants("metric", fam)
    selections = {v.metric: store.load(store.selection(fam, f"metric_{v.metric}")) for v in found}
    pad, pad_runs = selections.get("pad"), runs_of(fam, next(v for v in found if v.metric == "pad"))
    random_runs = head_choice(fam, "random")
    rows = []
    for v in found:
        runs, sel = runs_of(fam, v), selections[v.metric]
        both = sel is not None and pad is not None
        rows.append(
            {
                "metric": v.metric,
                "label": v.label,
                "runs": runs,
                "k": len(pad["heads"]) if pad else None,
                "shared": overlap_stats(sel["heads"], pad["heads"], layers * heads)["overlap"] if both else None,
                "rho": spearman(sel["scores"], pad["scores"]) if both else None,
                "paired": {
                    "random": paired(runs, random_runs),
                    **({} if v.metric == "pad" else {"pad": paired(runs, pad_runs)}),
                },
            }
        )
    out["metric"] = {
        "family": fam,
        "rows": rows,
        "random": random_runs,
        "head_choice_alps": head_choice(fam, "alps"),
        "task_model": store.load(store.metric_task_model(fam)),
    }

    transfer: dict[str, Any] = {"families": {}}
    for fam in fams:
        for v in variants("transfer", fam):
            runs = {
                "own": head_choice(fam, "alps"),
                "transferred": runs_of(fam, v),
                "random": head_choice(fam, "random"),
            }
            transfer["families"][fam] = {
                "source": v.heads_from,
                "runs": runs,
                "paired": {k: paired(runs["transferred"], runs[k]) for k in ("own", "random")},
            }
    selections = [store.load(store.selection(f, "alps")) for f in fams]
    if len(selections) == 2 and all(selections):
        transfer["overlap"] = overlap_stats(selections[0]["heads"], selections[1]["heads"], layers * heads)
    out["transfer"] = transfer

    many, many_names = ab_sizes.table1_many_seeds, ab_sizes.table1_many_seed_variants
    table1: dict[str, Any] = {"families": {}, "many_seeds": many, "many_seed_variants": []}
    for fam in fams:
        found = variants("table1", fam)
        if not found:
            continue
        labels = table1["many_seed_variants"] + [v.label for v in found if v.name in many_names]
        table1["many_seed_variants"] = list(dict.fromkeys(labels))  # over every family, in order
        runs = {v.name: runs_of(fam, v) for v in found}
        rows = [{"label": v.label, "runs": runs[v.name], "seeds": real_ablations.seeds_of(v, ab_sizes)} for v in found]
        if "full" not in runs:  # a family whose Table 1 runs only some variants: Full is the head-choice arm's
            runs["full"] = head_choice(fam, "full", sizes["other_seeds"])
            rows.append({"label": "Full (head-choice arm)", "runs": runs["full"], "seeds": sizes["other_seeds"]})
        rows += [  # references at the many seeds: the head-choice arms have them
            {"label": label, "runs": head_choice(fam, arm, many), "seeds": many}
            for label, arm in (
                ("ALPS 10%, head-only (head-choice arm)", "alps"),
                ("Random 10%, head-only (head-choice arm)", "random"),
            )
        ]
        for row in rows:  # paired over the seeds both rows have
            row["paired"] = {
                key: paired(row["runs"], runs[key]) for key in ("full", "random_rest") if row["runs"] is not runs[key]
            }
        table1["families"][fam] = rows
    out["table1"] = table1
    return out


def _selections(store: Store, fam: str, sizes: dict) -> dict:
    out = {"alps": store.load(store.selection(fam, "alps"))}
    seeds = sorted(set(sizes["main_seeds"]) | set(sizes["other_seeds"]))
    for source in ("importance", "probe"):
        found = {s: store.load(store.selection(fam, f"{source}_seed{s}")) for s in seeds}
        out[source] = {s: v for s, v in found.items() if v is not None}
    return out


def _selection_analysis(data: dict, sizes: dict) -> dict:
    """Overlaps against the hypergeometric expectation, Spearman correlations, and PAD's concentration."""
    fams = data["families"]
    overlaps, correlations, concentration = [], [], {}
    total = None
    for fam, d in fams.items():
        alps = d["selections"]["alps"]
        if alps is None:
            continue
        total = alps["num_layers"] * alps["num_heads"]
        scores = np.array(alps["scores"]).reshape(-1)
        top = np.sort(scores)[::-1][: len(alps["heads"])]
        concentration[fam] = float(top.sum() / scores.sum())
        for source, label in (("importance", "Importance-10%"), ("probe", "ALPS-probe")):
            for seed, sel in d["selections"][source].items():
                overlaps.append(
                    {
                        "pair": f"{fam}: {label} (seed {seed}) vs ALPS",
                        **overlap_stats(sel["heads"], alps["heads"], total),
                    }
                )
                correlations.append(
                    {
                        "pair": f"{fam}: {sel['metric']} scores of {label} (seed {seed}) vs ALPS's PAD",
                        "rho": spearman(sel["scores"], alps["scores"]),
                    }
                )
    names = list(fams)
    for i, f1 in enumerate(names):
        for f2 in names[i + 1 :]:
            a, b = fams[f1]["selections"], fams[f2]["selections"]
            if a["alps"] and b["alps"]:
                overlaps.append(
                    {"pair": f"ALPS {f1} vs ALPS {f2}", **overlap_stats(a["alps"]["heads"], b["alps"]["heads"], total)}
                )
                correlations.append(
                    {"pair": f"PAD {f1} vs PAD {f2}", "rho": spearman(a["alps"]["scores"], b["alps"]["scores"])}
                )
            for seed in sorted(set(a["importance"]) & set(b["importance"])):
                sa, sb = a["importance"][seed], b["importance"][seed]
                overlaps.append(
                    {
                        "pair": f"Importance {f1} vs {f2} (seed {seed})",
                        **overlap_stats(sa["heads"], sb["heads"], total),
                    }
                )
                correlations.append(
                    {"pair": f"Importance {f1} vs {f2} (seed {seed})", "rho": spearman(sa["scores"], sb["scores"])}
                )
    return {"overlaps": overlaps, "spearman": correlations, "pad_top_share": concentration}


PREREGISTRATION = "PREREGISTRATION.md"


def write_report(store: Store, meta: dict, command: str) -> None:
    data = collect(store, meta)
    figures = real_figures.draw(store, data, meta)
    versions = package_versions(PACKAGES)
    commit = git_commit([store.root], short=False)
    write_json(
        store.path(RESULTS_JSON),
        {"model": MODEL, "command": command, "commit": commit, "versions": versions, **meta, **data},
    )
    md = _markdown(store, data, meta, command, commit, versions, figures)
    write_text(store.path(RESULTS_MD), md)


def _markdown(store, data, meta, command, commit, versions, figures) -> str:
    sizes = meta["sizes"]
    sittings = store.load(store.path("sittings.json")) or []
    job_wall = sum(sum(v) for v in store.job_times().values())
    lines = [
        f"# Does head choice matter on a real model? ALPS vs random and importance heads on {MODEL}",
        "",
        "Generated by `python -m benchmarks.real_model.reproduce` from the result files in its output directory; "
        'every number below comes from those files (a piece not yet run shows as "missing").',
        "",
        f"- Command (latest sitting): `{command}`",
        f"- Git commit: {commit}",
        "- Code of each sitting: "
        + (", ".join(dict.fromkeys(f"`{x['commit']}`" for x in sittings if x.get("commit"))) or "not recorded"),
        f"- Packages: python {sys.version.split()[0]}, " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Machine: {platform.platform()}, {os.cpu_count()} CPU cores",
        f"- Machine time: {job_wall / 3600:.2f} h of jobs over {len(sittings)} sitting(s)",
        f"- Report built (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}",
        "",
    ]
    lines += real_tables.sizes_section(data, meta)
    for fam in sizes["families"]:
        lines += real_tables.family_section(fam, data["families"][fam], meta)
    lines += real_tables.selection_section(data, sizes)
    if data.get("ablations"):
        lines += real_ablation_tables.sections(data["ablations"])
    lines += ["## Figures", ""]
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, store.root)})" for p in figures]
    # Written by hand before a held-out family runs, and copied here unchanged (the file's history dates it).
    if os.path.isfile(store.path(PREREGISTRATION)):
        with open(store.path(PREREGISTRATION)) as f:
            lines += ["", f.read().strip(), ""]
    if data.get("heldout"):
        lines += ["", *real_heldout.section(data["heldout"], list(sizes["families"]))]
    default = "(No interpretation written for this run yet: read the tables above.)"
    interpretation = kept_section(store.path(RESULTS_MD), INTERPRETATION_START, INTERPRETATION_END) or default
    lines += ["", "## Interpretation", "", INTERPRETATION_START, interpretation, INTERPRETATION_END, ""]
    return "\n".join(lines)
