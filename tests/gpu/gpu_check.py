"""One-shot GPU check of alps_trl on a single CUDA GPU (well under 10 minutes on an H100/H200-class GPU).

Sections, each independent (a failure is printed with its traceback and the next section runs):

1. environment: torch, CUDA, GPU, transformers, trl, peft, bitsandbytes.
2. 4-bit NF4 delta training on CUDA: a small random Llama saved to a temp dir and loaded in 4-bit (bf16 compute and
   bf16 quant storage), ALPS delta restriction, a few AdamW steps. Checks: every delta receives a finite, non-zero
   gradient; every base parameter (the packed 4-bit weights included) stays bit-identical; the deltas change; with
   the deltas switched off (the DPO reference) the model computes exactly what it computed before training.
3. GRPO in delta mode (AlpsGRPOTrainer, bf16, a KL term): the reference is parameter-free, the base weights stay
   bit-identical, and what TRL's sync_weights would push to vLLM is base + delta (a recording client stands in
   for the vLLM server; vllm itself is only imported, when installed).
4. bf16 step time and peak GPU memory on a Llama-3.2-1B-shaped random model (16 layers, 32 heads, 8 kv heads,
   d 2048, intermediate 8192, vocab 128256, built from its config): full fine-tuning, ALPS mask and delta (with
   the rest of the network training, the paper's setting, and attention-only), and LoRA r128 (peft, all linear
   layers of the decoder). Same data, AdamW, median step time over timed steps after warm-up. ALPS rows also
   report whether every unselected q/k/v row stayed bit-identical.

Usage:
    python tests/gpu/gpu_check.py [--steps 10] [--batch-size 4] [--seq-len 1024] [--output-dir DIR]
    python tests/gpu/gpu_check.py --device cpu --tiny     # the same code paths on tiny models, on the CPU

Without CUDA (and without --device cpu) it says so and exits 0. Results are printed and, with --output-dir,
written to DIR/gpu_check.json and DIR/gpu_check.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

import torch

from alps_trl.testing import TINY_DIMS

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = {**TINY_DIMS, "head_dim": 8}
# Small enough to quantize in seconds, with 4-bit friendly shapes (out_features multiples of 64).
SMALL_4BIT = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
VARIANTS = [
    ("full fine-tuning", "full", True),
    ("ALPS mask (rest trains)", "mask", True),
    ("ALPS mask (attention only)", "mask", False),
    ("ALPS delta (rest trains)", "delta", True),
    ("ALPS delta (attention only)", "delta", False),
    ("LoRA r128 (peft)", "lora", False),
]


# ---- helpers --------------------------------------------------------------------------------------------------
def llama(dims: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**dims, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def random_selection(model, ratio: float = 0.1, seed: int = 0):
    from alps_trl.localization.anatomy import AttentionLayout
    from alps_trl.localization.selection import HeadSelection, num_selected, select_random

    layout = AttentionLayout.from_model(model)
    k = num_selected(ratio, layout.num_layers, layout.num_heads)
    heads = select_random(layout.num_layers, layout.num_heads, k, seed)
    return HeadSelection(
        layout.num_layers,
        layout.num_heads,
        layout.num_kv_heads,
        heads,
        ratio=ratio,
        strategy="random",
        head_dim=layout.head_dim,
        hidden_size=layout.hidden_size,
        model_type=layout.model_type,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A byte view for bit-exact comparison (packed 4-bit weights stored as bf16 hold NaN patterns)."""
    return t.detach().contiguous().view(torch.uint8).cpu().clone()


