"""alps_trl: ALPS head localization and per-head restricted fine-tuning for TRL.

Exports are resolved lazily so that `alps-localize` starts without importing trl or the trainers.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AttentionLayout": "alps_trl.localization.anatomy",
    "HeadSelection": "alps_trl.localization.selection",
    "score_heads": "alps_trl.localization.scoring",
    "localize_heads": "alps_trl.localization.localize",
    "head_importance": "alps_trl.localization.importance",
    "AlpsArguments": "alps_trl.trainers.config",
    "AlpsSFTConfig": "alps_trl.trainers.config",
    "AlpsDPOConfig": "alps_trl.trainers.config",
    "AlpsGRPOConfig": "alps_trl.trainers.config",
    "AlpsTrainerMixin": "alps_trl.trainers.mixin",
    "AlpsSFTTrainer": "alps_trl.trainers.sft",
    "AlpsDPOTrainer": "alps_trl.trainers.dpo",
    "AlpsGRPOTrainer": "alps_trl.trainers.grpo",
    "merge_delta_checkpoint": "alps_trl.restriction.delta",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alps_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
