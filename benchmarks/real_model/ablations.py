"""The paper's ablations on the real model (`real_model.reproduce --parts ...`): what each part runs and how its heads
are chosen.

Parts, each mirroring one table of the ALPS paper:

- ``ratio`` (Table 4): ALPS, Random and Importance at several shares of the heads, head-only training.
- ``metric`` (Table 5): the top 10% by PAD, KL, Jensen-Shannon, Euclidean and cosine, all on one retrained task
  model (the head-choice recipe again; its PAD heads are compared with the head-choice run's).
- ``transfer`` (Table 2): the heads ALPS found on one family trained on the other family.
- ``table1`` (Table 1): the rest of the network trains too (`train_non_attention=True`): ALPS, Random, Importance
  and LC heads, "w/o attn" (every q/k/v row frozen), LoRA r128 on q/k/v, and Full.

Families: ratio and metric run on one family; transfer between the first two (`transfer_families`); Table 1 on all
three, the held-out family with only the pre-registered + rest variants (`table1_only`).

Seeds: every variant runs `AblationSizes.seeds`, except Table 1's main comparison (`table1_many_seed_variants`: ALPS,
Random and Importance + rest, and Full), which runs `table1_many_seeds` (`seeds_of`).

A variant that is exactly a head-choice arm (same heads, same training) is not run again: at the seeds that arm runs,
its result is that arm's file `runs/<family>/<arm>/seed<N>.json` (`Variant.reuse`, `reused`). At any other seed (Full
in Table 1 runs 5 seeds, the head-choice Full arm 3), and for every other variant, the variant trains (for a reused arm
exactly as the arm does) into `ablations/<part>/<family>/<variant>/seed<N>.json`, so the head-choice tables keep their
own seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from alps_trl.localization.scoring import METRICS
from alps_trl.localization.selection import (
    HeadSelection,
    num_selected,
    select_layer_consistent,
    select_random,
    select_top_k,
    selection_for_layout,
)

PARTS = ("ratio", "metric", "transfer", "table1")
HEAD_CHOICE = "headchoice"
PAPER_TABLE = {"ratio": "Table 4", "metric": "Table 5", "transfer": "Table 2", "table1": "Table 1"}
METRIC_LABELS = {"pad": "PAD (W1)", "kl": "KL", "js": "Jensen-Shannon", "euclidean": "Euclidean", "cosine": "cosine"}


@dataclass
class AblationSizes:
    """What the ablation parts run (kept in ablations/config.json); training sizes are the head-choice run's."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # Table 1's main comparison (the selections with the rest training, against each other and Full) runs more seeds.
    table1_many_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    table1_many_seed_variants: list[str] = field(
        default_factory=lambda: ["alps_rest", "random_rest", "importance_rest", "full"]
    )
    ratios: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.5])
    ratio_family: str = "arithmetic"
    metric_family: str = "arithmetic"
    table1_families: list[str] = field(default_factory=lambda: ["arithmetic", "text", "times"])
    # Families whose Table 1 runs only these variants: the held-out family runs the pre-registered + rest arms.
    table1_only: dict[str, list[str]] = field(
        default_factory=lambda: {"times": ["alps_rest", "random_rest", "importance_rest"]}
    )
    transfer_families: list[str] = field(default_factory=lambda: ["arithmetic", "text"])
    table1_lora_rank: int = 128
    # Own sweeps (Random's seed-0 run on validation picks, as in the head-choice part): LoRA r128, whose adapters move
    # the model far more than r8's at r8's rate; and 50% of the heads, where the 10% head rate (3e-3) diverged.
    lr_grid: dict[str, list[float]] = field(
        default_factory=lambda: {"lora128": [3e-4, 1e-3, 3e-3], "heads_50%": [3e-4, 1e-3]}
    )


ABLATION_QUICK = AblationSizes(
    seeds=[0],
    table1_many_seeds=[0],
    ratios=[0.05, 0.1],
    table1_families=["arithmetic", "times"],
    lr_grid={"lora128": [3e-4], "heads_5%": [1e-3]},
)


# Fields of AblationSizes that a run's directory may gain, or whose lists may grow, without refusing to resume: seeds
# and families only add result files, and no finished file depends on them (`Store.check_config`).
GROWABLE = ("table1_many_seeds", "table1_many_seed_variants", "table1_families", "table1_only", "transfer_families")


@dataclass(frozen=True)
class Variant:
    """One trained configuration of a part.

    heads: where the trained heads come from ("alps" | "random" | "importance" | "lc"), or None when `kind` says what
    trains ("wo_attn" | "lora" | "full"). heads_from: the family whose ALPS heads are used (transfer; None: the
    family trained on). lr_family: the sweep whose chosen learning rate the variant uses: a head-choice one, or one of
    `AblationSizes.lr_grid`, which the variant itself sweeps at seed 0 (its seed-0 result is the chosen point).
    """

    part: str
    name: str
    label: str
    kind: str = "heads"
    heads: str | None = None
    ratio: float = 0.1
    metric: str = "pad"
    heads_from: str | None = None
    rest_trains: bool = False
    lr_family: str = "heads"
    lora_rank: int = 8
    reuse: str | None = None


