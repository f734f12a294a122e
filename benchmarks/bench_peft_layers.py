"""Training the heads through ALPS's delta modules or through PEFT LoRA layers: the same update, which is faster?

A delta-mode restriction computes what a LoRA layer with a frozen 0/1 B (the row selector) and a zero-initialised
trainable A computes. On SmolLM2-135M-Instruct (27 random heads of 270, head-only) this builds both from the same
heads and the same starting deltas (the LoRA model from `alps_trl.restriction.peft_export`, B frozen), checks that
their logits agree, and trains them interleaved, two steps per block, on batches of the demo data (float32 weights,
bf16 autocast where the CPU has it, AdamW). It prints the median process CPU time per step of each and their ratio.

    python benchmarks/bench_peft_layers.py [--blocks 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import smollm2  # noqa: E402


def build(directory: str, seed: int = 0):
    """(ALPS delta model, PEFT LoRA model with frozen B), same 27 random heads and the same small starting deltas."""
    from peft import get_peft_model, set_peft_model_state_dict

    from alps_trl.localization.anatomy import AttentionLayout
    from alps_trl.localization.selection import num_selected, select_random, selection_for_layout
    from alps_trl.restriction import build_restriction
    from alps_trl.restriction.peft_export import lora_config, lora_tensors

    base = smollm2.load_model(directory)
    layout = AttentionLayout.from_model(base)
    k = num_selected(0.1, layout.num_layers, layout.num_heads)
    heads = select_random(layout.num_layers, layout.num_heads, k, seed)
    selection = selection_for_layout(layout, heads, metric="none", ratio=0.1, strategy="random")
    alps = copy.deepcopy(base)
    restriction = build_restriction(alps, selection, "delta", train_non_attention=False)
    restriction.install(alps)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in alps.named_parameters():
            if ".alps_delta." in name:
                param.copy_(1e-3 * torch.randn(param.shape, generator=generator))
    tensors, ranks = lora_tensors(restriction.delta_state_dict(alps), layout, selection)
    config = lora_config(ranks, base_model=directory, uniform_rank=False, lora_bias=False)
    lora = get_peft_model(base, config)
    set_peft_model_state_dict(lora, tensors)
    for name, param in lora.named_parameters():
        param.requires_grad_(".lora_A." in name)  # B is the frozen selector
    return alps, lora, len(selection.heads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="interleaved blocks of 2 steps per method")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, directory = smollm2.model_paths()
    alps, lora, heads = build(directory)
    models = {"ALPS delta modules": alps, "PEFT LoRA layers, frozen 0/1 B": lora}
    batches = smollm2.demo_batches(directory, batch=8, seq=64, count=2 * args.blocks)
    first = batches[0]
    with torch.no_grad():
        gap = (alps(input_ids=first.input_ids).logits - lora(input_ids=first.input_ids).logits).abs().max().item()
    dtype = smollm2.autocast_dtype(torch.device("cpu"))
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in
                  models.items()}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in models}
    for block in range(args.blocks):
        for key, model in models.items():
            model.train()
            for batch in batches[2 * block : 2 * block + 2]:
                start = time.process_time()
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = model(input_ids=batch.input_ids, labels=batch.labels).loss
                loss.backward()
                optimizers[key].step()
                optimizers[key].zero_grad(set_to_none=True)
                times[key].append(time.process_time() - start)
    print(f"{smollm2.NAME}, {heads} heads, batches 8 x 64, {smollm2.autocast_note(dtype)}, {args.threads} threads")
    print(f"max |logit difference| of the two at the start: {gap:.2e}")
    medians = {}
    for key, model in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        medians[key] = statistics.median(times[key][1:] or times[key])  # the first step warms up
        print(f"{key}: median step {medians[key]:.2f} s CPU, {trainable:,} trainable")
    a, b = medians.values()
    print(f"PEFT LoRA / ALPS delta step time: {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
