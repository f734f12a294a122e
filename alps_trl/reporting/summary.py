"""What a run reports about its head selection: the startup table, the output files, tracker logs.

Files written next to the model (`output_dir` and every `checkpoint-*`): ``alps_heads.json`` (the
`HeadSelection`, reloadable with `HeadSelection.load` or `alps_heads=`) and ``alps_heads.png`` (the
layers x heads heatmap, selected heads outlined).
"""

from __future__ import annotations

import os
from typing import Any

from transformers.utils import logging

from alps_trl.localization.atomic import copy_file_atomic
from alps_trl.localization.selection import HeadSelection

logger = logging.get_logger(__name__)

HEADS_FILE = "alps_heads.json"
HEATMAP_FILE = "alps_heads.png"


def summary_table(summary: dict[str, Any]) -> str:
    """A compact two-column table of `Restriction.summary()`."""
    rows = [
        ("mode", summary["mode"]),
        ("heads selected", f"{summary['heads_selected']:,} / {summary['heads_total']:,}"),
        ("kv groups selected", f"{summary['kv_groups_selected']:,} / {summary['kv_groups_total']:,}"),
        (
            "trainable q/k/v params",
            f"{summary['trainable_qkv_params']:,} / {summary['qkv_params_total']:,} ({summary['pct_of_qkv']:.2f}%)",
        ),
        (
            "trainable params (total)",
            f"{summary['trainable_params_total']:,} / {summary['params_total']:,} ({summary['pct_of_model']:.2f}%)",
        ),
        ("non-attention trains", str(summary["train_non_attention"])),
        ("o_proj restricted", str(summary["restrict_o_proj"])),
    ]
    width = max(len(k) for k, _ in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (max(len(str(v)) for _, v in rows) + 2) + "+"
    body = [f"| {k:<{width}} | {str(v):<{len(line) - width - 7}} |" for k, v in rows]
    return "\n".join(["ALPS restriction", line, *body, line])


def tracker_scalars(summary: dict[str, Any], selection: HeadSelection) -> dict[str, float]:
    """Scalars for experiment trackers (prefix ``alps/``)."""
    out = {
        "alps/heads_selected": float(summary["heads_selected"]),
        "alps/heads_total": float(summary["heads_total"]),
        "alps/trainable_qkv_params": float(summary["trainable_qkv_params"]),
        "alps/pct_of_qkv": float(summary["pct_of_qkv"]),
        "alps/trainable_params_total": float(summary["trainable_params_total"]),
        "alps/pct_of_model": float(summary["pct_of_model"]),
    }
    if selection.scores is not None:
        out["alps/score_max"] = float(selection.scores.max())
        out["alps/score_mean"] = float(selection.scores.mean())
    return out


def write_selection_files(selection: HeadSelection, directory: str) -> tuple[str, str | None]:
    """Write alps_heads.json and alps_heads.png into `directory`; returns their paths (png None on failure)."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, HEADS_FILE)
    selection.save(json_path)
    png_path: str | None = os.path.join(directory, HEATMAP_FILE)
    try:
        selection.plot_heatmap(png_path)
    except Exception as err:  # noqa: BLE001 - a missing plotting backend must not stop training
        logger.warning(f"Could not draw the ALPS heatmap ({type(err).__name__}: {err}); {HEADS_FILE} is written.")
        png_path = None
    return json_path, png_path


def copy_selection_files(source_dir: str, target_dir: str) -> None:
    """Copy alps_heads.json/.png from `source_dir` to `target_dir` (e.g. into a checkpoint)."""
    if os.path.abspath(source_dir) == os.path.abspath(target_dir):
        return
    os.makedirs(target_dir, exist_ok=True)
    for name in (HEADS_FILE, HEATMAP_FILE):
        src = os.path.join(source_dir, name)
        if os.path.isfile(src):
            copy_file_atomic(src, os.path.join(target_dir, name))


def log_heatmap_to_trackers(callbacks: list[Any], png_path: str | None) -> None:
    """Send the heatmap image to wandb / TensorBoard when those integrations are active (best effort)."""
    if not png_path or not os.path.isfile(png_path):
        return
    for cb in callbacks:
        name = type(cb).__name__
        try:
            if name == "WandbCallback" and getattr(cb, "_wandb", None) is not None and cb._wandb.run is not None:
                cb._wandb.log({"alps/heads": cb._wandb.Image(png_path)})
            elif name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
                import matplotlib.image as mpimg

                cb.tb_writer.add_image("alps/heads", mpimg.imread(png_path)[..., :3], dataformats="HWC")
        except Exception as err:  # noqa: BLE001 - tracker hiccups must not stop training
            logger.warning(f"Could not log the ALPS heatmap to {name}: {type(err).__name__}: {err}")
