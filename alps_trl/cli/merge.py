"""`alps-merge`: apply an ALPS delta file to the full-precision base model and write a standard checkpoint.

Usage:
    alps-merge BASE DELTA OUTPUT

BASE is the full-precision base model (a checkpoint directory or a hub id already in the local Hugging
Face cache), DELTA the delta file an ALPS run in delta mode saved (e.g. with a 4-bit base), OUTPUT a new
directory. The base is streamed one shard at a time; the selected heads' q/k/v rows get base + delta
(summed in float32, stored in the checkpoint's dtype); config and tokenizer files are copied, so
`AutoModelForCausalLM.from_pretrained(OUTPUT)` loads the trained model.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alps-merge",
        description="Merge an ALPS head-delta file into its full-precision base model (writes safetensors).",
    )
    parser.add_argument("base", help="full-precision base model: checkpoint directory or hub id in the local HF cache")
    parser.add_argument("delta", help="ALPS delta file (.safetensors) written by a delta-mode run")
    parser.add_argument("output", help="output directory for the merged checkpoint (must differ from BASE)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from alps_trl.restriction.delta import describe_delta_file, merge_delta_checkpoint

    try:
        info = describe_delta_file(args.delta)
        out = merge_delta_checkpoint(args.base, args.delta, args.output)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"alps-merge: error: {err}", file=sys.stderr)
        return 2
    print(
        f"Merged {info['tensors']} delta tensors ({info['entries']} entries, {info['heads']} heads) "
        f"into {args.base} -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