def seeds_of(v: Variant, sizes: AblationSizes) -> list[int]:
    """The seeds variant `v` runs."""
    if v.part == "table1" and v.name in sizes.table1_many_seed_variants:
        return sizes.table1_many_seeds
    return sizes.seeds


def all_seeds(sizes: AblationSizes) -> list[int]:
    """Every seed some variant runs."""
    return sorted(set(sizes.seeds) | set(sizes.table1_many_seeds))


def reused(v: Variant, seed: int, arm_seeds: list[int]) -> bool:
    """Whether `v`'s result at `seed` is its head-choice arm's file: `v` is that arm (`v.reuse`) and the arm runs
    `seed` (`arm_seeds`, the head-choice seeds of `v.reuse`). Otherwise `v` has its own file at `seed`."""
    return v.reuse is not None and seed in arm_seeds


def percent(ratio: float) -> str:
    return f"{100 * ratio:g}%"


def variants(part: str, fam: str, families: list[str], sizes: AblationSizes, default_ratio: float) -> list[Variant]:
    """The variants `part` trains on family `fam` (empty when the part does not use `fam`)."""
    if part == "ratio":
        if fam != sizes.ratio_family:
            return []
        labels = {"alps": "ALPS", "random": "Random", "importance": "Importance"}
        return [
            Variant(
                part,
                f"{src}_{percent(r)}",
                f"{labels[src]} {percent(r)}",
                heads=src,
                ratio=r,
                lr_family=f"heads_{percent(r)}" if f"heads_{percent(r)}" in sizes.lr_grid else "heads",
                reuse=src if r == default_ratio else None,
            )
            for src in labels
            for r in sizes.ratios
        ]
    if part == "metric":
        if fam != sizes.metric_family:
            return []
        # PAD too is retrained: training is not bit-reproducible across sittings, so every metric scores one model.
        return [Variant(part, m, METRIC_LABELS[m], heads="alps", metric=m) for m in METRICS]
    if part == "transfer":
        if fam not in sizes.transfer_families:
            return []
        return [
            Variant(part, f"from_{other}", f"ALPS heads of {other}", heads="alps", heads_from=other)
            for other in families
            if other != fam and other in sizes.transfer_families
        ]
    if part == "table1":
        if fam not in sizes.table1_families:
            return []
        rest = dict(rest_trains=True, lr_family="full")
        found = [
            Variant(part, "alps_rest", "ALPS 10% + rest", heads="alps", **rest),
            Variant(part, "random_rest", "Random 10% + rest", heads="random", **rest),
            Variant(part, "importance_rest", "Importance 10% + rest", heads="importance", **rest),
            Variant(part, "lc_rest", "LC 10% + rest", heads="lc", **rest),
            Variant(part, "wo_attn", "w/o attn (q/k/v frozen, rest trains)", kind="wo_attn", lr_family="full"),
            Variant(
                part,
                f"lora{sizes.table1_lora_rank}",
                f"LoRA r{sizes.table1_lora_rank} (q/k/v)",
                kind="lora",
                lr_family="lora128",
                lora_rank=sizes.table1_lora_rank,
            ),
            Variant(part, "full", "Full", kind="full", lr_family="full", reuse="full"),
        ]
        only = sizes.table1_only.get(fam)
        return found if only is None else [v for v in found if v.name in only]
    raise ValueError(f"Unknown part {part!r}; choose from {', '.join(PARTS)}.")


def sweeper(v: Variant) -> Variant:
    """The variant whose seed-0 runs pick `v`'s learning rate in `v`'s own sweep: Random heads at the same share for a
    head variant (as the head-choice sweep), else `v` itself."""
    if v.kind != "heads" or v.heads == "random":
        return v
    return replace(v, name=f"random_{percent(v.ratio)}", label=f"Random {percent(v.ratio)}", heads="random")


def at_ratio(scored: HeadSelection, ratio: float, layout, **provenance) -> HeadSelection:
    """The top `ratio` of `scored`'s heads by its scores (the library's tie-break), or `scored` itself at its ratio."""
    if abs(ratio - scored.ratio) < 1e-12:
        return scored
    k = num_selected(ratio, layout.num_layers, layout.num_heads)
    return selection_for_layout(
        layout,
        select_top_k(scored.scores, k),
        scores=scored.scores,
        metric=scored.metric,
        ratio=ratio,
        strategy="top_k",
        provenance={**scored.provenance, **provenance},
    )


def drawn(kind: str, layout, ratio: float, seed: int) -> HeadSelection:
    """Random ("random") or layer-consistent random ("lc") heads at `ratio`, seeded."""
    k = num_selected(ratio, layout.num_layers, layout.num_heads)
    if kind == "random":
        heads, strategy = select_random(layout.num_layers, layout.num_heads, k, seed), "random"
    else:
        heads, strategy = select_layer_consistent(layout.num_layers, layout.num_heads, k, seed), "layer_consistent"
    return selection_for_layout(
        layout, heads, metric="none", ratio=ratio, strategy=strategy, provenance={"seed": seed}
    )
