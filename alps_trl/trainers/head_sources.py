"""Where a trainer's head selection comes from, and how every process ends up holding the same one.

Layer 5. `HEAD_SOURCES` is the one ordered table of sources: the first entry that applies to a run is its source,
its `check` runs in the trainer's preflight (before any work) and its `select` in localization. Both phases walk
this table and nothing else; `trainer.head_source` names the source used ("checkpoint" when a resume restored
the saved selection instead). The helpers below it are what the sources need: the selection saved in a checkpoint,
a score-free random selection, the base weights a task model is scored against, the probe's length, the heads'
importance on the training data, and the broadcast-and-verify step across processes.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

from alps_trl.localization.anatomy import AttentionLayout, unwrap_model
from alps_trl.localization.selection import (
    HeadSelection,
    num_selected,
    select_layer_consistent,
    select_random,
    selection_for_layout,
)
from alps_trl.reporting.summary import HEADS_FILE
from alps_trl.restriction import is_quantized
from alps_trl.trainers import probe
from alps_trl.trainers.config import AlpsArguments

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class HeadSource:
    """One place a trainer's heads can come from.

    `applies(alps, given)`: whether this source is the run's (`given`: a ``head_selection=`` argument was passed).
    `check(trainer)`: the preflight on the built trainer; raises ValueError before any work.
    `select(trainer)`: the selection, or None on a process that waits for the main process's broadcast.
    The `check` and `select` of the data-driven sources call trainer methods, so that a trainer class can refine
    them (GRPO requires reference answers for the probe and importance).
    """

    name: str
    needs: str
    how: str
    applies: Callable[[AlpsArguments, bool], bool]
    check: Callable[[Any], None]
    select: Callable[[Any], HeadSelection | None]


def _no_check(trainer: Any) -> None:
    """Nothing to check before the work starts."""


def _check_argument(trainer: Any) -> None:
    trainer._alps_explicit.check_compatible(trainer._alps_layout)


def _check_heads_file(trainer: Any) -> None:
    trainer._alps_heads_file = HeadSelection.load(trainer._alps.alps_heads)
    trainer._alps_heads_file.check_compatible(trainer._alps_layout)


def _check_task_model(trainer: Any) -> None:
    # The main process alone opens the task model (other nodes may not have it cached); every rank raises.
    on_main_process(trainer.accelerator, trainer._alps_check_task_model)


def _strategy(name: str) -> Callable[[AlpsArguments, bool], bool]:
    return lambda alps, given: alps.alps_strategy == name


HEAD_SOURCES: tuple[HeadSource, ...] = (
    HeadSource(
        "argument",
        "`head_selection=` passed to the trainer",
        "used as given",
        applies=lambda alps, given: given,
        check=_check_argument,
        select=lambda trainer: trainer._alps_explicit,
    ),
    HeadSource(
        "alps_heads",
        "a saved selection file (`alps_heads.json`)",
        "read from the file",
        applies=lambda alps, given: bool(alps.alps_heads),
        check=_check_heads_file,
        select=lambda trainer: trainer._alps_heads_file,
    ),
    HeadSource(
        "alps_task_model",
        "a fine-tune of the same base (`alps_task_model`)",
        "top `alps_ratio` by `alps_metric` between the base's and the task model's q/k/v weights",
        applies=lambda alps, given: bool(alps.alps_task_model),
        check=_check_task_model,
        select=lambda trainer: trainer._alps_task_model_selection(),
    ),
    HeadSource(
        "random",
        "`alps_strategy: random`",
        "`alps_ratio` of the heads at random (seeded by `alps_seed`), no scores",
        applies=_strategy("random"),
        check=_no_check,
        select=lambda trainer: random_selection(trainer._alps, trainer._alps_layout),
    ),
    HeadSource(
        "layer_consistent",
        "`alps_strategy: layer_consistent`",
        "the same number of random heads in every layer (seeded by `alps_seed`), no scores",
        applies=_strategy("layer_consistent"),
        check=_no_check,
        select=lambda trainer: random_selection(trainer._alps, trainer._alps_layout),
    ),
    HeadSource(
        "importance",
        "`alps_metric: importance` and training data; no FSDP/DeepSpeed",
        "top `alps_ratio` by the loss gradient of each head's output gate, over `alps_importance_batches` batches",
        applies=lambda alps, given: alps.alps_metric == "importance",
        check=lambda trainer: trainer._alps_check_importance_possible(),
        select=lambda trainer: trainer._alps_importance_selection(),
    ),
    HeadSource(
        "probe",
        "training data, `alps_probe_steps` != 0, a full-precision model; no FSDP/DeepSpeed",
        "an attention-only fine-tune of `alps_probe_steps` steps is the task model; top `alps_ratio` by `alps_metric`",
        applies=lambda alps, given: True,
        check=lambda trainer: trainer._alps_check_probe_possible(unwrap_model(trainer.model)),
        select=lambda trainer: trainer._alps_probe_selection(),
    ),
)


def head_source_for(alps: AlpsArguments, given: bool) -> HeadSource:
    """The run's source: the first entry of `HEAD_SOURCES` that applies."""
    return next(source for source in HEAD_SOURCES if source.applies(alps, given))


