"""Step-time overhead of ALPS mask mode over plain full fine-tuning under 2-process DDP, measured side by side.

Both runs live in the same launch: two identical DDP-wrapped models (same init, same batches), one trained
plainly, one with the ALPS mask restriction (10% of heads; the rest of the network trains, the paper's
setting), so both do the same forward/backward/all-reduce work and differ only by what ALPS adds: the
post-accumulate-grad hooks, the explicit `mask_gradients` after the all-reduce, and the row-wise weight decay
before the optimizer step. Blocks of steps alternate between the two, so load changes on a shared machine hit
both alike; the ratio of the median step times is printed (target: <= 1.05).

    python -m benchmarks.cost.ddp_overhead                      # 2 gloo ranks on the CPU
    python -m benchmarks.cost.ddp_overhead --gpu                # 2 GPUs (NCCL)
    python -m benchmarks.cost.ddp_overhead --blocks 10 --block-steps 5 --hidden 512

Without --worker the script launches itself with `accelerate launch` and the repository's
recipes/accelerate_configs/multi_gpu.yaml.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run the 2 ranks on GPUs instead of the CPU")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8, help="blocks per variant (alternating)")
    parser.add_argument("--block-steps", type=int, default=4, help="optimizer steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch(args: argparse.Namespace) -> int:
    """Re-run this script as `accelerate launch` workers with the repo's multi-GPU (DDP) config."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
        "--config_file", str(REPO / "recipes" / "accelerate_configs" / "multi_gpu.yaml"),
        "--num_processes", str(args.num_processes), "--main_process_port", str(port), "--mixed_precision", "no",
        __file__, "--worker", *sys.argv[1:],
    ]  # fmt: skip
    env = dict(os.environ)
    if not args.gpu:
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, check=False).returncode


def build(args, accelerator, alps: bool):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alps_trl.localization.anatomy import AttentionLayout
    from alps_trl.localization.selection import HeadSelection, num_selected, select_random
    from alps_trl.restriction import build_restriction

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    restriction = None
    decay, no_decay = [p for p in model.parameters()], []
    if alps:
        layout = AttentionLayout.from_model(model)
        k = num_selected(args.ratio, layout.num_layers, layout.num_heads)
        heads = select_random(layout.num_layers, layout.num_heads, k, 0)
        selection = HeadSelection(layout.num_layers, layout.num_heads, layout.num_kv_heads, heads)
        restriction = build_restriction(model, selection, "mask")
        restriction.install(model)
        exempt = restriction.decay_exempt_parameter_names(model)
        named = list(model.named_parameters())
        decay = [p for n, p in named if p.requires_grad and n not in exempt]
        no_decay = [p for n, p in named if p.requires_grad and n in exempt]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    if restriction is not None:
        restriction.attach(model)
    return model, optimizer, restriction


def step(accelerator, model, optimizer, restriction, ids) -> float:
    """One optimizer step, in the order the ALPS trainers use; returns its wall time (ranks synchronised)."""
    import torch

    accelerator.wait_for_everyone()
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    if restriction is not None:
        restriction.mask_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if restriction is not None:
        restriction.apply_weight_decay(model, optimizer.param_groups[0]["lr"], 0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    accelerator.wait_for_everyone()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator()
    ddp_types = (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.num_processes != args.num_processes or accelerator.distributed_type not in ddp_types:
        raise RuntimeError(
            f"expected {args.num_processes} DDP processes, got {accelerator.num_processes} "
            f"({accelerator.distributed_type}); the measurement would not be a DDP measurement"
        )
    plain = build(args, accelerator, alps=False)
    alps = build(args, accelerator, alps=True)
    if type(plain[0]).__name__ != "DistributedDataParallel":
        raise RuntimeError(f"the model is not DDP-wrapped ({type(plain[0]).__name__})")
    gen = torch.Generator().manual_seed(1000 + accelerator.process_index)
    batches = [
        torch.randint(2, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(accelerator.device)
        for _ in range(4)
    ]
    times: dict[str, list[float]] = {"full fine-tuning": [], "ALPS mask": []}
    runs = {"full fine-tuning": plain, "ALPS mask": alps}
    for run in runs.values():
        for i in range(args.warmup):
            step(accelerator, *run, batches[i % len(batches)])
    for block in range(args.blocks):
        # Alternate which variant goes first, so neither always follows the other.
        order = list(runs) if block % 2 == 0 else list(runs)[::-1]
        for name in order:
            for i in range(args.block_steps):
                times[name].append(step(accelerator, *runs[name], batches[(block + i) % len(batches)]))
    if alps[2] is not None:
        alps[2].detach()
    if accelerator.is_main_process:
        full, masked = (statistics.median(times[k]) for k in ("full fine-tuning", "ALPS mask"))
        n = len(times["ALPS mask"])
        print(
            f"\nDDP step time, {accelerator.num_processes} ranks ({accelerator.distributed_type.value}, "
            f"{accelerator.device.type}), Llama d={args.hidden} x {args.layers} layers, vocab {args.vocab}, "
            f"batch {args.batch_size}x{args.seq_len} per rank, {args.blocks} alternating blocks of "
            f"{args.block_steps} steps ({n} timed steps per variant)\n"
            f"| variant | median ms | min ms | max ms |\n|---|---:|---:|---:|"
        )
        for name, values in times.items():
            print(f"| {name} | {1000 * statistics.median(values):.1f} | {1000 * min(values):.1f} | "
                  f"{1000 * max(values):.1f} |")  # fmt: skip
        ratio = masked / full
        fastest = min(times["ALPS mask"]) / min(times["full fine-tuning"])
        print(f"\nALPS mask / full fine-tuning step time (median): {ratio:.3f} (target <= 1.05)")
        # The fastest steps are the least disturbed by other load on a shared machine: a second, steadier view.
        print(f"ALPS mask / full fine-tuning step time (fastest step): {fastest:.3f}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    sys.exit(main())
