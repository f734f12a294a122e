"""Training the heads through ALPS's delta modules or through PEFT LoRA layers: the same update, which is cheaper?

A delta-mode restriction computes what a LoRA layer with a frozen 0/1 B (the row selector) and a zero-initialised
trainable A computes. On SmolLM2-135M-Instruct (27 random heads of 270, head-only) this builds both from the same
heads and the same small starting deltas (the LoRA model from `alps_trl.restriction.peft_export`, B frozen), checks
that their logits agree, trains them interleaved, two steps per block, on the same batches of the demo data
(float32 weights, bf16 autocast where the CPU has it, AdamW), and checks their logits again after training. It
prints, side by side, the median process CPU time per step, trainable parameters, training-state memory (all
parameters + the gradients a step materializes + AdamW state) and, with --peak-rss (the default), the peak RSS of
a fresh process that loads the model and trains only that method.

    python -m benchmarks.cost.peft_layers [--blocks 4] [--threads 2] [--no-peak-rss]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time

import torch

from benchmarks.common import finetune_loop as loop
from benchmarks.common import smollm2
from benchmarks.common.measure_process import measure
from benchmarks.common.run_info import REPO
from benchmarks.cost.training import tensor_bytes

ALPS = "ALPS delta modules"
PEFT = "PEFT LoRA layers, frozen 0/1 B"
BATCH, SEQ = 8, 64


def starting_point(base: torch.nn.Module, seed: int = 0):
    """(27 random heads of `base`, their starting deltas in the delta-file format): small random deltas, so that
    the two models start away from the base and a wrong row mapping would show in the logits."""
    from alps_trl.localization.anatomy import AttentionLayout
    from alps_trl.localization.selection import num_selected, select_random, selection_for_layout
    from alps_trl.restriction import build_restriction
    from alps_trl.restriction.base import DELTA_MARKER

    layout = AttentionLayout.from_model(base)
    k = num_selected(0.1, layout.num_layers, layout.num_heads)
    heads = select_random(layout.num_layers, layout.num_heads, k, seed)
    selection = selection_for_layout(layout, heads, metric="none", ratio=0.1, strategy="random")
    restriction = build_restriction(base, selection, "delta", train_non_attention=False)
    restriction.install(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if DELTA_MARKER in name:
                param.copy_(1e-3 * torch.randn(param.shape, generator=generator))
    deltas = restriction.delta_state_dict(base)
    restriction.uninstall(base)
    return selection, deltas


def alps_model(base: torch.nn.Module, selection, deltas) -> torch.nn.Module:
    """`base` (changed in place) with ALPS's delta modules holding `deltas`, the rest frozen."""
    from alps_trl.restriction import build_restriction

    restriction = build_restriction(base, selection, "delta", train_non_attention=False)
    restriction.install(base)
    restriction.load_delta_state_dict(base, deltas)
    return base


def lora_model(base: torch.nn.Module, selection, deltas, directory: str) -> torch.nn.Module:
    """`base` wrapped by PEFT with the LoRA form of `deltas` (A = delta rows, trainable; B = the selector, frozen)."""
    from peft import get_peft_model, set_peft_model_state_dict

    from alps_trl.localization.anatomy import AttentionLayout
    from alps_trl.restriction.peft_export import lora_config, lora_tensors

    tensors, ranks = lora_tensors(deltas, AttentionLayout.from_model(base), selection)
    model = get_peft_model(base, lora_config(ranks, base_model=directory, uniform_rank=False, lora_bias=False))
    set_peft_model_state_dict(model, tensors)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name)
    return model


