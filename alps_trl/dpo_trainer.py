"""`AlpsDPOTrainer`: TRL's `DPOTrainer` that trains only the localized attention heads, without a second model.

The reference model (no ``ref_model`` given) is chosen to be exact and as cheap as possible:

- ``alps_train_non_attention=False``: only the selected q/k/v rows move, so the policy itself computes
  as the reference inside `Restriction.reference` (original rows swapped in / deltas off). This is
  `AlpsReferenceModel`: no parameters, no copy.
- ``alps_train_non_attention=True`` (default): MLP, norms and embeddings train too, and recovering
  their original values would take a near-full copy. Instead the reference log-probs are computed
  once, before training, from the untouched policy (TRL's ``precompute_ref_log_probs``): one
  forward pass over the data, no copy kept. An IterableDataset (or, with several processes, an
  in-memory dataset: ranks share TRL's precompute cache through files) cannot be precomputed; then
  the reference is a frozen copy of the initial model, as in plain DPO.
- A ``ref_model`` given by the user, or ``precompute_ref_log_probs=True``, is respected as is.
"""

from __future__ import annotations

import copy
from typing import Any

from datasets import IterableDataset
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from alps_trl.config import alps_arguments_of
from alps_trl.reference import AlpsReferenceModel
from alps_trl.trainer_mixin import ALPS_PAPER, AlpsTrainerMixin

logger = logging.get_logger(__name__)


class AlpsDPOTrainer(AlpsTrainerMixin, DPOTrainer):
    """Drop-in replacement for `trl.DPOTrainer` (same arguments, plus ``head_selection=``).

    Use `alps_trl.AlpsDPOConfig` for the ``alps_*`` options; a plain `DPOConfig` uses their defaults.
    ``trainer.reference_kind`` says which reference is in use: "parameter-free", "precomputed",
    "user" or "copy" (see the module docstring).
    """

    _tag_names = [*DPOTrainer._tag_names, "alps"]
    _name = "DPO with ALPS"
    _paper = ALPS_PAPER

    def __init__(self, model: Any, ref_model: Any = None, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        alps = alps_arguments_of(args)
        train_dataset = kwargs.get("train_dataset", rest[1] if len(rest) > 1 else None)
        reference = None
        if ref_model is not None:
            kind = "user"
        elif args.precompute_ref_log_probs:
            kind = "precomputed"
        elif getattr(args, "sync_ref_model", False):
            raise ValueError(
                "sync_ref_model=True moves the reference toward the policy, but ALPS keeps no reference copy to move. "
                "Pass an explicit ref_model, or set sync_ref_model=False."
            )
        elif not alps.alps_train_non_attention and not _sharded_backend(args) and not isinstance(model, str):
            kind = "parameter-free"
            reference = ref_model = AlpsReferenceModel(model)
        elif _can_precompute(args, train_dataset):
            kind = "precomputed"
            args.precompute_ref_log_probs = True
        else:
            kind = "copy"
            if not isinstance(model, str):
                ref_model = copy.deepcopy(model)
            logger.warning(
                "ALPS DPO: the reference log-probs cannot be precomputed here (an IterableDataset, or an in-memory "
                "dataset with several processes, which share TRL's precompute cache through files), so the reference "
                "is a second copy of the model. Use a dataset loaded from files, or alps_train_non_attention=False."
            )
        self.reference_kind = kind
        super().__init__(model, ref_model, args, *rest, **kwargs)
        if reference is not None:
            # TRL prepared and patched the reference like a full model; use the bare module: it runs the policy,
            # which already carries TRL's fused LM head.
            reference.__dict__.pop("forward", None)
            self.ref_model = reference
            reference.set_context(self._alps_reference_context)

    def _alps_reference_context(self):
        if self._alps_probe_reference is not None:
            return self._alps_probe_reference()
        return self.restriction.reference(self.model)


def _can_precompute(args: Any, train_dataset: Any) -> bool:
    """TRL precomputes into a cache file beside the dataset: map-style data, on disk when several ranks read it."""
    if train_dataset is None or isinstance(train_dataset, IterableDataset):
        return False
    return args.world_size <= 1 or bool(getattr(train_dataset, "cache_files", None))


def _sharded_backend(args: Any) -> bool:
    """FSDP or DeepSpeed configured: the reference module would be wrapped by them, so precompute instead."""
    import os

    if args is None:
        return False
    if getattr(args, "deepspeed_plugin", None) is not None or getattr(args, "fsdp", None):
        return True
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    )
