"""The pre-registered test of the recommendation (PREREGISTRATION.md in the output directory) on the held-out family,
and the head sources compared in each setting across every family: the evidence the README's recommendation rests on.

Head sources, cheapest first (`SOURCES`): random heads (free), importance and the candidate (a few forward/backward
passes), PAD against a task model (a fine-tune). Head-only runs are the head-choice arms (`runs/<family>/<arm>`); with
the rest training they are Table 1's variants (`ablations/table1/<family>/<variant>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.real_model.stats import paired
from benchmarks.real_model.store import Store
from benchmarks.real_model.tables import MISSING, fmt_bootstrap, fmt_interval

HEAD_ONLY, REST = "head-only", "rest"


@dataclass(frozen=True)
class Source:
    name: str  # head-choice arm (head-only) or Table 1 variant (rest)
    label: str
    setting: str


SOURCES = {
    HEAD_ONLY: (
        Source("random", "Random", HEAD_ONLY),
        Source("importance", "Importance", HEAD_ONLY),
        Source("random_upper", "Random from the more important half", HEAD_ONLY),
        Source("alps", "ALPS (PAD, task model)", HEAD_ONLY),
    ),
    REST: (
        Source("random_rest", "Random + rest", REST),
        Source("importance_rest", "Importance + rest", REST),
        Source("alps_rest", "ALPS + rest", REST),
    ),
}
SETTING_LABEL = {HEAD_ONLY: "head-only training", REST: "the rest of the network trains (the paper's setting)"}


@dataclass(frozen=True)
class Comparison:
    key: str
    setting: str
    a: str
    b: str
    holds_if: str  # "above": the t interval is above 0; "not_below": it is not below 0


PREREGISTERED = (
    Comparison("P1", REST, "alps_rest", "random_rest", "above"),
    Comparison("P2", REST, "alps_rest", "importance_rest", "not_below"),
    Comparison("P3", HEAD_ONLY, "importance", "random", "not_below"),
    Comparison("P4", HEAD_ONLY, "random_upper", "random", "above"),
)
CRITERION = {"above": "interval above 0", "not_below": "interval not below 0"}


def source_runs(store: Store, fam: str, source: Source) -> list[dict]:
    if source.setting == HEAD_ONLY:
        return store.runs(fam, source.name)
    return store.ablation_runs("table1", fam, source.name)


def _label(name: str) -> str:
    return next(s.label for sources in SOURCES.values() for s in sources if s.name == name)


def verdict(p: dict | None, holds_if: str, seeds: int) -> str:
    """'holds' / 'fails' by the pre-registered criterion on the t interval over seeds, or 'pending' before every
    seed has both runs (and no verdict from a single seed)."""
    n = 0 if p is None else len(p["seeds"])
    if p is None or n < seeds:
        return f"pending ({n}/{seeds} seeds)"
    if n < 2:
        return "no interval (1 seed)"
    _, low, high = p["em"]
    return "holds" if (low > 0 if holds_if == "above" else high >= 0) else "fails"


def beats(p: dict | None) -> bool:
    """Whether the row's source beats the other at the seed level: its paired t interval is above 0."""
    return p is not None and len(p["seeds"]) >= 2 and p["em"][1] > 0


def collect(store: Store, meta: dict) -> dict:
    """The held-out verdicts and, per setting, every source's runs and paired differences on every family."""
    sizes = meta["sizes"]
    seeds = len(sizes["main_seeds"])
    runs = {
        setting: {fam: {s.name: source_runs(store, fam, s) for s in sources} for fam in sizes["families"]}
        for setting, sources in SOURCES.items()
    }
    out: dict[str, Any] = {"heldout": {}, "settings": {}, "seeds": seeds}
    for fam in sizes.get("heldout", []):
        rows = []
        for c in PREREGISTERED:
            p = paired(runs[c.setting][fam][c.a], runs[c.setting][fam][c.b])
            rows.append({"comparison": c.__dict__, "paired": p, "verdict": verdict(p, c.holds_if, seeds)})
        out["heldout"][fam] = rows
    for setting, sources in SOURCES.items():
        table = []
        for s in sources:
            row: dict[str, Any] = {"source": s.name, "label": s.label, "families": {}}
            for fam, by_source in runs[setting].items():
                mine = by_source[s.name]
                if not mine:
                    continue
                others = {o: paired(r, mine) for o, r in by_source.items() if o != s.name and r}
                row["families"][fam] = {
                    "runs": len(mine),
                    "minus_random": None if s.name == sources[0].name else paired(mine, by_source[sources[0].name]),
                    "beaten_by": [_label(o) for o, p in others.items() if beats(p)],
                }
            table.append(row)
        out["settings"][setting] = {"rows": table, "recommended": _cheapest_unbeaten(table)}
    return out


def _cheapest_unbeaten(rows: list[dict]) -> str | None:
    """The pre-registered rule: the cheapest source (rows are in cost order) that ran somewhere and that no other
    source beats with a seed-level interval above 0 on any family."""
    for row in rows:
        fams = row["families"].values()
        if fams and not any(f["beaten_by"] for f in fams):
            return row["label"]
    return None


def section(d: dict, families: list[str]) -> list[str]:
    """Markdown: the held-out verdict table, then the sources of each setting on every family."""
    lines = ["## The recommendation against the held-out family", ""]
    for fam, rows in d["heldout"].items():
        lines += [
            f"Family `{fam}` (held out: the rule and its test were written before it ran). Paired differences of "
            "exact match on the test items, points: mean [95% t interval over seeds]; [95% paired item bootstrap].",
            "",
            "| | Comparison | Seeds | EM diff [t] | [bootstrap] | The rule holds if | Verdict |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for r in rows:
            c, p = r["comparison"], r["paired"]
            name = f"{_label(c['a'])} − {_label(c['b'])}"
            if p is None:
                lines.append(
                    f"| {c['key']} | {name} | 0 | {MISSING} | {MISSING} | {CRITERION[c['holds_if']]} | "
                    f"{r['verdict']} |"
                )
                continue
            lines.append(
                f"| {c['key']} | {name} | {len(p['seeds'])} | {fmt_interval(p['em'])} | "
                f"{fmt_bootstrap(p)} | {CRITERION[c['holds_if']]} | **{r['verdict']}** |"
            )
        lines.append("")
    lines += [
        "### Every head source on every family",
        "",
        "Per setting, each source minus random heads (paired over seeds, points: mean [95% t]), and the sources that "
        "beat it with a seed-level interval above 0. The rule picks the cheapest source that no other beats on any "
        "family (cost: random, then importance and the candidate, then PAD with a task model).",
        "",
    ]
    for setting, t in d["settings"].items():
        lines += [
            f"**{SETTING_LABEL[setting]}**: the rule picks **{t['recommended'] or MISSING}**.",
            "",
            "| Source | " + " | ".join(f"{f}: − Random" for f in families) + " | Beaten by |",
            "|---|" + "---:|" * len(families) + "---|",
        ]
        for row in t["rows"]:
            cells, beaten = [], []
            for fam in families:
                f = row["families"].get(fam)
                if f is None:
                    cells.append("not run")
                    continue
                p = f["minus_random"]
                cells.append("—" if p is None else f"{fmt_interval(p['em'])} ({len(p['seeds'])})")
                beaten += [f"{b} on {fam}" for b in f["beaten_by"]]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + f" | {', '.join(beaten) or 'none'} |")
        lines.append("")
    return lines
