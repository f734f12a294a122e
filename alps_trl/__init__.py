"""alps_trl: ALPS head localization and per-head restricted fine-tuning for TRL.

Exports are resolved lazily so that `alps-localize` starts without importing trl or the trainers.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AttentionLayout": "alps_trl.anatomy",
    "HeadSelection": "alps_trl.selection",
    "score_heads": "alps_trl.scoring",
    "localize_heads": "alps_trl.localize",
    "head_importance": "alps_trl.importance",
    "AlpsArguments": "alps_trl.config",
    "AlpsSFTConfig": "alps_trl.config",
    "AlpsDPOConfig": "alps_trl.config",
    "AlpsTrainerMixin": "alps_trl.trainer_mixin",
    "AlpsSFTTrainer": "alps_trl.sft_trainer",
    "AlpsDPOTrainer": "alps_trl.dpo_trainer",
    "merge_delta_checkpoint": "alps_trl.restriction.delta",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alps_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
