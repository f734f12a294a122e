"""Tiny, offline building blocks for trainer tests: datasets, a tokenizer, models and configs.

Everything is built in code (no downloads) and small enough that a trainer step takes milliseconds.
Import from tests as ``from trainer_helpers import ...`` (pytest puts tests/ on sys.path) or from
scripts as ``tests.trainer_helpers``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    f"Question: what is {a} plus {b}? Answer: {a + b}. The quick brown fox jumps over the lazy dog."
    for a in range(20)
    for b in range(5)
]

_TOKENIZER = None


def tiny_tokenizer():
    """The locally trained byte-level BPE tokenizer (vocab 512, pad 0, eos 1), built once per process."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from alps_trl.testing import build_tokenizer

        _TOKENIZER = build_tokenizer(CORPUS, vocab_size=512)
    return _TOKENIZER


def sft_dataset(n: int = 16):
    """A language-modeling dataset with a "text" column (what TRL's SFT docs use)."""
    from datasets import Dataset

    return Dataset.from_dict({"text": [CORPUS[(7 * i) % len(CORPUS)] for i in range(n)]})


def dpo_dataset(n: int = 16):
    """A preference dataset with "prompt", "chosen", "rejected" columns (TRL's standard format)."""
    from datasets import Dataset

    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        a, b = i % 20, (3 * i) % 5
        rows["prompt"].append(f"Question: what is {a} plus {b}? Answer:")
        rows["chosen"].append(f" {a + b}. The quick brown fox.")
        rows["rejected"].append(f" {a + b + 1}. The lazy dog.")
    return Dataset.from_dict(rows)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random causal LM (d=64, 2 layers, 8 heads, 2 kv heads) in float32."""
    from alps_trl.testing import tiny_model as _tiny

    return _tiny(arch, seed=seed, **overrides)


def save_tiny_model(path: str, arch: str = "llama", seed: int = 0) -> str:
    """Save a tiny model and the tokenizer to `path` (a local checkpoint directory) and return `path`."""
    model = tiny_model(arch, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def common_args(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """Training arguments that keep CPU tests fast and bit-comparable: fp32, no reporting, few steps."""
    args = dict(
        output_dir=output_dir,
        bf16=False,
        report_to="none",
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args


def sft_config(output_dir: str, alps: bool = True, **overrides: Any):
    """An `AlpsSFTConfig` (or a plain `trl.SFTConfig` with alps=False) for tiny runs (max_length 48)."""
    from trl import SFTConfig

    from alps_trl.trainers.config import AlpsSFTConfig

    cls = AlpsSFTConfig if alps else SFTConfig
    kwargs = common_args(output_dir, max_length=48)
    kwargs.update(overrides)
    return cls(**kwargs)


def dpo_config(output_dir: str, alps: bool = True, **overrides: Any):
    """An `AlpsDPOConfig` (or a plain `trl.DPOConfig` with alps=False) for tiny runs (max_length 48)."""
    from trl import DPOConfig

    from alps_trl.trainers.config import AlpsDPOConfig

    cls = AlpsDPOConfig if alps else DPOConfig
    kwargs = common_args(output_dir, max_length=48)
    kwargs.update(overrides)
    return cls(**kwargs)


def qkv_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every attention q/k/v weight and bias, keyed by parameter name."""
    from alps_trl.localization.anatomy import AttentionLayout

    layout = AttentionLayout.from_model(model)
    params = dict(model.named_parameters())
    out = {}
    for lp in layout.layers:
        for name in lp.qkv_tensor_names():
            out[name] = params[name].detach().clone()
    return out


def selected_row_mask(model: torch.nn.Module, selection, name: str) -> torch.Tensor:
    """bool [rows]: True for rows of tensor `name` that belong to a selected head (q) or its kv group (k/v)."""
    from alps_trl.localization.anatomy import AttentionLayout

    layout = AttentionLayout.from_model(model)
    mask = torch.zeros(dict(model.named_parameters())[name].shape[0], dtype=torch.bool)
    for lp in layout.layers:
        heads = selection.heads_in_layer(lp.layer)
        groups = sorted({layout.kv_group_of(h) for h in heads})
        roles = (("q", heads, layout.q_rows), ("k", groups, layout.kv_rows), ("v", groups, layout.kv_rows))
        for kind, items, rows_of in roles:
            for block in (getattr(lp, f"{kind}_weight"), getattr(lp, f"{kind}_bias")):
                if block is None or block.name != name:
                    continue
                for item in items:
                    rel = rows_of(item)
                    mask[block.slice(rel.start, rel.stop)] = True
    return mask


def assert_restricted(before: dict[str, torch.Tensor], model: torch.nn.Module, selection) -> None:
    """Every unselected q/k/v row bit-identical to `before`; at least one selected row changed."""
    params = dict(model.named_parameters())
    changed_selected = False
    for name, old in before.items():
        new = params[name].detach()
        mask = selected_row_mask(model, selection, name)
        assert torch.equal(new[~mask], old[~mask]), f"unselected rows of {name} changed"
        if mask.any() and not torch.equal(new[mask], old[mask]):
            changed_selected = True
    assert changed_selected, "no selected q/k/v row changed"


def non_attention_changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    """Whether any MLP weight differs from the `before` snapshot (a full named_parameters clone)."""
    for name, p in model.named_parameters():
        if ".mlp." in name and name in before and not torch.equal(p.detach(), before[name]):
            return True
    return False


def full_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of all parameters, keyed by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
