"""The configuration of `real_model.reproduce`: sizes (default, --quick, --device cuda), what the calibration runs
measured to choose them, and the arms (selections and references) with their learning-rate families."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Sizes:
    """Every size, step count and learning-rate grid of a run (recorded in config.json and the report)."""

    families: dict[str, str] = field(
        default_factory=lambda: {"arithmetic": "addition", "text": "reverse8", "times": "times2"}
    )
    # Families held out from the choice of the recommendation: only the pre-registered arms run on them (`arms_on`).
    heldout: list[str] = field(default_factory=lambda: ["times"])
    split_a: int = 1000
    split_b: int = 1000
    val: int = 100
    test: int = 200
    batch: int = 16
    steps: int = 30
    task_model_steps: int = 60
    task_model_lr: float = 1e-4
    lr_grid: dict[str, list[float]] = field(
        default_factory=lambda: {"heads": [1e-3, 3e-3, 1e-2], "full": [3e-5, 1e-4, 3e-4], "lora": [1e-3, 3e-3, 1e-2]}
    )
    main_seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    other_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    knowledge_candidates: int = 10_000
    knowledge: int = 100
    knowledge_new_tokens: int = 10
    ppl_tokens: int = 1024
    ppl_seq: int = 256
    greedy_check: int = 50
    eval_batch: int = 50
    ratio: float = 0.1
    lora_rank: int = 8
    weight_decay: float = 0.1
    data_seed: int = 0


# Fields of Sizes that a run's directory may gain or grow without refusing to resume (`Store.check_config`): a new
# family only adds result files.
GROWABLE = ("families", "heldout")

QUICK = Sizes(  # every family: the transfer part needs two, and the held-out family its smallest path
    families={"arithmetic": "addition", "text": "reverse8", "times": "times2"},
    split_a=48,
    split_b=48,
    val=12,
    test=12,
    batch=4,
    steps=2,
    task_model_steps=2,
    lr_grid={"heads": [1e-3], "full": [3e-5], "lora": [1e-3]},
    main_seeds=[0],
    other_seeds=[0],
    knowledge_candidates=16,
    knowledge=8,
    ppl_tokens=256,
    ppl_seq=128,
    greedy_check=4,
    eval_batch=16,
)
# A GPU affords more seeds and evaluation items; the steps stay those calibrated for separable arms.
CUDA = dataclasses.replace(
    Sizes(),
    val=500,
    test=1000,
    main_seeds=list(range(10)),
    other_seeds=list(range(5)),
    knowledge=1000,
    ppl_tokens=16384,
    greedy_check=200,
    eval_batch=200,
)

# What was measured to choose the sizes (2 shared CPU cores; shown in the report's sizes section).
CALIBRATION = [
    "Base model, 100 validation items each, teacher-forced and real greedy decoding agreeing on every item checked: "
    "0% on 3-digit addition, two-step 2-digit arithmetic, sorting 5 words alphabetically, reversing 7 words.",
    "Random-10% (seed-0 draw), head-only, 30 steps x 16 (same schedule as the run), 100 validation items: "
    "addition 32% after 20 and 45% after 30 steps at lr 1e-3, 52% at 3e-3; sorting 5 words 9% at 1e-3 and 21% at "
    "3e-3 (too close to the 20% floor: not used); reversing 7 words 30% at 1e-3 and 74% at 3e-3 (close to the "
    "85% ceiling: not used); reversing 8 words 54% at 3e-3 (used). Both families therefore sit mid-range at the "
    "head lr the sweep is expected to pick.",
    "Full fine-tune of addition at lr 1e-4 (60-step schedule): 55% after 30 steps, 75% after 60: the task model "
    "is that run (60 steps at 1e-4 on split A).",
    "Cost on 2 cores when the machine was otherwise idle: a head-only step (batch 16, reversing 8 words) 2.0-2.3 s, "
    "a full fine-tuning step 2.2 s, teacher-forced evaluation of 100 items 5 s; while other jobs shared the cores "
    "(load average 5-7) the same steps took 8-18 s. At the idle costs the full run is about 2.3 h of jobs.",
    "Knowledge questions: of the 211 candidates the base answers 84 right within 8 new tokens (its replies are "
    "sentences: 'The capital of France is Paris.') and 129 within 10: 10 new tokens, 100 questions kept.",
    "Held-out family (calibrated before any of its arms ran; the arms, seeds and comparisons were fixed first): "
    "key/value facts to one line of JSON with the keys in a fixed order scored 0% on the base with 3-6 facts but 100% "
    "on validation for Random-10% at 3e-3 at every count (a copy task): not used. People to a JSON list youngest "
    "first (base 0%): 3 people 19% at 3e-3 and 19% at 1e-2; 2 people 46% at 3e-3, but its sweep and first runs sat at "
    "chance (about 50%: the format learned, the order of the two people a coin flip; kept under discarded/). Added "
    "criterion: above the score of a model that learned only the format. Dates to ISO (base 0%): 2 dates 87% and 3 "
    "dates 94% at 1e-3 (too easy). 12-hour to 24-hour times (base 0%; copying the hours scores (11/24)^n): 3 times "
    "10% at 1e-3 (the copy score) and 26% at 3e-3; 2 times 50% at 3e-3 against a copy score of 21% (used).",
    "Learning-rate grids: 3e-3 beat 1e-3 for head-only training on both families, so the head grid brackets it "
    "(1e-3, 3e-3, 1e-2); full fine-tuning at 1e-4 learned addition steadily, so its grid is 3e-5, 1e-4, 3e-4.",
]


@dataclass(frozen=True)
class Arm:
    label: str
    lr_family: str  # "heads" | "full" | "lora"
    many_seeds: bool = False  # 5 seeds (main_seeds) instead of 3 (other_seeds)


ARMS = {
    "alps": Arm("ALPS (PAD, task model)", "heads", True),
    "alps_probe": Arm("ALPS-probe (trainer's probe)", "heads"),
    "random": Arm("Random", "heads", True),
    "random_footprint": Arm("Random, ALPS footprint", "heads"),
    "lowest": Arm("Lowest-10% PAD", "heads"),
    "importance": Arm("Importance-10%", "heads", True),
    "importance_lowest": Arm("Importance-lowest-10%", "heads"),
    "full": Arm("Full", "full"),
    "lora": Arm("LoRA r8 (q/k/v)", "lora"),
    # The candidate formed from the first two families' results, tested on the held-out family only.
    "random_upper": Arm("Random from the more important half", "heads", True),
}
CANDIDATE_ARMS = ("random_upper",)
# What the held-out family runs (the pre-registered arms; Table 1's + rest arms come from the table1 part).
HELDOUT_ARMS = ("alps", "random", "importance", "random_upper", "full", "lora")
SWEEP_ARM = {"heads": "random", "full": "full", "lora": "lora"}  # the arm whose seed-0 run picks the family's lr
NEEDS_TASK_MODEL = ("alps", "random_footprint", "lowest")
# Order of information: the question first, then the controls, then the references.
STAGES = (
    ("alps", "random", "importance", "random_upper"),
    ("random_footprint", "lowest", "importance_lowest", "alps_probe"),
)


def arms_on(fam: str, heldout: list[str], arms: list[str] | None = None) -> list[str]:
    """The head-choice arms that run on family `fam` (of `arms`, default all): the pre-registered ones on a held-out
    family, every arm but the candidate elsewhere."""
    arms = list(ARMS) if arms is None else arms
    if fam in heldout:
        return [a for a in arms if a in HELDOUT_ARMS]
    return [a for a in arms if a not in CANDIDATE_ARMS]
