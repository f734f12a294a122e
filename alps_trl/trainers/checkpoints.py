"""What an ALPS delta-mode run writes into ``output_dir`` / ``checkpoint-*`` and how it reads it back.

Helpers of `AlpsTrainerMixin` (layer 5). A non-quantized base is saved as a standard checkpoint with
the deltas merged in, plus ``alps_delta.safetensors``; a quantized base cannot hold merged weights, so
its run saves only the delta file, the tokenizer, the training args and an ``alps-merge`` hint. Loading
(resume, ``load_best_model_at_end``) keeps the in-memory frozen base and restores the deltas from the
delta file, so the base (and the DPO reference) stay exactly the original model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.utils import logging

from alps_trl.localization.anatomy import unwrap_model
from alps_trl.localization.atomic import (
    cleanup_stale,
    fsync_path,
    is_write_error,
    output_error,
    sibling_path,
    write_text_atomic,
)
from alps_trl.restriction import is_quantized
from alps_trl.restriction.delta import load_delta_file, save_delta_file
from alps_trl.restriction.peft_export import AdapterInfo, save_adapter

logger = logging.get_logger(__name__)

DELTA_FILE = "alps_delta.safetensors"
MERGE_HINT_FILE = "ALPS_MERGE.md"
ADAPTER_DIR = "adapter"
# A checkpoint directory Trainer names (and `transformers.trainer_utils.get_last_checkpoint` finds), and the name an
# interrupted one is moved to: neither that function nor Trainer's checkpoint rotation (``checkpoint-*``) sees it.
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
INCOMPLETE_PREFIX = "incomplete-"


# ---- which checkpoints are complete ----------------------------------------------------------------
def checkpoint_problem(checkpoint: str) -> str | None:
    """Why `checkpoint` cannot be resumed from (a short reason), or None when it is a complete Trainer checkpoint.

    Trainer writes ``trainer_state.json`` last, after the model, the ALPS files, the optimizer, scheduler and RNG
    states: a directory without it, or with it cut short, is a save that was interrupted (a killed process).
    """
    if not os.path.isdir(checkpoint):
        return "it is not a directory"
    state = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        return f"it has no {TRAINER_STATE_NAME}: its save was interrupted"
    try:
        with open(state) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"its {TRAINER_STATE_NAME} is cut short or unreadable: its save was interrupted"
    if not isinstance(data, dict) or "global_step" not in data:
        return f"its {TRAINER_STATE_NAME} holds no global_step"
    return None


def _numbered_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the ``checkpoint-N`` directories in `output_dir`, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str, before_step: int | None = None) -> str | None:
    """The newest complete ``checkpoint-N`` in `output_dir` (with N < `before_step` if given), or None.

    `transformers.trainer_utils.get_last_checkpoint` returns the newest directory by name, complete or not.
    """
    for step, path in _numbered_checkpoints(output_dir):
        if (before_step is None or step < before_step) and checkpoint_problem(path) is None:
            return path
    return None


def set_aside_incomplete(output_dir: str, after_step: int) -> list[str]:
    """Rename the incomplete ``checkpoint-N`` directories with N > `after_step` to ``incomplete-checkpoint-N``
    (numbered further if taken), so that nothing resumes from them and the run's next save of step N starts clean.
    Nothing is deleted. Returns the new paths."""
    moved = []
    for step, path in _numbered_checkpoints(output_dir):
        if step <= after_step or checkpoint_problem(path) is None:
            continue
        target = os.path.join(output_dir, INCOMPLETE_PREFIX + os.path.basename(path))
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(output_dir, f"{INCOMPLETE_PREFIX}{os.path.basename(path)}.{suffix}")
        os.rename(path, target)
        moved.append(target)
    return moved


def checkpoint_step(checkpoint: str) -> int | None:
    """N of a ``checkpoint-N`` path, else None."""
    match = CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint)))
    return int(match.group(1)) if match else None


# Hidden staging directories of `staged_save` are named after this (inside the output directory).
STAGING_NAME = "alps-save"
# Weight files of a save_pretrained checkpoint: an earlier save's ones that the new save does not write are stale.
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def staged_save(output_dir: str, save: Callable[[str], Any]) -> None:
    """Run `save(directory)` (e.g. Trainer's `_save`) into a hidden staging directory inside `output_dir`, then move
    each file it wrote into `output_dir` with ``os.replace``.

    `output_dir` is shared with other files (checkpoint-* folders, logs), so it cannot be swapped as a whole;
    instead every file in it is the previous complete one or the new complete one, never part of one. The
    non-weight files move first, then the weight shards, then the shard index, and last the weight files of an
    earlier save that this one did not write are deleted (as `save_pretrained` does); a kill in the middle of the
    moves can leave old and new files side by side, each complete. A failed save (full disk, read-only
    directory) moves nothing: it raises an OSError naming the path and leaves `output_dir` as it was. The next
    save removes the staging directory a killed one left.
    """
    output_dir = os.path.abspath(output_dir)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as err:
        raise output_error(err, output_dir) from None
    anchor = os.path.join(output_dir, STAGING_NAME)
    cleanup_stale(anchor)
    staging = sibling_path(anchor)
    try:
        os.mkdir(staging)
        save(staging)
        names = sorted(os.listdir(staging), key=_move_order)
        for name in names:
            path = os.path.join(staging, name)
            if os.path.isfile(path):
                fsync_path(path)
        for name in names:
            _replace(os.path.join(staging, name), os.path.join(output_dir, name))
        for name in os.listdir(output_dir):
            if WEIGHT_FILE.match(name) and name not in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(output_dir, name))
        fsync_path(output_dir)
    except Exception as err:
        if is_write_error(err, staging):
            raise output_error(err, output_dir, staging) from err
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_order(name: str) -> tuple[int, str]:
    if not WEIGHT_FILE.match(name):
        return 0, name
    return (2 if name.endswith(".index.json") else 1), name


def _replace(source: str, target: str) -> None:
    if not os.path.isdir(source) or not os.path.isdir(target):
        os.replace(source, target)
        return
    old = sibling_path(target, "old")  # a directory: the old one aside, the new one in (see atomic_directory)
    os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old, ignore_errors=True)


def is_sharded_checkpoint(checkpoint: str) -> bool:
    """True for a checkpoint saved by FSDP with SHARDED_STATE_DICT (a pytorch_model_fsdp_* folder).

    Such a checkpoint holds the unmerged base and the deltas by parameter name.
    """
    return os.path.isdir(checkpoint) and any(
        name.startswith("pytorch_model_fsdp") and os.path.isdir(os.path.join(checkpoint, name))
        for name in os.listdir(checkpoint)
    )


def check_resume_mode(checkpoint: str, mode: str) -> None:
    """Refuse to resume `checkpoint` in another restriction mode than the one it was saved with.

    A delta-mode checkpoint carries ``alps_delta.safetensors`` (FSDP sharded ones excepted); a mask-mode
    one does not. Raises ValueError before anything is localized or loaded.
    """
    has_deltas = os.path.isfile(os.path.join(checkpoint, DELTA_FILE))
    if mode == "mask" and has_deltas:
        raise ValueError(
            f"{checkpoint} was saved by an alps_mode='delta' run (it holds {DELTA_FILE}), but this run uses "
            "alps_mode='mask'; the optimizer state cannot carry over. Resume with alps_mode='delta', or start a new "
            "run."
        )
    if mode == "delta" and not has_deltas and not is_sharded_checkpoint(checkpoint):
        raise ValueError(_not_a_delta_checkpoint(checkpoint))


def _not_a_delta_checkpoint(checkpoint: str) -> str:
    return (
        f"{checkpoint} has no {DELTA_FILE}: it is not a checkpoint of an ALPS delta-mode run. Resume with the "
        "alps_mode it was trained with (alps_mode='mask' for a full-weight checkpoint) or start a new run."
    )


def write_delta_file(
    model: torch.nn.Module, restriction: Any, deltas: dict[str, torch.Tensor], path: str, base_model: str | None = None
) -> None:
    """`restriction.save_delta` from already gathered `deltas` (gathering again on the writer alone would hang)."""
    model = unwrap_model(model)
    save_delta_file(
        deltas,
        path,
        selection=restriction.selection,
        base_model=base_model or getattr(getattr(model, "config", None), "_name_or_path", ""),
        restrict_o_proj=restriction.restrict_o_proj,
        rest_trained=restriction.rest_trains,
    )


def write_adapter(
    model: torch.nn.Module, restriction: Any, deltas: dict[str, torch.Tensor], directory: str, uniform_rank: bool
) -> AdapterInfo:
    """Write the PEFT LoRA adapter of already gathered `deltas` (`Restriction.trained_deltas`) into `directory`,
    over the base the model was loaded from."""
    inner = unwrap_model(model)
    config = inner.config
    o_module = restriction.layout.layers[0].o_module
    info = save_adapter(
        deltas,
        restriction.layout,
        restriction.selection,
        directory,
        base_model=getattr(config, "_name_or_path", "") or "",
        uniform_rank=uniform_rank,
        o_proj_has_bias=getattr(inner.get_submodule(o_module), "bias", None) is not None,
        replace_any=True,
    )
    logger.warning(
        f"ALPS: saved the trained heads as a PEFT LoRA adapter in {directory} (largest rank {info.max_rank}; "
        f"{info.vllm_hint()})."
    )
    return info


def save_quantized_run(
    output_dir: str,
    model: torch.nn.Module,
    restriction: Any,
    deltas: dict[str, torch.Tensor],
    processing_class: Any,
    args: Any,
) -> None:
    """Save what a quantized-base run can: the delta file, tokenizer, training args and a merge hint (each file
    atomically, see `staged_save`)."""
    base = getattr(unwrap_model(model).config, "_name_or_path", "") or "BASE_MODEL_DIR"
    delta_path = os.path.join(output_dir, DELTA_FILE)

    def save(directory: str) -> None:
        write_delta_file(model, restriction, deltas, os.path.join(directory, DELTA_FILE), base_model=base)
        if processing_class is not None:
            processing_class.save_pretrained(directory)
        torch.save(args, os.path.join(directory, TRAINING_ARGS_NAME))
        write_text_atomic(
            os.path.join(directory, MERGE_HINT_FILE),
            "# ALPS deltas over a quantized base\n\n"
            f"`{DELTA_FILE}` holds the trained rows of the selected heads. Apply them to the full-precision "
            "base to get a standard checkpoint:\n\n"
            f"```\nalps-merge {base} {delta_path} MERGED_OUTPUT_DIR\n```\n",
        )

    staged_save(output_dir, save)
    logger.warning(f"ALPS: saved deltas to {output_dir}; merge: alps-merge {base} {delta_path} OUT")


def load_delta_checkpoint(
    model: torch.nn.Module, restriction: Any, checkpoint: str, load_checkpoint: Callable[[], Any]
) -> None:
    """Restore the deltas of a delta-mode `checkpoint` into `model`.

    `load_checkpoint` is Trainer's own loader; it runs (non-quantized bases only) for the parameters
    outside the restriction, and the frozen base rows it overwrites with merged values are put back.
    """
    delta_path = os.path.join(checkpoint, DELTA_FILE)
    if not os.path.isfile(delta_path):
        raise FileNotFoundError(_not_a_delta_checkpoint(checkpoint))
    if not is_quantized(model):
        params = dict(unwrap_model(model).named_parameters())
        kept = {
            t.name: (t.dim, idx, params[t.name].detach().index_select(t.dim, idx).clone())
            for t in restriction.targets
            if t.num_selected and t.name in params
            for idx in [t.selected.to(params[t.name].device)]
        }
        load_checkpoint()
        with torch.no_grad():
            for name, (dim, idx, rows) in kept.items():
                params[name].data.index_copy_(dim, idx, rows)
    tensors, _, _ = load_delta_file(delta_path)
    restriction.load_delta_state_dict(model, tensors)
