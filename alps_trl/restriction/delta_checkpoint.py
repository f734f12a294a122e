"""ALPS delta files, and merging deltas into state dicts and checkpoints on disk.

Delta file layout (safetensors): for a base tensor ``T`` (e.g. ``model.layers.0.self_attn.q_proj.weight``)
``T.alps_delta`` (float32) holds the trained rows (or columns) and ``T.alps_rows`` (or ``T.alps_cols``,
int64) their global indices in ``T``. The metadata carries the format name and version, the
`HeadSelection` as JSON and the base model's name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from transformers.utils import logging

from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.localization.atomic import atomic_directory, atomic_write_file
from alps_trl.localization.selection import HeadSelection

logger = logging.get_logger(__name__)

DELTA_FORMAT = "alps_trl.delta"
DELTA_FORMAT_VERSION = 1
DELTA_SUFFIX = ".alps_delta"
INDEX_SUFFIXES = {0: ".alps_rows", 1: ".alps_cols"}


def apply_delta(tensor: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """A copy of `tensor` with `delta` added at `index` along `dim`, summed in float32, cast back.

    Args:
        tensor: base weight [out, in] or bias [out] (any float dtype).
        delta: float [len(index), in] / [len(index)] (dim 0) or [out, len(index)] (dim 1).
        index: int64 [n] global indices along `dim`.
    """
    index = index.to(device=tensor.device, dtype=torch.int64)
    rows = tensor.index_select(dim, index).to(torch.float32) + delta.to(device=tensor.device, dtype=torch.float32)
    return tensor.index_copy(dim, index, rows.to(tensor.dtype))


def split_delta_state_dict(deltas: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """{base tensor name: (delta, index, dim)} from a flat delta dict."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for key, value in deltas.items():
        if not key.endswith(DELTA_SUFFIX):
            continue
        name = key[: -len(DELTA_SUFFIX)]
        found = [(dim, deltas[name + sfx]) for dim, sfx in INDEX_SUFFIXES.items() if name + sfx in deltas]
        if len(found) != 1:
            raise ValueError(f"Delta {key!r} has no (or more than one) index tensor {name}.alps_rows/.alps_cols.")
        dim, index = found[0]
        out[name] = (value, index, dim)
    return out


def merge_state_dict(state_dict: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor]) -> dict:
    """A copy of a full (gathered) model state dict with the deltas added and delta entries dropped.

    Use this when the model itself cannot be merged in place (e.g. FSDP2-sharded: gather the full
    state dict first). `deltas` is `DeltaRestriction.delta_state_dict` or a loaded delta file.
    """
    parsed = split_delta_state_dict(deltas)
    out = {k: v for k, v in state_dict.items() if DELTA_SUFFIX + "." not in k and not k.endswith(DELTA_SUFFIX)}
    for name, (delta, index, dim) in parsed.items():
        if name not in out:
            raise KeyError(f"The state dict has no tensor {name!r} to merge a delta into.")
        out[name] = apply_delta(out[name], delta, index, dim)
    return out


# ---- delta files -------------------------------------------------------------------------------
def save_delta_file(
    deltas: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    selection: HeadSelection,
    base_model: str = "",
    restrict_o_proj: bool = False,
    rest_trained: bool = False,
) -> None:
    """Save a delta dict as safetensors; metadata: format, version, selection JSON, base model name, and whether the
    run also trained the rest of the network (`rest_trained`: then the deltas are not all it changed).

    Atomic (`atomic_write_file`): a kill or a failed write leaves the previous file or nothing at `path`; a
    failed write raises an OSError naming `path`."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "alps_format": DELTA_FORMAT,
        "alps_format_version": str(DELTA_FORMAT_VERSION),
        "selection": json.dumps(selection.to_dict()),
        "base_model": str(base_model or ""),
        "restrict_o_proj": json.dumps(bool(restrict_o_proj)),
        "rest_trained": json.dumps(bool(rest_trained)),
    }
    tensors = {k: v.contiguous() for k, v in deltas.items()}
    with atomic_write_file(path) as temp:
        save_file(tensors, temp, metadata=metadata)


def load_delta_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], HeadSelection, dict[str, str]]:
    """Read a delta file: (tensors, selection, metadata). Raises ValueError for a file that is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Delta file {path!r} does not exist.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for foreign files
        raise ValueError(f"{path!r} is not a safetensors file ({err}); pass an ALPS delta file.") from None
    if metadata.get("alps_format") != DELTA_FORMAT:
        raise ValueError(
            f"{path!r} is not an ALPS delta file (no alps_format={DELTA_FORMAT!r} in its metadata). Create one with "
            "DeltaRestriction.save_delta() (the ALPS trainers do so for quantized bases)."
        )
    if metadata.get("alps_format_version") != str(DELTA_FORMAT_VERSION):
        raise ValueError(
            f"{path!r} has delta format version {metadata.get('alps_format_version')!r}; this alps_trl reads "
            f"version {DELTA_FORMAT_VERSION}."
        )
    try:
        selection_data = json.loads(metadata["selection"])
    except (KeyError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(
            f"{path!r} holds no readable head selection in its metadata ({type(err).__name__})."
        ) from None
    selection = HeadSelection.from_dict(selection_data, source=f"Delta file {path!r}")
    return tensors, selection, metadata


def check_delta(name: str, delta: torch.Tensor, index: torch.Tensor, dim: int, shape: tuple[int, ...]) -> None:
    """Check one delta against the shape of the tensor it applies to, before any indexing; ValueError if it does
    not fit: `index` 1-D integer, unique, in [0, shape[dim]); `delta` the shape of those rows (or columns)."""
    if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"the index of delta {name!r} is not a 1-D integer tensor (shape {list(index.shape)}).")
    n = int(index.numel())
    if dim >= len(shape):
        raise ValueError(f"delta {name!r} indexes dimension {dim} of a tensor of shape {list(shape)}.")
    if n and (int(index.min()) < 0 or int(index.max()) >= shape[dim]):
        raise ValueError(f"the index of delta {name!r} leaves [0, {shape[dim]}) (tensor shape {list(shape)}).")
    if n != int(torch.unique(index).numel()):
        raise ValueError(f"the index of delta {name!r} repeats a row.")
    expected = list(shape)
    expected[dim] = n
    if list(delta.shape) != expected:
        raise ValueError(f"delta {name!r} has shape {list(delta.shape)}, but its index and tensor imply {expected}.")