def head_sources_table() -> str:
    """`HEAD_SOURCES` as a Markdown table (the README's copy is generated from it)."""
    rows = ["| order | source (`trainer.head_source`) | applies when | how it selects |", "| --- | --- | --- | --- |"]
    for i, source in enumerate(HEAD_SOURCES, 1):
        rows.append(f"| {i} | `{source.name}` | {source.needs} | {source.how} |")
    return "\n".join(rows)


def selection_from_checkpoint(
    checkpoint: str, layout: AttentionLayout, given: HeadSelection | None, alps: AlpsArguments | None = None
) -> HeadSelection | None:
    """The selection saved in `checkpoint` (None, with a warning, if it has none).

    Raises ValueError if it does not fit the model or differs from a selection the user gave. Warns
    when `alps` asks for another ratio, strategy or metric than the saved selection was made with:
    the saved heads are kept, since a resumed run must keep training the same rows.
    """
    path = os.path.join(checkpoint, HEADS_FILE)
    if not os.path.isfile(path):
        logger.warning(f"{checkpoint} has no {HEADS_FILE}; localizing heads again.")
        return None
    saved = HeadSelection.load(path)
    saved.check_compatible(layout)
    if given is not None and given != saved:
        raise ValueError(
            f"The head selection given to the trainer differs from the one saved in {path}. Resume without "
            "head_selection / alps_heads, or start a new run."
        )
    logger.info(f"ALPS: resuming with the head selection saved in {path} (no re-localization).")
    changed = _changed_options(saved, alps) if given is None and alps is not None else []
    if changed:
        logger.warning(
            f"ALPS: resuming from {checkpoint} keeps its saved heads, made with {', '.join(changed)}. The new "
            "options are ignored; to localize with them, start a new run (no resume_from_checkpoint)."
        )
    return saved


def _changed_options(saved: HeadSelection, alps: AlpsArguments) -> list[str]:
    """'alps_x=<saved> (now <asked>)' for every localization option that differs from the saved selection's."""
    changed = []
    if saved.ratio is not None and not math.isclose(float(saved.ratio), float(alps.alps_ratio)):
        changed.append(f"alps_ratio={saved.ratio} (now {alps.alps_ratio})")
    if saved.strategy and saved.strategy != alps.alps_strategy:
        changed.append(f"alps_strategy={saved.strategy!r} (now {alps.alps_strategy!r})")
    elif saved.strategy == "top_k" and saved.metric not in (None, "none", alps.alps_metric):
        changed.append(f"alps_metric={saved.metric!r} (now {alps.alps_metric!r})")
    return changed


def random_selection(alps: AlpsArguments, layout: AttentionLayout) -> HeadSelection:
    """The score-free baselines ("random", "layer_consistent"): seeded, no task model needed."""
    k = num_selected(alps.alps_ratio, layout.num_layers, layout.num_heads)
    pick = select_random if alps.alps_strategy == "random" else select_layer_consistent
    heads = pick(layout.num_layers, layout.num_heads, k, alps.alps_seed)
    return selection_for_layout(
        layout,
        heads,
        metric="none",
        ratio=alps.alps_ratio,
        strategy=alps.alps_strategy,
        provenance={"seed": alps.alps_seed},
    )


def open_task_model(alps: AlpsArguments):
    """The `WeightSource` of ``alps_task_model`` (a hub id not in the cache is fetched with ``alps_fetch="qkv"``)."""
    from alps_trl.localization.weights import open_weight_source

    return open_weight_source(
        alps.alps_task_model,
        trust_remote_code=alps.alps_trust_remote_code,
        fetch=alps.alps_fetch,
        revision=alps.alps_task_revision,
    )


