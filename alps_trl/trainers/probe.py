"""The probe: a short attention-only fine-tune that stands in for a task model.

Without a task model or a saved selection, ALPS (its Table 10) derives the task model cheaply: train
only the attention q/k/v on a small part of the data, then compare with the base. `run_probe` does
that inside a trainer, before the real training starts, and leaves no trace: the q/k/v weights are
restored bit for bit, every requires_grad flag, the train/eval mode, the RNG states and the
trainer's metric buffers are put back, and the probe's own optimizer is discarded. (When the run
asks for activation checkpointing, the probe switches it on already, as `Trainer.train` would next.)
The same traceless pass (`traceless_pass`, `training_loss`) runs the importance scoring of
``alps_metric="importance"`` (`alps_trl.trainers.head_sources.training_data_importance`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from alps_trl.localization.anatomy import AttentionLayout, unwrap_model
from alps_trl.trainers.private_api import enable_activation_checkpointing, is_activation_checkpointing

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the python, numpy, torch CPU and CUDA RNG states on exit (torch's through `torch.random.fork_rng`)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def swapped_in(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily write `tensors` (name -> value) into the model's parameters through ``.data``."""
    params = dict(unwrap_model(model).named_parameters())
    saved = {}
    with torch.no_grad():
        for name, value in tensors.items():
            saved[name] = params[name].data.clone()
            params[name].data.copy_(value.to(params[name].device))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].data.copy_(value)


def probe_dataloader(trainer: Any) -> torch.utils.data.DataLoader:
    """A plain (not accelerate-prepared) loader over the trainer's training set, in one seeded order.

    Every process builds the same loader; `process_share` then gives each process its own batches of it.
    """
    import datasets

    args = trainer.args
    dataset = trainer.train_dataset
    collator = trainer.data_collator
    if isinstance(dataset, datasets.Dataset):
        dataset = trainer._remove_unused_columns(dataset, description="ALPS probe")
    else:
        collator = trainer._get_collator_with_removed_columns(collator, description="ALPS probe")
    kwargs: dict[str, Any] = {"batch_size": args.per_device_train_batch_size, "collate_fn": collator}
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        kwargs["shuffle"] = True
        kwargs["generator"] = torch.Generator().manual_seed(int(args.seed))
    return torch.utils.data.DataLoader(dataset, **kwargs)


def process_share(trainer: Any) -> Iterator[dict[str, Any]]:
    """This process's batches of the seeded training order, endlessly: batch i goes to process i % world_size.

    Every process draws the same number of batches per step, so the collectives inside `compute_loss` (metric
    gathers) and the probe's gradient all-reduce stay in step.
    """
    accelerator = trainer.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    return itertools.islice(itertools.cycle(trainer._alps_probe_dataloader()), rank, None, world)


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """All-reduce (mean) the gradients of `params` across processes, as DDP would (the probe model is unwrapped)."""
    if world <= 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
        param.grad.div_(world)