def build(directory: str, which: tuple[str, ...]):
    """({method: model} for the methods named in `which`, from one loaded model (a copy each when there are two);
    the head selection)."""
    base = smollm2.load_model(directory)
    selection, deltas = starting_point(base)
    models = {}
    for key in which:
        model = copy.deepcopy(base) if len(which) > 1 else base
        if key == ALPS:
            models[key] = alps_model(model, selection, deltas)
        else:
            models[key] = lora_model(model, selection, deltas, directory)
    return models, selection


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: loop.LMBatch, dtype) -> None:
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def logit_gap(models: dict[str, torch.nn.Module], batch: loop.LMBatch) -> float:
    """Max |logit difference| of the two models on `batch` (eval mode, float32, no autocast)."""
    with torch.no_grad():
        a, b = (m.eval()(input_ids=batch.input_ids).logits for m in models.values())
    return (a - b).abs().max().item()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """All parameters + one gradient per trainable parameter + the optimizer state."""
    params = list(model.parameters())
    return (
        tensor_bytes(params)
        + tensor_bytes(p for p in params if p.requires_grad)
        + loop.optimizer_state_bytes(optimizer)
    )


def train_alone(key: str, threads: int, steps: int) -> None:
    """In a fresh process: load the model, build only `key`, train it `steps` steps (for its peak RSS)."""
    torch.set_num_threads(threads)
    _, directory = smollm2.model_paths()
    model = build(directory, (key,))[0][key]
    model.train()
    optimizer = make_optimizer(model)
    dtype = smollm2.autocast_dtype(torch.device("cpu"))
    for batch in smollm2.demo_batches(directory, BATCH, SEQ, steps):
        step(model, optimizer, batch, dtype)


def peak_rss_mb(key: str, threads: int, steps: int) -> float:
    cmd = [sys.executable, "-m", __spec__.name, "--peak-rss-of", key, "--threads", str(threads)]
    return measure(cmd + ["--rss-steps", str(steps)], cwd=REPO)["peak_mb"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="interleaved blocks of 2 steps per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peak-rss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="peak RSS of each method in a fresh process, after the timing",
    )
    parser.add_argument("--rss-steps", type=int, default=2, help="training steps of each --peak-rss process")
    parser.add_argument("--peak-rss-of", choices=[ALPS, PEFT], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_rss_of is not None:
        train_alone(args.peak_rss_of, args.threads, args.rss_steps)
        return 0
    torch.set_num_threads(args.threads)
    _, directory = smollm2.model_paths()
    models, selection = build(directory, (ALPS, PEFT))
    batches = smollm2.demo_batches(directory, BATCH, SEQ, 2 * args.blocks)
    gap_start = logit_gap(models, batches[0])
    dtype = smollm2.autocast_dtype(torch.device("cpu"))
    optimizers = {key: make_optimizer(model) for key, model in models.items()}
    times: dict[str, list[float]] = {key: [] for key in models}
    for block in range(args.blocks):
        for key, model in models.items():
            model.train()
            for batch in batches[2 * block : 2 * block + 2]:
                start = time.process_time()
                step(model, optimizers[key], batch, dtype)
                times[key].append(time.process_time() - start)
    gap_end = logit_gap(models, batches[0])
    print(
        f"{smollm2.NAME}, {len(selection.heads)} heads, batches {BATCH} x {SEQ}, {smollm2.autocast_note(dtype)}, "
        f"{args.threads} threads, {2 * args.blocks} steps each"
    )
    print(f"max |logit difference| of the two at the start: {gap_start:.2e}")
    print(f"max |logit difference| of the two after training: {gap_end:.2e}")
    medians, memory = {}, {}
    for key, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        medians[key] = statistics.median(times[key][1:] or times[key])  # the first step warms up
        memory[key] = state_bytes(model, optimizers[key])
        print(
            f"{key}: median step {medians[key]:.2f} s CPU, {trainable:,} trainable, "
            f"training state {memory[key] / 2**20:.1f} MB"
        )
    a, b = medians.values()
    print(f"PEFT LoRA / ALPS delta step time: {b / a:.2f}x")
    ma, mb = memory.values()
    print(f"PEFT LoRA / ALPS delta training state: {mb / ma:.2f}x")
    if args.peak_rss:
        del models, optimizers
        gc.collect()
        peaks = {key: peak_rss_mb(key, args.threads, args.rss_steps) for key in (ALPS, PEFT)}
        for key, peak in peaks.items():
            print(f"{key}: peak RSS {peak:.0f} MB (fresh process, {args.rss_steps} steps)")
        print(f"PEFT LoRA / ALPS delta peak RSS: {peaks[PEFT] / peaks[ALPS]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
