"""The end-of-run report of a recipe: model, processes, selected heads, trainable parameters, the evaluation before
and after training, and where the outputs are; plus when an evaluation forward outside `train()` must be skipped."""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging

from alps_trl.recipes.demo import DEMO_MODEL_DISTRIBUTION, DEMO_MODEL_NAME

logger = logging.get_logger(__name__)


def selection_line(selection) -> str:
    """'Selected heads (K/N): L<layer>.H<head> ...' for a HeadSelection."""
    total = selection.num_layers * selection.num_heads
    return f"Selected heads ({len(selection.heads)}/{total}): " + " ".join(f"L{ly}.H{h}" for ly, h in selection.heads)


def trainable_lines(summary: dict[str, Any]) -> list[str]:
    """Lines from `Restriction.summary()`: trainable q/k/v params (% of attention) and all (% of the model)."""
    return [
        f"Trainable attention q/k/v params: {summary['trainable_qkv_params']:,} of {summary['qkv_params_total']:,} "
        f"({summary['pct_of_qkv']:.1f}% of attention q/k/v; {summary['mode']} mode, "
        f"{summary['kv_groups_selected']}/{summary['kv_groups_total']} kv groups)",
        f"Trainable params in total: {summary['trainable_params_total']:,} of {summary['params_total']:,} "
        f"({summary['pct_of_model']:.1f}% of the model; "
        f"{summary['trainable_params_total'] - summary['trainable_qkv_params']:,} of them outside q/k/v)",
    ]


# Shown before -> after; the relative change only for losses.
REPORTED_METRICS = ("eval_loss", "eval_mean_token_accuracy", "eval_rewards/accuracies", "eval_rewards/margins")


def loss_lines(before: dict[str, float] | None, after: dict[str, float] | None) -> list[str]:
    """'eval_loss: before X -> after Y (-Z%)' and the same for the accuracy/reward metrics both runs report."""
    if not before or not after:
        return []
    lines = []
    for key in REPORTED_METRICS:
        if key in before and key in after:
            b, a = float(before[key]), float(after[key])
            change = f" ({100.0 * (a - b) / abs(b):+.1f}%)" if key.endswith("loss") and b else ""
            lines.append(f"{key}: before {b:.4f} -> after {a:.4f}{change}")
    return lines


def output_lines(output_dir: str) -> list[str]:
    """Where the run wrote its model, head selection and heatmap."""
    out = os.path.abspath(output_dir)
    lines = [f"Model: {out}"]
    for name, what in (("alps_heads.json", "Head selection"), ("alps_heads.png", "Heatmap")):
        path = os.path.join(out, name)
        lines.append(f"{what}: {path}" + ("" if os.path.exists(path) else " (not written)"))
    from alps_trl.restriction.peft_export import ADAPTER_CONFIG
    from alps_trl.trainers.mixin import ADAPTER_DIR, DELTA_FILE, MERGE_HINT_FILE

    adapter = os.path.join(out, ADAPTER_DIR)
    if os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):  # alps_save_adapter: true
        lines.append(f"PEFT adapter: {adapter}")

    if os.path.exists(os.path.join(out, MERGE_HINT_FILE)):  # only a quantized base leaves unmerged deltas
        lines.append(
            f"Deltas of the quantized base: {os.path.join(out, DELTA_FILE)} (merge them into the full-precision base "
            f"with alps-merge, see {os.path.join(out, MERGE_HINT_FILE)})"
        )
    return lines


def generation_blocker(trainer, before_training: bool) -> str | None:
    """Why the model must not run an evaluation forward outside `train()` now, or None when it may.

    A quantized base on CPU before training (an eval forward repacks bitsandbytes 4-bit weights so that no gradient
    reaches the deltas afterwards); FSDP / DeepSpeed (evaluate() before train() would wrap the model, and a sharded
    model cannot generate on one process).
    """
    import torch

    if before_training and getattr(trainer.model, "is_quantized", False) and not torch.cuda.is_available():
        return "a quantized model must not run eval on CPU before training"
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        return "the model is sharded (FSDP/DeepSpeed); evaluate the saved model separately"
    return None


def evaluate_before_training(trainer) -> dict[str, float] | None:
    """`trainer.evaluate()` on the untrained model, or None (with a warning) where that would break training."""
    blocker = generation_blocker(trainer, before_training=True)
    if blocker:
        logger.warning(f"Skipping the evaluation before training: {blocker}.")
        return None
    return trainer.evaluate()


def summary_lines(
    trainer, before: dict | None, after: dict | None, seconds: float, model_name: str | None = None
) -> list[str]:
    """The end-of-run report: model, processes, selected heads, trainable parameters, eval before/after, outputs."""
    acc = trainer.accelerator
    lines = ["", "==== ALPS run summary ===="]
    if model_name:
        lines.append(f"Base model: {model_line(model_name, trainer.model)}")
    return lines + [
        f"Processes: {acc.num_processes} ({acc.distributed_type.value}, device {acc.device})",
        selection_line(trainer.head_selection),
        *trainable_lines(trainer.restriction.summary(trainer.model)),
        *loss_lines(before, after),
        *output_lines(trainer.args.output_dir),
        f"Done in {seconds:.1f} s.",
    ]


def model_line(model_name: str, model) -> str:
    """What was trained, as a user would name it: the demo model's name, or the path / hub id given."""
    from alps_trl.localization.gguf import packaged_gguf

    cfg = getattr(model, "config", None)
    shape = ""
    if cfg is not None and getattr(cfg, "num_hidden_layers", None):
        shape = (
            f" ({cfg.model_type}, {cfg.num_hidden_layers} layers x {cfg.num_attention_heads} heads, "
            f"{getattr(cfg, 'num_key_value_heads', cfg.num_attention_heads)} kv heads)"
        )
    if isinstance(model_name, str) and model_name == packaged_gguf(DEMO_MODEL_DISTRIBUTION):
        return f"{DEMO_MODEL_NAME} (GGUF from the {DEMO_MODEL_DISTRIBUTION} package){shape}"
    return f"{model_name}{shape}"