@contextlib.contextmanager
def traceless_pass(trainer: Any, reference: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Run a pre-training pass over the training data inside `trainer` (the probe, importance scoring).

    On exit every requires_grad flag, the train/eval mode, the RNG states and the trainer's metric buffers are
    put back and parameter gradients cleared. Inside, the model is in training mode (with activation
    checkpointing on when the run asks for it, as `Trainer.train` would switch it on next) and a DPO reference
    forward runs inside `reference()` (through ``trainer._alps_probe_reference``).
    """
    args = trainer.args
    inner = unwrap_model(trainer.model)
    flags = {n: p.requires_grad for n, p in inner.named_parameters()}
    was_training = inner.training
    metrics = copy.deepcopy(getattr(trainer, "_metrics", None))
    tokens = getattr(trainer, "_total_train_tokens", None)
    try:
        with preserved_rng():
            trainer.model.train()
            if args.gradient_checkpointing and hasattr(inner, "gradient_checkpointing_enable"):
                if not is_activation_checkpointing(inner):
                    # What Trainer.train() turns on right after: the pass needs the same activation memory budget.
                    enable_activation_checkpointing(inner, args.gradient_checkpointing_kwargs)
            trainer._alps_probe_reference = reference
            yield
    finally:
        trainer._alps_probe_reference = None
        for n, p in inner.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        inner.train(was_training)
        if metrics is not None:
            trainer._metrics = metrics
        if tokens is not None:
            trainer._total_train_tokens = tokens


def training_loss(trainer: Any, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """The trainer's own loss of one collated batch: `compute_loss` on the prepared inputs, scalar tensor."""
    inputs = trainer._prepare_inputs(batch)
    with trainer.compute_loss_context_manager():
        return trainer.compute_loss(model, inputs)


def shows_progress(trainer: Any) -> bool:
    """Like Trainer's own bars: on the main process only, off with disable_tqdm."""
    return not bool(trainer.args.disable_tqdm) and trainer.is_world_process_zero()


def run_probe(trainer: Any, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fine-tune all q/k/v weights (everything else frozen) for `steps` optimizer steps, then undo it.

    Uses the trainer's own loss (`compute_loss`), learning rate, Adam betas/epsilon, gradient
    accumulation and clipping; no weight decay. Each step consumes a global batch, like a training
    step: under several processes each one takes its share of the batches (`process_share`) and the
    gradients are averaged across them, so every process ends with the same weights. Weights stored in
    bf16/fp16 train through float32 master copies (the optimizer updates those; a small learning rate's
    updates would round away in bf16). DPO reference forwards during the probe see the pre-probe q/k/v
    (through `trainer._alps_probe_reference`).

    Returns:
        (before, after): the q/k/v weights and biases by parameter name, as CPU tensors: `before` in the
        model's dtype, `after` in float32 (the master copies). The model is back in its `before` state.
    """
    args = trainer.args
    model = trainer.model
    inner = unwrap_model(model)
    layout = AttentionLayout.from_model(inner)
    params = dict(inner.named_parameters())
    names = [n for lp in layout.layers for n in lp.qkv_tensor_names()]
    before = {n: params[n].detach().clone() for n in names}
    accumulation = max(1, int(args.gradient_accumulation_steps))
    logger.info(f"ALPS probe: attention-only fine-tune of all q/k/v for {steps} steps to localize heads.")
    try:
        with traceless_pass(trainer, reference=lambda: swapped_in(inner, before)):
            for n, p in inner.named_parameters():
                p.requires_grad_(n in before)
            trainable = [params[n] for n in names]
            # float32 masters for low-precision weights; for float32 weights the master is the weight itself.
            masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True) for p in trainable]
            world = trainer.accelerator.num_processes
            optimizer = torch.optim.AdamW(
                masters,
                lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=0.0,
            )
            batches = process_share(trainer)
            bar = tqdm(total=steps, desc="ALPS probe", unit="step", disable=not shows_progress(trainer))
            with bar:
                for _ in range(steps):
                    for _ in range(accumulation):
                        loss = trainer._alps_probe_loss(model, next(batches))
                        (loss / accumulation).backward()
                    for param, master in zip(trainable, masters):
                        if master is not param:
                            master.grad = None if param.grad is None else param.grad.float()
                            param.grad = None
                    average_gradients(masters, world)  # in float32: a bf16 all-reduce would round the sum
                    if args.max_grad_norm and args.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(masters, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for param, master in zip(trainable, masters):
                            if master is not param:
                                param.copy_(master)
                    if not bar.disable:
                        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                    bar.update(1)
            after = {n: m.detach().to("cpu", torch.float32, copy=True) for n, m in zip(names, masters)}
            del optimizer
    finally:
        with torch.no_grad():
            for n in names:
                params[n].data.copy_(before[n])
    return {n: t.cpu() for n, t in before.items()}, after
