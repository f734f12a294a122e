"""`AlpsSFTTrainer`: TRL's `SFTTrainer` that trains only the localized attention heads' q/k/v rows."""

from __future__ import annotations

from trl import SFTTrainer

from alps_trl.trainers.mixin import ALPS_PAPER, AlpsTrainerMixin


class AlpsSFTTrainer(AlpsTrainerMixin, SFTTrainer):
    """Drop-in replacement for `trl.SFTTrainer` (same arguments, plus ``head_selection=``).

    Use `alps_trl.AlpsSFTConfig` for the ``alps_*`` options; a plain `SFTConfig` uses their defaults
    (10% of heads, localized by a short attention-only probe on the training data). After
    construction, ``trainer.head_selection`` is the selection in use.
    """

    _tag_names = [*SFTTrainer._tag_names, "alps"]
    _name = "SFT with ALPS"
    _paper = ALPS_PAPER
