"""`alps-merge`: apply an ALPS delta file to the full-precision base model and write a standard checkpoint, or
(``--to-peft``) turn it into a PEFT LoRA adapter over the base.

Usage:
    alps-merge BASE DELTA OUTPUT
    alps-merge BASE DELTA OUTPUT --to-peft [--uniform-rank]

BASE is the base model (a checkpoint directory or a hub id already in the local Hugging Face cache), DELTA the
delta file an ALPS run in delta mode saved (e.g. with a 4-bit base), OUTPUT a new directory. Merging streams the
full-precision base one shard at a time; the selected heads' q/k/v rows get base + delta (summed in float32,
stored in the checkpoint's dtype); config and tokenizer files are copied, so
`AutoModelForCausalLM.from_pretrained(OUTPUT)` loads the trained model. ``--to-peft`` reads only BASE's config
and writes ``adapter_config.json`` + ``adapter_model.safetensors`` (``base_model_name_or_path`` = BASE as given;
a quantized BASE gives a QLoRA-style adapter over it), which `PeftModel.from_pretrained(base, OUTPUT)` loads.

OUTPUT is written atomically: built in a hidden directory beside it and renamed into place, so a killed or
failed run (full disk, read-only directory) leaves the previous OUTPUT or none. An existing OUTPUT is replaced
as a whole, and only when it is an earlier checkpoint (config.json) or adapter (adapter_config.json), or empty.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alps-merge",
        description="Merge an ALPS head-delta file into its full-precision base model (writes safetensors), or "
        "convert it into a PEFT LoRA adapter with --to-peft.",
    )
    parser.add_argument("base", help="base model: checkpoint directory or hub id in the local HF cache")
    parser.add_argument("delta", help="ALPS delta file (.safetensors) written by a delta-mode run")
    parser.add_argument("output", help="output directory: the merged checkpoint (must differ from BASE) or adapter")
    parser.add_argument(
        "--to-peft",
        action="store_true",
        help="write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) instead of a checkpoint",
    )
    parser.add_argument(
        "--uniform-rank",
        action="store_true",
        help="with --to-peft: one rank for every module (the largest, zero-padded), for vLLM's --max-lora-rank",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.uniform_rank and not args.to_peft:
        parser.error("--uniform-rank shapes a PEFT adapter: add --to-peft")
    from alps_trl.restriction.delta import describe_delta_file, merge_delta_checkpoint
    from alps_trl.restriction.peft_export import delta_file_to_adapter

    try:
        info = describe_delta_file(args.delta)
        if args.to_peft:
            adapter = delta_file_to_adapter(args.base, args.delta, args.output, uniform_rank=args.uniform_rank)
        else:
            out = merge_delta_checkpoint(args.base, args.delta, args.output)
    except (OSError, ValueError, KeyError, ImportError) as err:  # OSError: also a full disk, a read-only OUTPUT
        message = " ".join(str(err).split())  # one line
        print(f"alps-merge: error: {message}", file=sys.stderr)
        return 2
    if args.to_peft:
        print(
            f"Wrote a PEFT LoRA adapter of {info['tensors']} delta tensors ({info['heads']} heads) over {args.base} "
            f"-> {adapter.directory} ({len(adapter.ranks)} modules, largest rank {adapter.max_rank}, "
            f"{adapter.bytes_on_disk:,} bytes; {adapter.vllm_hint()})"
        )
        return 0
    print(
        f"Merged {info['tensors']} delta tensors ({info['entries']} entries, {info['heads']} heads) "
        f"into {args.base} -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