def frozen_rows_snapshot(model, restriction) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{q/k/v tensor name: (unselected indices, bytes of those rows)} of the base model."""
    params = dict(model.named_parameters())
    out = {}
    for t in restriction.targets:
        if t.dim != 0 or t.name not in params:
            continue
        p = params[t.name]
        keep = torch.ones(p.shape[0], dtype=torch.bool)
        keep[t.selected.cpu()] = False
        idx = keep.nonzero().flatten().to(p.device)
        out[t.name] = (idx, bits(p.detach().index_select(0, idx)))
    return out


def frozen_rows_intact(model, snapshot) -> bool:
    params = dict(model.named_parameters())
    return all(torch.equal(bits(params[n].detach().index_select(0, idx)), b) for n, (idx, b) in snapshot.items())


class Section:
    """Runs one section, records ok/failed and the traceback, never raises."""

    def __init__(self, name: str, results: dict[str, Any]):
        self.name, self.results = name, results

    def __enter__(self):
        self.results.setdefault(self.name, {})
        print(f"\n=== {self.name} ===", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        seconds = round(time.perf_counter() - self.start, 1)
        entry = self.results.setdefault(self.name, {})
        entry["seconds"] = seconds
        if exc is None:
            entry.setdefault("status", "ok")
            print(f"--- {self.name}: {entry['status']} ({seconds} s)", flush=True)
        else:
            entry["status"] = "FAILED"
            entry["error"] = f"{exc_type.__name__}: {exc}"
            print(f"--- {self.name}: FAILED ({seconds} s)\n{traceback.format_exc()}", flush=True)
        return True  # swallow: the next section runs


# ---- section 1 ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    for pkg in ("transformers", "trl", "accelerate", "peft", "bitsandbytes"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
        )
    for key, value in info.items():
        print(f"{key:>16}: {value}")
    return info


# ---- section 2 ------------------------------------------------------------------------------------------------
def four_bit_delta(device: torch.device, dims: dict, steps: int, entry: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from alps_trl.restriction import build_restriction, resolve_mode

    with tempfile.TemporaryDirectory() as tmp:
        llama(dims, torch.device("cpu"), torch.bfloat16).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=quant, dtype=torch.bfloat16, device_map=device_map, attn_implementation="sdpa"
        )
    assert resolve_mode("auto", model) == "delta", "a 4-bit base must resolve to delta mode"
    selection = random_selection(model)
    restriction = build_restriction(model, selection, "delta")
    restriction.install(model)
    model.train()
    base = {n: bits(p) for n, p in model.named_parameters() if ".alps_delta." not in n}
    deltas = {n: p for n, p in model.named_parameters() if ".alps_delta." in n}
    assert deltas and all(p.requires_grad and p.dtype == torch.float32 for p in deltas.values())
    assert not [n for n, p in model.named_parameters() if p.requires_grad and ".alps_delta." not in n]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, dims["vocab_size"], (2, 64), generator=gen).to(device)
    # Train mode with autograd on: an eval/no-grad forward would repack 4-bit weights on CPU (see docs/platform.md).
    before = model(input_ids=ids).logits.detach().float()
    optimizer = torch.optim.AdamW(list(deltas.values()), lr=1e-3, weight_decay=0.1)
    losses, grad_norms = [], {}
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grad_norms = {n: (None if p.grad is None else float(p.grad.float().norm())) for n, p in deltas.items()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    missing = [n for n, g in grad_norms.items() if g is None or not g > 0 or g != g]
    assert not missing, f"deltas without a finite non-zero gradient: {missing[:4]}"
    changed_base = [n for n, p in model.named_parameters() if n in base and not torch.equal(bits(p), base[n])]
    assert not changed_base, f"base parameters changed: {changed_base[:4]}"
    assert all(float(p.detach().abs().sum()) > 0 for p in deltas.values()), "some deltas did not move"
    assert all(torch.isfinite(torch.tensor(losses))), losses
    with restriction.reference(model):
        reference = model(input_ids=ids).logits.detach().float()
    ref_diff = float((reference - before).abs().max())
    # Bit-exact on CPU; GPU kernels may pick other reduction orders between calls, hence the loose bound there.
    assert ref_diff == 0.0 or (device.type == "cuda" and ref_diff < 1e-2), f"deltas off: max diff {ref_diff}"
    entry.update(
        deltas=len(deltas),
        delta_params=sum(p.numel() for p in deltas.values()),
        heads=f"{len(selection.heads)}/{selection.num_layers * selection.num_heads}",
        losses=[round(x, 4) for x in losses],
        min_delta_grad_norm=min(grad_norms.values()),
        base_bit_identical=True,
        reference_max_abs_diff=ref_diff,
    )
    print(json.dumps(entry, indent=1))


# ---- section 3 ------------------------------------------------------------------------------------------------
def grpo_delta_and_vllm_push(device: torch.device, entry: dict[str, Any]) -> None:
    """Section 3: two GRPO steps of a tiny Llama in delta mode (bf16 on CUDA) with a KL term, through
    AlpsGRPOTrainer. Checks: the reference is parameter-free, unselected q/k/v rows stay bit-identical, and what
    TRL's sync_weights pushes to vLLM (server mode, a recording client) is base + delta. With vllm installed it
    is also imported, so a broken install shows here."""
    import tempfile

    from datasets import Dataset

    from alps_trl import AlpsGRPOConfig, AlpsGRPOTrainer
    from alps_trl.testing import RecordingVLLMClient, build_tokenizer, recording_vllm_generation

    prompts = [f"Question: what is {a} plus {b}? Answer:" for a in range(8) for b in range(2)]
    data = Dataset.from_dict({"prompt": prompts, "solution": [str(a + b) for a in range(8) for b in range(2)]})
    model = llama(TINY, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = AlpsGRPOConfig(
        tempfile.mkdtemp(prefix="alps_gpu_check_grpo_"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        beta=0.04,
        learning_rate=1e-2,
        weight_decay=0.1,
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        report_to="none",
        save_strategy="no",
        alps_mode="delta",
        alps_train_non_attention=False,
        alps_probe_steps=1,
        disable_tqdm=True,
    )
    trainer = AlpsGRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [1.0 / (1 + len(c)) for c in completions]],
        args=args,
        train_dataset=data,
        processing_class=build_tokenizer(prompts, vocab_size=TINY["vocab_size"]),
    )
    trainer.train()
    client = RecordingVLLMClient()
    recording_vllm_generation(trainer, client).sync_weights()
    base_intact = all(
        torch.equal(bits(p), bits(before[n])) for n, p in trainer.model.named_parameters() if n in before
    )
    trainer.restriction.merge(trainer.model)
    merged = dict(trainer.model.named_parameters())
    pushed_ok = set(client.pushed) == set(merged) and all(torch.equal(client.pushed[n], merged[n]) for n in merged)
    entry.update(
        reference_kind=trainer.reference_kind,
        base_weights_bit_identical=base_intact,
        vllm_push_is_base_plus_delta=pushed_ok,
        vllm_installed=_vllm_version(),
        status="ok" if (trainer.reference_kind == "parameter-free" and base_intact and pushed_ok) else "CHECK FAILED",
    )


def _vllm_version() -> str | None:
    try:
        import vllm

        return vllm.__version__
    except ImportError:
        return None


def setup_variant(model, mode: str, train_rest: bool, lr: float, wd: float):
    """Trainable parameters, optimizer and per-step hooks for one variant."""
    from alps_trl.restriction import build_restriction

    restriction, snapshot = None, None
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.0, target_modules=targets))
    elif mode in ("mask", "delta"):
        restriction = build_restriction(model, random_selection(model), mode, train_non_attention=train_rest)
        restriction.install(model)
        restriction.attach(model)
        snapshot = frozen_rows_snapshot(model, restriction)
    exempt = restriction.decay_exempt_parameter_names(model) if restriction is not None else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if n not in exempt], "weight_decay": wd},
        {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)
    trainable = sum(p.numel() for _, p in named)
    if restriction is not None and mode == "mask":
        # Rows of restricted tensors that cannot change do not count as trainable.
        targets = {t.name for t in restriction.targets}
        trainable = sum(p.numel() for n, p in named if n not in targets) + restriction.trainable_restricted_entries(0)
    return model, optimizer, restriction, snapshot, trainable


def time_variant(
    label: str, mode: str, train_rest: bool, device: torch.device, dims: dict, args, entry: dict[str, Any]
) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = llama(dims, device, dtype)
    model.config.use_cache = False
    lr, wd = 1e-5 if not args.tiny else 1e-2, 0.1
    model, optimizer, restriction, snapshot, trainable = setup_variant(model, mode, train_rest, lr, wd)
    model.train()
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(2, dims["vocab_size"], (args.batch_size, args.seq_len), generator=gen).to(device)
        for _ in range(2)
    ]
    times = []
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        sync(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if restriction is not None:
            restriction.mask_gradients(model)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        if restriction is not None:
            restriction.apply_weight_decay(model, lr, wd)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    entry.update(
        trainable_params=trainable,
        step_ms=round(1000 * statistics.median(times), 1),
        peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        final_loss=round(float(loss), 4),
        unselected_rows_exact=None if snapshot is None else frozen_rows_intact(model, snapshot),
    )
    if snapshot is not None:
        assert entry["unselected_rows_exact"], f"{label}: unselected q/k/v rows changed"
    print(json.dumps(entry), flush=True)
    del model, optimizer, restriction, snapshot
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def table(results: dict[str, Any]) -> str:
    rows = [
        "| variant | trainable params | step ms (median) | vs full | peak GPU GiB | unselected rows exact | status |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    full = results.get("step time: full fine-tuning", {}).get("step_ms")
    for label, _, _ in VARIANTS:
        e = results.get(f"step time: {label}", {})
        status = e.get("status", "not run")
        if "step_ms" not in e:
            rows.append(f"| {label} | - | - | - | - | - | {status} |")
            continue
        ratio = f"{e['step_ms'] / full:.2f}" if full else "-"
        exact = "-" if e["unselected_rows_exact"] is None else e["unselected_rows_exact"]
        peak = "-" if e["peak_gib"] is None else e["peak_gib"]
        rows.append(
            f"| {label} | {e['trainable_params']:,} | {e['step_ms']} | {ratio} | {peak} | {exact} | {status} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (code-path smoke test)")
    parser.add_argument("--tiny", action="store_true", help="tiny models instead of the Llama-3.2-1B shape")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip sections that would start later")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: gpu_check has nothing to check (exit 0).")
        return 0
    device = torch.device(args.device)
    if args.tiny:
        args.batch_size, args.seq_len = min(args.batch_size, 2), min(args.seq_len, 64)
    started = time.perf_counter()
    results: dict[str, Any] = {}

    with Section("environment", results):
        results["environment"].update(environment(device))
    with Section("4-bit NF4 delta training", results) as section:
        four_bit_delta(device, TINY if args.tiny else SMALL_4BIT, 3, results[section.name])
    with Section("GRPO delta mode and the vLLM push", results) as section:
        grpo_delta_and_vllm_push(device, results[section.name])
    dims = TINY if args.tiny else LLAMA_1B
    for label, mode, train_rest in VARIANTS:
        name = f"step time: {label}"
        if time.perf_counter() - started > args.budget_s:
            results[name] = {"status": "skipped (time budget)"}
            continue
        with Section(name, results):
            time_variant(label, mode, train_rest, device, dims, args, results[name])

    shape = "tiny Llama" if args.tiny else "Llama-3.2-1B-shaped random model"
    dtype = "bf16" if device.type == "cuda" else "fp32"
    text = (
        f"# alps_trl gpu_check\n\n{shape}, {dtype} parameters, AdamW, batch {args.batch_size} x {args.seq_len} "
        f"tokens, median of {args.steps} steps after {args.warmup} warm-up steps, 10% of heads (random).\n\n"
        + table(results)
        + "\n\n4-bit NF4 delta training: "
        + results.get("4-bit NF4 delta training", {}).get("status", "not run")
        + "\n\nGRPO delta mode and the vLLM push: "
        + str({k: v for k, v in results.get("GRPO delta mode and the vLLM push", {}).items() if k != "seconds"})
        + f"\n\nTotal {time.perf_counter() - started:.0f} s.\n"
    )
    print("\n" + text)
    failed = [k for k, v in results.items() if v.get("status") == "FAILED"]
    if failed:
        print("FAILED sections: " + "; ".join(f"{k} ({results[k].get('error')})" for k in failed))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(args.output_dir, "gpu_check.md"), "w") as f:
            f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
