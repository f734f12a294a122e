"""`AlpsDPOTrainer`: TRL's `DPOTrainer` that trains only the localized attention heads, without a second model.

The reference model (no ``ref_model`` given) is chosen to be exact and as cheap as possible:

- ``alps_train_non_attention=False``: only the selected q/k/v rows move, so the policy itself computes
  as the reference inside `Restriction.reference` (original rows swapped in / deltas off). This is
  `AlpsReferenceModel`: no parameters, no copy.
- ``alps_train_non_attention=True`` (default): MLP, norms and embeddings train too, and recovering
  their original values would take a near-full copy. Instead the reference log-probs are computed
  once, before training, from the untouched policy (TRL's ``precompute_ref_log_probs``): one
  forward pass over the data, no copy kept. TRL caches them in a file beside the dataset's files
  and every rank reads that file back; an in-memory dataset (``Dataset.from_dict``/``from_list``)
  has no such files and TRL would write into a per-process temporary directory that the other
  ranks cannot see (FileNotFoundError on rank 1). With several processes and an in-memory dataset,
  `_precompute_ref_logps` therefore keeps the log-probs in memory: every rank receives all of them
  through the same gather TRL uses and attaches them as columns, no file involved. Only an
  IterableDataset (train or eval) cannot be precomputed; then the reference is a frozen copy of the
  initial model, as in plain DPO.
- A ``ref_model`` given by the user, or ``precompute_ref_log_probs=True``, is respected as is.

`choose_reference` makes that choice from the arguments alone (a pure function); it is logged once at startup
(main process) and kept in ``trainer.reference_kind``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate.utils import tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import get_config_model_id

from alps_trl.trainers.config import alps_arguments_of
from alps_trl.trainers.mixin import ALPS_PAPER, AlpsTrainerMixin
from alps_trl.trainers.reference import AlpsReferenceModel

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
        bound = self._alps_bind((model, ref_model, args, *rest), kwargs)
        kind = choose_reference(args, model, ref_model, bound.get("train_dataset"), bound.get("eval_dataset"))
        reference = None
        if kind == "parameter-free":
            reference = ref_model = AlpsReferenceModel(model)
        elif kind == "precomputed":
            args.precompute_ref_log_probs = True
        elif kind == "copy" and not isinstance(model, str):
            ref_model = copy.deepcopy(model)
        self.reference_kind = kind
        self._alps_reference_module = reference
        super().__init__(model, ref_model, args, *rest, **kwargs)

    def _alps_after_trl_init(self) -> None:
        """Right after DPOTrainer.__init__, before the mixin localizes (the probe and importance call the DPO loss)."""
        if self.accelerator.is_main_process:
            logger.warning(f"ALPS DPO reference: {self.reference_kind} ({REFERENCE_KINDS[self.reference_kind]}).")
        reference = self._alps_reference_module
        if reference is not None:
            # TRL prepared and patched the reference like a full model; use the bare module: it runs the policy,
            # which already carries TRL's fused LM head.
            reference.__dict__.pop("forward", None)
            self.ref_model = reference
            reference.set_context(self._alps_reference_context)

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """TRL's precompute, or, with several processes and an in-memory dataset, the same log-probs kept in memory.

        TRL's file cache works only where every rank can read the main process's file: beside a dataset that has
        cache files. Otherwise every rank runs the same forward passes over its shard of the data (as TRL does),
        gathers the log-probs of all ranks, and attaches them as the float32 columns ``ref_chosen_logps`` and
        ``ref_rejected_logps`` [len(dataset)], which is what TRL's cache file would have held.
        """
        if (
            isinstance(dataset, IterableDataset)
            or self.accelerator.num_processes == 1
            or getattr(dataset, "cache_files", None)
        ):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        logger.info(
            f"ALPS DPO: the {name} dataset lives in memory only; keeping its reference log-probs in memory on every "
            "process instead of TRL's cache file."
        )
        chosen, rejected = self._alps_gathered_ref_logps(dataset, name, batch_size)
        if chosen.numel() != len(dataset):
            raise RuntimeError(f"Gathered {chosen.numel()} reference log-probs for {len(dataset)} {name} examples.")
        columns = Dataset.from_dict(
            {"ref_chosen_logps": chosen.float().numpy(), "ref_rejected_logps": rejected.float().numpy()}
        )
        return concatenate_datasets([dataset, columns], axis=1)

    def _alps_gathered_ref_logps(self, dataset: Any, name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of every example, in dataset order, on every rank: (chosen [N], rejected [N]) CPU."""
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            shuffle=False,
        )
        loader = self.accelerator.prepare(loader)
        if self.ref_model is None and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        bar = tqdm(loader, desc=f"Computing reference log probs for {name} dataset", disable=self.args.disable_tqdm)
        for batch in bar:
            # gather_for_metrics drops the samples the sharded loader repeats to even out the last batch.
            c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        return torch.cat(chosen), torch.cat(rejected)

    def _alps_reference_context(self):
        if self._alps_probe_reference is not None:
            return self._alps_probe_reference()
        return self.restriction.reference(self.model)


REFERENCE_KINDS = {
    "parameter-free": "the policy with the original attention rows, no copy",
    "precomputed": "reference log-probs computed once before training from the untouched model, no copy kept",
    "user": "the ref_model passed to the trainer",
    "copy": "a frozen copy of the initial model: an IterableDataset cannot be precomputed; use a map-style "
    "datasets.Dataset, or alps_train_non_attention=False, to avoid it",
}


def choose_reference(args: Any, model: Any, ref_model: Any, train_dataset: Any, eval_dataset: Any = None) -> str:
    """Which DPO reference a run gets (a key of `REFERENCE_KINDS`), from its arguments alone.

    `model` is a module or a name (TRL loads it); raises ValueError for ``sync_ref_model=True``, which would move a
    reference that ALPS does not keep.
    """
    if ref_model is not None:
        return "user"
    if args.precompute_ref_log_probs:
        return "precomputed"
    if getattr(args, "sync_ref_model", False):
        raise ValueError(
            "sync_ref_model=True moves the reference toward the policy, but ALPS keeps no reference copy to move. "
            "Pass an explicit ref_model, or set sync_ref_model=False."
        )
    if not alps_arguments_of(args).alps_train_non_attention and not _sharded_backend(args):
        if not isinstance(model, str):
            return "parameter-free"
    if _can_precompute(args, train_dataset, eval_dataset):
        return "precomputed"
    return "copy"


def _can_precompute(args: Any, train_dataset: Any, eval_dataset: Any = None) -> bool:
    """Whether the reference log-probs can be precomputed: map-style train (and eval) data.

    In-memory datasets qualify with any number of processes (`AlpsDPOTrainer._precompute_ref_logps`).
    """
    if train_dataset is None or isinstance(train_dataset, IterableDataset):
        return False
    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    return not any(isinstance(e, IterableDataset) for e in evals)


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