# ---- merging into a checkpoint on disk --------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_config(config_path: str) -> dict:
    """A base checkpoint's config.json as a dict, its head counts checked; ValueError naming the file."""
    from alps_trl.localization.anatomy import head_counts

    try:
        with open(config_path, "rb") as f:
            config = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({type(err).__name__}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} does not hold a JSON object.")
    quantization = config.get("quantization_config")
    if quantization is not None and not isinstance(quantization, dict):
        raise ValueError(f"{config_path}: quantization_config is not a JSON object.")
    try:
        head_counts(config)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    return config


def _resolve_checkpoint_dir(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not available locally"
        raise FileNotFoundError(
            f"Base checkpoint {path!r} is neither a local directory nor a model in the local Hugging Face cache "
            f"({type(err).__name__}). Pass the full-precision base model's directory."
        ) from None


def _weight_files(base_dir: str) -> tuple[list[str], str | None]:
    """(shard file names, index file name or None), safetensors preferred over .bin."""
    for index_name in WEIGHT_INDEXES:
        index_path = os.path.join(base_dir, index_name)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            return sorted(set(weight_map.values())), index_name
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(base_dir, single)):
            return [single], None
    raise FileNotFoundError(
        f"No model weights (model.safetensors, pytorch_model.bin or a sharded index) in {base_dir!r}."
    )