def base_weight_source(model: torch.nn.Module, trust_remote_code: bool = False):
    """The base weights a task model is scored against.

    The in-memory model itself (exact, no I/O) unless it is quantized; then the full-precision
    checkpoint it was loaded from (``config._name_or_path``: a local directory or a cached hub id).
    """
    from alps_trl.localization.weights import open_weight_source

    model = unwrap_model(model)
    if not is_quantized(model):
        return open_weight_source(model)
    path = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    try:
        return open_weight_source(path, trust_remote_code=trust_remote_code)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise ValueError(
            f"ALPS scores the task model against the full-precision checkpoint the quantized base was loaded "
            f"from, but {path!r} cannot be read ({err}). Load the base from a local directory or a cached hub "
            "id, or pass alps_heads (a selection made with `alps-localize BASE TASK`)."
        ) from None


def planned_training_steps(args: Any, train_dataset: Any) -> int:
    """Optimizer steps the run plans: max_steps, or epochs x batches per epoch / accumulation (at least 1)."""
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    try:
        examples = len(train_dataset)
    except TypeError:
        return 1
    batches = math.ceil(examples / max(1, args.per_device_train_batch_size * max(1, args.world_size)))
    per_epoch = max(1, batches // max(1, args.gradient_accumulation_steps))
    return max(1, math.ceil(args.num_train_epochs * per_epoch))


def training_data_importance(trainer: Any, batches_per_process: int) -> torch.Tensor:
    """`head_importance` of the trainer's model on its own training batches and loss, summed over all processes.

    Batch i of the seeded training order (`probe.process_share`, the same order on every process) is scored by
    process i % world_size, so each process scores `batches_per_process` different batches (and every process
    runs the same number of `compute_loss` calls, which gather metrics across processes). The run leaves no
    trace (`probe.traceless_pass`); a DPO reference forward sees the untouched model.

    Returns:
        float64 CPU [L, H], identical on every process.
    """
    from alps_trl.localization.importance import head_importance

    accelerator = trainer.accelerator
    world = accelerator.num_processes
    share = list(itertools.islice(probe.process_share(trainer), batches_per_process))
    logger.info(
        f"ALPS importance: scoring the heads on {batches_per_process} training batches per process "
        f"({batches_per_process * world} in all)."
    )
    with probe.traceless_pass(trainer, reference=contextlib.nullcontext):
        local = head_importance(
            trainer.model,
            share,
            loss_fn=trainer._alps_probe_loss,
            device=trainer.args.device,
            progress=probe.shows_progress(trainer),
            train_mode=True,
        )
    if world <= 1:
        return local
    # On the accelerator's device: NCCL reduces CUDA tensors only (gloo reduces float64 CPU tensors as well).
    return accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()


def on_main_process(accelerator: Any, check: Callable[[], None]) -> None:
    """Run `check` on the main process only; if it raises, every process raises the same error (type and message),
    so that no rank walks on into a collective that the failed main process will never join."""
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            check()
        except (ValueError, OSError, RuntimeError) as err:
            failure = err
    if accelerator.num_processes <= 1:
        if failure is not None:
            raise failure
        return
    from accelerate.utils import broadcast_object_list

    payload = [None if failure is None else (type(failure).__name__, str(failure))]
    broadcast_object_list(payload, from_process=0)
    if failure is not None:
        raise failure
    if payload[0] is not None:
        kind, message = payload[0]
        error = {"OSError": OSError, "RuntimeError": RuntimeError}.get(kind, ValueError)
        raise error(f"(on the main process) {message}")


def share_selection(accelerator: Any, selection: HeadSelection | None) -> HeadSelection:
    """Broadcast the main process's selection; every rank checks that it holds the same one.

    `selection` may be None on ranks that did not compute one. Raises RuntimeError on a mismatch.
    """
    if accelerator.num_processes <= 1:
        return selection
    from accelerate.utils import broadcast_object_list, gather_object

    payload = [selection.to_dict() if accelerator.is_main_process else None]
    broadcast_object_list(payload, from_process=0)
    shared = HeadSelection.from_dict(payload[0], source="the main process's head selection")
    if selection is not None and selection != shared:
        raise RuntimeError(
            f"Rank {accelerator.process_index} computed head selection {selection.fingerprint()} but the main "
            f"process uses {shared.fingerprint()}: the processes see different inputs (heads file, model)."
        )
    prints = gather_object([shared.fingerprint()])
    if len(set(prints)) != 1:
        raise RuntimeError(f"ALPS head selections differ across ranks (fingerprints {prints}).")
    return shared
