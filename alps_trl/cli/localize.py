"""`alps-localize`: find the task-sensitive attention heads of a base model, from weights alone.

Usage:
    alps-localize BASE TASK [--ratio 0.1] [--metric pad] [--strategy top_k] [--temperature 1.0]
                  [--seed 0] [--device cpu|cuda] [--output heads.json] [--heatmap heads.png] [--threads N]
                  [--fetch qkv] [--revision REV] [--base-revision REV]

BASE and TASK are checkpoint directories (config.json + safetensors or .bin, sharded or not), GGUF files
(llama.cpp's format, dequantized on read; needs `pip install gguf`) or hub ids already in the local Hugging
Face cache (with `--fetch qkv`, any hub id: only its q/k/v rows are read, with HTTP range requests, and
cached); TASK is a fine-tune of BASE for the target task. Only the q/k/v
tensors are read, one layer at a time. The resulting heads file is what `alps_heads=` / `--alps_heads`
of the ALPS trainers and recipes take.

Start-up is kept lean on purpose: no trl, trainers or transformers models are imported on this path, and on
CPU with safetensors checkpoints not even torch (numpy does the math); torch is loaded only for .bin
checkpoints, a CUDA device and the random strategies (seeded with torch's generator).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

METRICS = ("pad", "kl", "js", "cosine", "euclidean")
FETCH_MODES = ("qkv",)  # alps_trl.localization.weights.FETCH_MODES, not imported to keep start-up lean
STRATEGIES = ("top_k", "random", "layer_consistent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alps-localize",
        description="Score every attention head by how much TASK moved it relative to BASE (ALPS, arXiv 2505.18799) "
        "and write the selected heads as JSON.",
    )
    parser.add_argument("base", help="base model: checkpoint directory, .gguf file, or hub id in the local HF cache")
    parser.add_argument(
        "task", help="task model (a fine-tune of BASE): checkpoint directory, .gguf file, or cached hub id"
    )
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of all heads to select, in (0, 1]")
    parser.add_argument("--metric", choices=METRICS, default="pad", help="head score (pad = the paper's W1)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="top_k", help="selection strategy")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the score")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random strategies")
    parser.add_argument("--device", default=None, help="where to compute (default: cuda if available, else cpu)")
    parser.add_argument("--output", "-o", default="heads.json", help="heads file to write (JSON)")
    parser.add_argument("--heatmap", default=None, help="also write a PNG heatmap of the scores to this path")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the matrix products (default: 1, unless OMP_NUM_THREADS or OPENBLAS_NUM_THREADS "
        "say otherwise; the products are small hd x hd by hd x d ones, on which multi-threaded BLAS gains little "
        "and slows down many times over on a machine busy with other jobs)",
    )
    parser.add_argument("--top", type=int, default=10, help="how many top heads the summary lists")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow custom config code (never needed "
        "for the supported architectures; weights are read without running model code)",
    )
    parser.add_argument(
        "--precision",
        choices=("mixed", "float64"),
        default="mixed",
        help="mixed: float32 matrix products, and float64 for the layers with heads near the top-k boundary (the "
        "same heads as float64, in less time); float64: every score in float64",
    )
    parser.add_argument(
        "--fetch",
        choices=FETCH_MODES,
        default=None,
        help="for hub ids not in the local cache: read only their q/k/v rows with HTTP range requests (about a "
        "tenth of a checkpoint), cached under $ALPS_TRL_CACHE (default ~/.cache/alps_trl). Off by default: "
        "nothing is downloaded",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit of TASK on the hub (default main)")
    parser.add_argument("--base-revision", default=None, help="branch, tag or commit of BASE on the hub (main)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    return parser


def _format_summary(selection, layout, seconds: float, top: int) -> str:
    total_qkv = layout.num_layers * layout.qkv_params_per_layer
    trainable = selection.trainable_qkv_params()
    lines = [
        f"base: {selection.provenance.get('base')}",
        f"task: {selection.provenance.get('task')}",
        f"model: {layout.model_type}, {layout.num_layers} layers x {layout.num_heads} heads "
        f"({layout.num_kv_heads} kv heads, head_dim {layout.head_dim}, hidden {layout.hidden_size})",
        selection.summary(top=top),
        f"trainable q/k/v weights: {trainable:,} of {total_qkv:,} ({100.0 * trainable / total_qkv:.2f}%), "
        f"kv groups touched: {int(selection.kv_mask_array().sum())}/{layout.num_layers * layout.num_kv_heads}",
        f"time: {seconds:.2f} s",
    ]
    return "\n".join(lines)


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _thread_limit(threads: int | None):
    """Cap the math libraries' threads while the command runs, then restore the caller's settings.

    numpy's BLAS reads its environment when numpy is first imported (on the console-script path, after
    this); torch is capped directly when it is already loaded. Without --threads and without any of
    THREAD_VARIABLES set, the cap is 1.
    """
    if threads is None and any(var in os.environ for var in THREAD_VARIABLES):
        yield
        return
    threads = 1 if threads is None else threads
    saved_env = {var: os.environ.get(var) for var in THREAD_VARIABLES}
    torch = sys.modules.get("torch")
    saved_torch = torch.get_num_threads() if torch is not None else None
    os.environ.update({var: str(threads) for var in THREAD_VARIABLES})
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        if torch is not None:
            torch.set_num_threads(saved_torch)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.threads is not None and args.threads < 1:
        print(f"alps-localize: error: --threads must be >= 1, got {args.threads}.", file=sys.stderr)
        return 2
    with _thread_limit(args.threads):  # before numpy is imported
        return _run(args, start)


def _run(args: argparse.Namespace, start: float) -> int:
    from alps_trl.localization.selection import HeadSelectionError, validate_ratio

    try:
        validate_ratio(args.ratio)
        if args.top < 0:
            raise ValueError(f"--top must be >= 0, got {args.top}.")
    except ValueError as err:
        print(f"alps-localize: error: {err}", file=sys.stderr)
        return 2

    from alps_trl.localization.localize import localize_heads
    from alps_trl.localization.scoring import open_pair

    try:
        base, task = open_pair(
            args.base,
            args.task,
            trust_remote_code=args.trust_remote_code,
            fetch=args.fetch,
            base_revision=args.base_revision,
            task_revision=args.revision,
            progress=not args.quiet,
        )
        selection = localize_heads(
            base,
            task,
            ratio=args.ratio,
            metric=args.metric,
            strategy=args.strategy,
            temperature=args.temperature,
            seed=args.seed,
            device=args.device,
            progress=not args.quiet,
            precision=args.precision,
        )
        selection.save(args.output)
        if args.heatmap:
            os.makedirs(os.path.dirname(os.path.abspath(args.heatmap)), exist_ok=True)
            selection.plot_heatmap(args.heatmap)
    except (ValueError, TypeError, OSError, ImportError, HeadSelectionError, RuntimeError) as err:
        message = " ".join(str(err).split())  # one line
        print(f"alps-localize: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alps-localize: interrupted", file=sys.stderr)
        return 130
    if not args.quiet:
        print(_format_summary(selection, base.layout, time.perf_counter() - start, args.top))
        written = args.output + (f", {args.heatmap}" if args.heatmap else "")
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