def _read_shard(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # safetensors refuses shared storage (e.g. tied weights in a .bin): give every tensor its own.
    return {k: v.detach().clone().contiguous() for k, v in state.items()}, {}


def _shard_names(base_dir: str, files: list[str]) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for name in files:
        path = os.path.join(base_dir, name)
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                names[name] = list(f.keys())
        else:
            names[name] = list(torch.load(path, map_location="meta", weights_only=True, mmap=True).keys())
    return names


def _translate_names(
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, int]], config: dict, checkpoint_names: set[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Map the delta file's (in-memory model) tensor names onto the checkpoint's names, via the layouts."""
    if all(name in checkpoint_names for name in deltas):
        return deltas
    model_layout = AttentionLayout.from_config(config)
    ckpt_layout = AttentionLayout.from_config(config, checkpoint_names)
    mapping: dict[str, str] = {}
    for mine, theirs in zip(model_layout.layers, ckpt_layout.layers):
        for field in ("q_weight", "k_weight", "v_weight", "q_bias", "k_bias", "v_bias"):
            a, b = getattr(mine, field), getattr(theirs, field)
            if a is not None and b is not None:
                mapping[a.name] = b.name
        mapping[mine.o_weight] = theirs.o_weight
    out = {}
    for name, value in deltas.items():
        target = name if name in checkpoint_names else mapping.get(name)
        if target is None or target not in checkpoint_names:
            raise ValueError(f"The base checkpoint has no tensor for delta {name!r}: is it the right base model?")
        out[target] = value
    return out


def merge_delta_checkpoint(
    base_path: str | os.PathLike, delta_path: str | os.PathLike, output_path: str | os.PathLike
) -> str:
    """Apply a delta file to a full-precision base checkpoint and write a standard checkpoint.

    Streams the base one shard at a time: every q/k/v (or o_proj) tensor with a delta gets
    ``(base.float() + delta)`` at the delta's rows/columns, cast back to the checkpoint dtype; all
    other tensors are copied unchanged. Writes safetensors shards (``.bin`` shards are converted)
    plus the index, and copies config, generation config and tokenizer files.

    Args:
        base_path: the full-precision base model directory (or a hub id in the local HF cache).
        delta_path: a delta file written by `DeltaRestriction.save_delta`.
        output_path: the output directory (not the base directory, nor one holding the inputs). It is written
            atomically (`atomic_directory`): built in a hidden sibling directory, then renamed into place, so a
            kill or a failed write (full disk, read-only directory) leaves the previous output or nothing. An
            existing `output_path` is replaced as a whole, and only when it is an earlier checkpoint (holds a
            config.json) or empty.

    Returns:
        The output directory.
    """

    base_dir = _resolve_checkpoint_dir(base_path)
    output_path = os.fspath(output_path)
    if os.path.abspath(output_path) == os.path.abspath(base_dir):
        raise ValueError("The output directory must differ from the base checkpoint directory.")
    check_output_outside_inputs(output_path, base_dir, delta_path)
    config_path = os.path.join(base_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{base_dir!r} has no config.json: pass a Hugging Face model directory.")
    config = read_config(config_path)
    if config.get("quantization_config"):
        raise ValueError(
            f"{base_dir!r} is a quantized checkpoint ({config['quantization_config'].get('quant_method', '?')}). "
            "Merge the deltas into the full-precision base model it was quantized from."
        )
    tensors, selection, metadata = load_delta_file(delta_path)
    selection.check_compatible(config)
    try:
        parsed = split_delta_state_dict(tensors)
    except ValueError as err:
        raise ValueError(f"{os.fspath(delta_path)!r}: {err}") from None
    files, index_name = _weight_files(base_dir)
    names_by_file = _shard_names(base_dir, files)
    all_names = {n for names in names_by_file.values() for n in names}
    deltas = _translate_names(parsed, config, all_names)

    with atomic_directory(output_path, replaceable=_is_checkpoint_dir, what="checkpoint") as temp:
        applied = _write_merged(base_dir, temp, files, index_name, deltas, os.fspath(delta_path))
    logger.info(
        f"Merged {len(applied)} ALPS deltas ({len(selection.heads)} heads, base {metadata.get('base_model') or '?'}) "
        f"into {output_path}."
    )
    return output_path


def _is_checkpoint_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "config.json"))


def check_output_outside_inputs(output_path: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """Refuse an output directory that is, or holds, one of the inputs: replacing it would delete them."""
    out = os.path.realpath(os.fspath(output_path))
    for item in inputs:
        src = os.path.realpath(os.fspath(item))
        if src == out or src.startswith(out + os.sep):
            raise ValueError(
                f"The output directory {os.fspath(output_path)} holds the input {os.fspath(item)}: it is replaced "
                "as a whole, so pass a new directory."
            )


def _write_merged(
    base_dir: str, output_path: str, files: list[str], index_name: str | None, deltas: dict, delta_path: str
) -> set[str]:
    """Write the merged shards, the index and the other files of `base_dir` into `output_path`; the names merged.
    `delta_path` names the delta file in errors."""
    from safetensors.torch import save_file

    applied: set[str] = set()
    weight_map: dict[str, str] = {}
    for name in files:
        shard, shard_meta = _read_shard(os.path.join(base_dir, name))
        for key in shard:
            if key in deltas:
                delta, index, dim = deltas[key]
                try:
                    check_delta(key, delta, index, dim, tuple(shard[key].shape))
                except ValueError as err:
                    raise ValueError(f"{delta_path!r} does not fit the base checkpoint: {err}") from None
                shard[key] = apply_delta(shard[key], delta, index, dim)
                applied.add(key)
        out_name = name if name.endswith(".safetensors") else _safetensors_name(name)
        save_file(shard, os.path.join(output_path, out_name), metadata={**shard_meta, "format": "pt"})
        weight_map.update(dict.fromkeys(shard, out_name))
        del shard
    missing = set(deltas) - applied
    if missing:
        raise ValueError(f"Deltas for {sorted(missing)[:3]} found no tensor in the base checkpoint.")
    if index_name is not None:
        with open(os.path.join(base_dir, index_name)) as f:
            index = json.load(f)
        index["weight_map"] = weight_map
        with open(os.path.join(output_path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    for entry in sorted(os.listdir(base_dir)):
        src = os.path.join(base_dir, entry)
        if not os.path.isfile(src) or entry in WEIGHT_INDEXES or entry.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(src, os.path.join(output_path, entry))
    return applied


def _safetensors_name(bin_name: str) -> str:
    stem = bin_name[: -len(".bin")] if bin_name.endswith(".bin") else bin_name
    return stem.replace("pytorch_model", "model") + ".safetensors"


def describe_delta_file(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata summary of a delta file (for CLIs): heads, base model, number of tensors and entries."""
    tensors, selection, metadata = load_delta_file(path)
    try:
        parsed = split_delta_state_dict(tensors)
    except ValueError as err:
        raise ValueError(f"{os.fspath(path)!r}: {err}") from None
    return {
        "heads": len(selection.heads),
        "base_model": metadata.get("base_model", ""),
        "tensors": len(parsed),
        "entries": sum(int(v[0].numel()) for v in parsed.values()),
    }
