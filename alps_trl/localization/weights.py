"""Stream one layer's q/k/v weights at a time, from a checkpoint, the local HF cache or a model in memory.

Layer 2 (docs/architecture.md). Scoring needs a few attention matrices per layer; loading a whole model
to read them costs the model's full size in memory. A `WeightSource` reads only the rows it is asked
for:

- safetensors (single file or sharded with ``model.safetensors.index.json``): the header is parsed and
  the requested rows are read with positioned reads. No memory map: the pages of a mapped file count
  towards the process's resident memory once touched, which for a checkpoint is most of its size.
- ``pytorch_model.bin`` (single or sharded): only through ``torch.load(weights_only=True, mmap=True)``.
- a hub id: resolved from the local HF cache only (``local_files_only=True``), never downloaded.
- a model in memory (possibly wrapped by DDP/torch.compile), or a Mapping of tensors with a config.

Safetensors rows are decoded with numpy (bf16 -> float32 is a 16-bit shift), so scoring a checkpoint on
CPU never imports torch; torch is imported only for `.bin` files, in-memory models and the torch-facing
`layer_qkv`.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from alps_trl.localization.anatomy import AttentionLayout, unwrap_model

if TYPE_CHECKING:
    import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX)

# safetensors dtype -> numpy dtype of the stored bytes. bf16 has no numpy dtype: it is read as uint16 and
# widened to float32 exactly; float8 rows go through torch.
_SAFETENSORS_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
}
_TORCH_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def bf16_to_float32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32 of the same values (exact: the top half of a float32).

    `out`: optional float32 array of bits' shape to write into.
    """
    wide = np.empty(bits.shape, dtype=np.uint32) if out is None else out.view(np.uint32)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)
    return wide.view(np.float32)


def _scratch(scratch: dict | None, key: str, shape: list[int], dtype: Any) -> np.ndarray | None:
    """A reusable array of `shape`/`dtype` kept in `scratch` under `key` (None without a scratch dict)."""
    if scratch is None:
        return None
    buf = scratch.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
        buf = scratch[key] = np.empty(shape, dtype=dtype)
    return buf


def _to_numpy(t: Any) -> np.ndarray:
    """A CPU numpy array of a torch tensor's values (float dtypes numpy lacks, e.g. bf16, widen to float32)."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in (torch.bfloat16,) or (t.is_floating_point() and t.element_size() == 1):
        t = t.to(torch.float32)
    return t.numpy()


# ---- tensor stores: names, shapes and row reads, whatever the storage -------------------------------
class _TensorStore:
    """Read access to named 2-D (or 1-D) tensors by rows. Subclasses implement the storage."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (dim 0), in its stored dtype, as a new CPU tensor."""
        raise NotImplementedError

    def array_rows(self, name: str, start: int, stop: int, scratch: dict | None = None) -> np.ndarray:
        """Rows [start, stop) of tensor `name` as a numpy array (bf16/float8 widened to float32).

        May share memory with the store (an in-memory model's parameters) or, given `scratch` (a dict the
        caller keeps), with arrays reused by the next call with the same dict: do not modify it.
        """
        return _to_numpy(self.rows(name, start, stop))


# Refused before anything is read: a header this long is not one (the largest real ones are a few MB).
MAX_HEADER_BYTES = 100_000_000


def parse_header_length(raw: bytes, where: str, file_size: int | None = None) -> int:
    """The header length that a safetensors file's first 8 bytes (`raw`) hold; `where` names the file in errors.

    `file_size` (when known): the file's size, which the header must fit in.
    """
    if len(raw) != 8:
        raise ValueError(f"{where} is not a safetensors file (shorter than its 8-byte header length).")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"{where} is not a safetensors file (implausible header length {header_len}).")
    if file_size is not None and 8 + header_len > file_size:
        raise ValueError(
            f"{where} is truncated or not a safetensors file: its header length {header_len} runs past the end of "
            f"the file ({file_size} bytes)."
        )
    return header_len


def parse_header(raw: bytes, where: str, data_size: int | None = None) -> dict[str, dict]:
    """Tensor entries (name -> dtype, shape, data_offsets) of a safetensors header, without ``__metadata__``.

    Every entry is checked (`validate_entries`) before anything uses it; `data_size`: the bytes after the
    header, when known.
    """
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not a safetensors file (unreadable header: {err}).") from None
    except RecursionError:
        raise ValueError(f"{where} is not a safetensors file (its header nests too deeply).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where} is not a safetensors file (its header is not a JSON object).")
    header.pop("__metadata__", None)
    validate_entries(header, data_size, where)
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_entries(entries: dict, data_size: int | None, where: str) -> None:
    """Check every tensor entry of a safetensors header, in one place, before any read or allocation.

    Each entry must be an object with a known ``dtype``, a ``shape`` list of non-negative ints and
    ``data_offsets`` [begin, end] of ints with 0 <= begin <= end, end - begin = the shape's size in bytes, end
    within the data (`data_size` bytes after the header, when known), and no two tensors' bytes may overlap.
    Raises ValueError naming `where`, the tensor and what is wrong, in one line.
    """
    spans = []
    for name, entry in entries.items():
        what = f"{where}: tensor {str(name)[:200]!r}"
        if not isinstance(entry, dict):
            raise ValueError(f"{what} has no dtype/shape/data_offsets entry (found {type(entry).__name__}).")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _SAFETENSORS_NUMPY:
            raise ValueError(f"{what} has dtype {str(dtype)[:50]!r}; known: {', '.join(_SAFETENSORS_NUMPY)}.")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise ValueError(f"{what} has shape {str(shape)[:100]}, not a list of non-negative integers.")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ValueError(f"{what} has data_offsets {str(offsets)[:100]}, not a list [begin, end] of integers.")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise ValueError(f"{what} has data_offsets [{begin}, {end}]: not 0 <= begin <= end.")
        nbytes = np.dtype(_SAFETENSORS_NUMPY[dtype]).itemsize
        for s in shape:
            nbytes *= s
        if end - begin != nbytes:
            raise ValueError(
                f"{what} of dtype {dtype} and shape {shape} needs {nbytes} bytes, but its data_offsets "
                f"[{begin}, {end}] hold {end - begin}."
            )
        if data_size is not None and end > data_size:
            raise ValueError(
                f"{what} ends at byte {end} of the data, past its end ({data_size} bytes): the file is truncated or "
                "its header is wrong."
            )
        if end > begin:
            spans.append((begin, end, name))
    last = max((end for _, end, _ in spans), default=0)
    if data_size is not None and last != data_size:
        raise ValueError(
            f"{where}: its tensors' data ends at byte {last}, but the file holds {data_size} bytes after the header: "
            "the header length or the data_offsets are wrong."
        )
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"{where}: tensors {str(name_a)[:200]!r} and {str(name_b)[:200]!r} overlap in the file.")


class _SafetensorsFile:
    """One .safetensors file: header parsed once, rows read with positioned reads into a fresh or reused buffer."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_len = parse_header_length(f.read(8), path, size)
            header = parse_header(f.read(header_len), path, size - 8 - header_len)
        self.data_start = 8 + header_len
        self.entries: dict[str, dict] = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def _read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as a numpy array of the stored bytes' dtype (bf16 as uint16, float8 as uint8).

        `out`: optional array of that shape and dtype to read into.
        """
        entry = self.entries[name]
        dtype = _SAFETENSORS_NUMPY.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"Tensor {name!r} in {self.path} has unsupported dtype {entry['dtype']}.")
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        row_bytes = row_elems * np.dtype(dtype).itemsize
        if not shape or end - begin != shape[0] * row_bytes:
            raise ValueError(f"Tensor {name!r} in {self.path} has inconsistent data offsets.")
        nbytes = (stop - start) * row_bytes
        if out is None:
            out = np.empty([stop - start, *shape[1:]], dtype=dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._read_bytes(name, view[:nbytes], self.data_start + begin + start * row_bytes)
        return out

    def _read_bytes(self, name: str, view: memoryview, offset: int) -> None:
        """Fill `view` with the file's bytes from `offset` (a positioned read; `name` is for errors)."""
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file.")
                got += n

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        import torch

        raw = self._read(name, start, stop)
        dtype = getattr(torch, _TORCH_DTYPE_NAMES[self.entries[name]["dtype"]], None)
        if dtype is None:
            raise ValueError(f"Tensor {name!r} in {self.path} has a dtype this torch lacks.")
        return torch.from_numpy(raw).view(dtype)

    def array_rows(self, name: str, start: int, stop: int, scratch: dict | None = None) -> np.ndarray:
        kind = self.entries[name]["dtype"]
        if kind.startswith("F8"):
            return _to_numpy(self.rows(name, start, stop))
        shape = [stop - start, *self.entries[name]["shape"][1:]]
        # Reused buffers: fresh multi-MB arrays for every layer cost page faults comparable to the reads.
        raw = self._read(name, start, stop, out=_scratch(scratch, "raw", shape, _SAFETENSORS_NUMPY[kind]))
        if kind == "BF16":
            return bf16_to_float32(raw, out=_scratch(scratch, "float32", shape, np.float32))
        return raw


class _SafetensorsStore(_TensorStore):
    """A single safetensors file or a set of shards listed by an index's weight_map (paths, or opened files)."""

    def __init__(self, paths: list[str] | list[_SafetensorsFile]):
        self._where: dict[str, _SafetensorsFile] = {}
        for path in paths:
            shard = path if isinstance(path, _SafetensorsFile) else _SafetensorsFile(path)
            for name in shard.entries:
                self._where[name] = shard

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._where[name].rows(name, start, stop)

    def array_rows(self, name: str, start: int, stop: int, scratch: dict | None = None) -> np.ndarray:
        return self._where[name].array_rows(name, start, stop, scratch)


class _TorchBinStore(_TensorStore):
    """``pytorch_model.bin`` files, opened lazily with torch.load(weights_only=True, mmap=True)."""

    def __init__(self, paths: list[str], weight_map: dict[str, str] | None = None):
        self._loaded: dict[str, Mapping[str, torch.Tensor]] = {}
        self._file_of: dict[str, str] = dict(weight_map or {})  # tensor name -> path
        if weight_map is None:
            # Without an index the names are known only after opening the files (memory-mapped: cheap).
            for path in paths:
                self._state(path)

    def _state(self, path: str) -> Mapping[str, torch.Tensor]:
        if path not in self._loaded:
            import torch

            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # Files in torch's legacy (pre-zip) format cannot be memory-mapped.
                state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, Mapping):
                raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__}).")
            self._loaded[path] = state
            for name in state:
                self._file_of.setdefault(name, path)
        return self._loaded[path]

    def names(self) -> set[str]:
        return set(self._file_of)

    def _tensor(self, name: str) -> torch.Tensor:
        return self._state(self._file_of[name])[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._tensor(name)[start:stop].clone()


class _MappingStore(_TensorStore):
    """Tensors held in memory: a state dict, or the parameters of a loaded model (no copies)."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._tensors = tensors

    def names(self) -> set[str]:
        return set(self._tensors.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        state = getattr(t, "quant_state", None)
        if state is not None:  # bitsandbytes 4-bit: packed storage, logical shape in quant_state
            return tuple(state.shape)
        return tuple(t.shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return _dense(self._tensors[name], name)[start:stop].detach()


def _dense(t: Any, name: str) -> torch.Tensor:
    """A plain tensor for `t`: gathers a sharded DTensor, dequantizes bitsandbytes 4-bit/8-bit weights."""
    import torch

    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    if getattr(t, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(t.data, t.quant_state)
    if t.dtype == torch.int8 and getattr(t, "SCB", None) is not None:
        return t.data.to(torch.float32) * (t.SCB.to(torch.float32).unsqueeze(1) / 127.0)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name!r} is a {type(t).__name__}, not a tensor.")
    return t


# ---- the source ---------------------------------------------------------------------------------
class WeightSource:
    """q/k/v weights of one model, read layer by layer.

    Attributes:
        layout: the model's `AttentionLayout` (tensor names, L/H/KV/hd/d).
        name: a string for provenance (a path, a hub id, or a model's name_or_path).
        config: the model config as a dict.
    """

    def __init__(self, store: _TensorStore, config: dict, name: str, config_path: str | None = None):
        self._store = store
        self.config = config
        self.name = name
        # Where the config came from (its config.json), named by errors about it.
        self._config_where = f"the config {config_path}" if config_path else "the config"
        try:
            self.layout = AttentionLayout.from_config(config, store.names())
        except ValueError as err:
            where = f"{name} ({config_path})" if config_path else name
            raise type(err)(f"{where}: {err}") from None
        self._check_shapes()

    def tensor_shape(self, tensor_name: str) -> tuple[int, ...]:
        """Shape of a stored tensor (logical shape for quantized in-memory weights)."""
        return self._store.shape(tensor_name)

    def qkv_tensor_names(self) -> list[str]:
        """Every q/k/v weight tensor, in layer order (fused models: one per layer)."""
        names: list[str] = []
        for lp in self.layout.layers:
            for block in (lp.q_weight, lp.k_weight, lp.v_weight):
                if block.name not in names:
                    names.append(block.name)
        return names

    def _check_shapes(self) -> None:
        lay = self.layout
        for lp in lay.layers:
            expected: dict[str, int] = {}
            for block in (lp.q_weight, lp.k_weight, lp.v_weight):
                expected[block.name] = max(expected.get(block.name, 0), block.offset + block.rows)
            for tensor_name, rows in expected.items():
                shape = self._store.shape(tensor_name)
                if len(shape) != 2 or shape[0] != rows or shape[1] != lay.hidden_size:
                    raise ValueError(
                        f"{self.name}: tensor {tensor_name!r} has shape {list(shape)}, but {self._config_where} "
                        f"({lay.model_type}: {lay.num_heads} heads, {lay.num_kv_heads} kv heads, head_dim "
                        f"{lay.head_dim}, hidden_size {lay.hidden_size}) implies [{rows}, {lay.hidden_size}]."
                    )

    def layer_qkv(
        self, layer: int, device: torch.device | str | None = None, dtype: torch.dtype | str | None = "float64"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q/k/v weights of `layer`, reading only that layer's q/k/v rows.

        Returns:
            wq: [H, hd, d], wk: [KV, hd, d], wv: [KV, hd, d], in `dtype` (float64; a torch dtype or its name;
            None keeps the stored dtype) on `device` (default CPU). For an in-memory model already in that
            dtype and device these may be views of its parameters: do not modify them.
        """
        import torch

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        lay = self.layout
        lp = lay.layers[layer]
        out = []
        for block, heads in (
            (lp.q_weight, lay.num_heads),
            (lp.k_weight, lay.num_kv_heads),
            (lp.v_weight, lay.num_kv_heads),
        ):
            rows = self._store.rows(block.name, block.offset, block.offset + block.rows)
            if device is not None:
                rows = rows.to(device)  # move in the stored dtype: fewer bytes to copy
            if dtype is not None:
                rows = rows.to(dtype)
            out.append(rows.reshape(heads, lay.head_dim, lay.hidden_size))
        return out[0], out[1], out[2]

    def layer_arrays(self, layer: int, scratch: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`layer_qkv` as CPU numpy arrays, without torch for safetensors checkpoints.

        Args:
            scratch: optional dict, kept by the caller across layers, whose buffers the rows are read into;
                the arrays returned are then overwritten by the next call with the same dict.
        Returns:
            wq: [H, hd, d], wk: [KV, hd, d], wv: [KV, hd, d] in the stored float dtype (bf16 and float8
            widened to float32, exactly). Arrays of an in-memory model may share its memory: do not modify.
        """
        lay = self.layout
        lp = lay.layers[layer]
        out = []
        for role, block, heads in (
            ("q", lp.q_weight, lay.num_heads),
            ("k", lp.k_weight, lay.num_kv_heads),
            ("v", lp.v_weight, lay.num_kv_heads),
        ):
            role_scratch = None if scratch is None else scratch.setdefault(role, {})
            rows = self._store.array_rows(block.name, block.offset, block.offset + block.rows, role_scratch)
            out.append(rows.reshape(heads, lay.head_dim, lay.hidden_size))
        return out[0], out[1], out[2]

    def __repr__(self) -> str:
        lay = self.layout
        return (
            f"WeightSource({self.name!r}, {lay.model_type}, L={lay.num_layers}, H={lay.num_heads}, "
            f"KV={lay.num_kv_heads}, hd={lay.head_dim}, d={lay.hidden_size})"
        )


# ---- opening --------------------------------------------------------------------------------------
FETCH_MODES = ("qkv",)


def validate_fetch(fetch: str | None) -> str | None:
    """`fetch` if it is None (never download) or one of FETCH_MODES; ValueError otherwise."""
    if fetch is not None and fetch not in FETCH_MODES:
        raise ValueError(
            f"Unknown fetch mode {fetch!r}; choose {', '.join(FETCH_MODES)} (read only the q/k/v rows of a hub model "
            "not in the local cache) or leave it unset (never download)."
        )
    return fetch


def open_weight_source(
    obj: Any,
    *,
    config: Any = None,
    trust_remote_code: bool = False,
    fetch: str | None = None,
    revision: str | None = None,
    progress: bool = False,
) -> WeightSource:
    """Open `obj` for streaming q/k/v reads.

    Args:
        obj: a `WeightSource` (returned as is); a local checkpoint directory (config.json plus
            safetensors or .bin weights, sharded or not); a ``.gguf`` file (dequantized, see
            `alps_trl.localization.gguf.GGUFStore`); a hub id already in the local HF cache; a
            loaded model (PreTrainedModel, possibly wrapped); or a Mapping of tensor name -> tensor
            holding at least the q/k/v weights, together with `config`.
        config: for a Mapping: a config (PretrainedConfig, dict, or a path to config.json or its
            directory). For a checkpoint: overrides its config.json.
        trust_remote_code: only consulted when config.json lacks the standard fields and the config
            must be built by transformers' AutoConfig. No model code is ever executed to read weights.
        fetch: None (default): a hub id must be in the local HF cache, nothing is downloaded. "qkv": a hub id
            that is not there has its q/k/v rows read with HTTP range requests (and cached, see
            `alps_trl.localization.remote`).
        revision: branch, tag or commit of a hub id (default: main).
        progress: a bar of the bytes fetched (fetch="qkv" only).
    Raises:
        FileNotFoundError: path without config.json or without weights; hub id not in the local cache.
        ValueError: missing q/k/v tensor (named), unsupported architecture (supported ones listed),
            tensor shapes that do not fit the config.
    """
    if isinstance(obj, WeightSource):
        return obj
    if _is_torch_module(obj):
        return _from_model(obj)
    if isinstance(obj, Mapping):
        if config is None:
            raise ValueError(
                "A state-dict Mapping needs config= (a PretrainedConfig, a dict, or a path to config.json) "
                "to know the architecture and head shapes."
            )
        config_path = os.fspath(config) if isinstance(config, (str, os.PathLike)) else None
        return WeightSource(_MappingStore(obj), _config_dict(config, trust_remote_code), "state_dict", config_path)
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if os.path.isdir(path):
            return _from_directory(path, config, trust_remote_code, name=path)
        if os.path.isfile(path) and path.lower().endswith(".gguf"):
            from alps_trl.localization.gguf import GGUFStore

            store = GGUFStore(path)
            return WeightSource(store, store.config, path)
        if os.path.exists(path):
            raise FileNotFoundError(
                f"{path!r} is a file; pass the checkpoint directory that holds config.json and the weights (or a "
                ".gguf file)."
            )
        if validate_fetch(fetch) is None:
            local = _resolve_hub_id(path, revision)
        else:
            local = _resolve_hub_id(path, revision, missing_ok=True)
            if local is None:
                from alps_trl.localization.remote import open_remote_source

                cfg = _config_dict(config, trust_remote_code) if config is not None else None
                return open_remote_source(
                    path, revision=revision, config=cfg, trust_remote_code=trust_remote_code, progress=progress
                )
        return _from_directory(local, config, trust_remote_code, name=path)
    raise TypeError(
        f"Cannot read attention weights from a {type(obj).__name__}: pass a checkpoint directory, a hub id in the "
        "local HF cache, a loaded model, or a state-dict Mapping with config=."
    )


def _is_torch_module(obj: Any) -> bool:
    """isinstance(obj, torch.nn.Module), without importing torch when nothing could be one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _from_model(model: torch.nn.Module) -> WeightSource:
    inner = unwrap_model(model)
    cfg = getattr(inner, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no .config: pass a Hugging Face causal LM.")
    params = dict(inner.named_parameters(remove_duplicate=False))
    name = getattr(cfg, "_name_or_path", "") or type(inner).__name__
    if getattr(inner, "is_quantized", False) or getattr(inner, "hf_quantizer", None) is not None:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            "Reading q/k/v from a quantized model: its weights are dequantized, and the quantization error enters "
            "the head scores. For exact scores pass the full-precision checkpoint directory (%s) instead.",
            name,
        )
    return WeightSource(_MappingStore(params), _config_dict(cfg, False), name)


def _config_dict(config: Any, trust_remote_code: bool) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return _read_config_json(path, trust_remote_code)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a PretrainedConfig, a dict or a path, got {type(config).__name__}.")


def _read_config_json(path: str, trust_remote_code: bool) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No config.json at {path!r}: ALPS needs the model config to find the attention heads."
        )
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON (it nests too deeply).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object.")
    required = ("num_hidden_layers", "num_attention_heads", "hidden_size")
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    if all(k in cfg or k in text_cfg for k in required):
        return cfg
    # Non-standard field names (attribute_map aliases): let transformers build the config.
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(os.path.dirname(path), trust_remote_code=trust_remote_code).to_dict()


def _from_directory(path: str, config: Any, trust_remote_code: bool, name: str) -> WeightSource:
    cfg = _config_dict(config, trust_remote_code) if config is not None else None
    config_path = None
    if cfg is None:
        config_path = os.path.join(path, "config.json")
        cfg = _read_config_json(config_path, trust_remote_code)
    elif isinstance(config, (str, os.PathLike)):
        config_path = os.fspath(config)
    return source_from_store(_open_weight_files(path), cfg, name, config_path)


def source_from_store(store: _TensorStore, cfg: dict, name: str, config_path: str | None = None) -> WeightSource:
    """A `WeightSource` over `store`, dequantizing the checkpoints whose config says they are quantized.

    `config_path`: the config.json `cfg` was read from, for errors.
    """
    quantization = cfg.get("quantization_config")
    if quantization:
        if not isinstance(quantization, dict):
            raise ValueError(f"{config_path or name}: quantization_config is not a JSON object.")
        store = _dequantizing_store(store, quantization, name)
    return WeightSource(store, cfg, name, config_path)


class _BlockFP8Store(_TensorStore):
    """An FP8 checkpoint with block scales (``quant_method: fp8``, as FP8 releases ship): a weight ``W`` stored
    as float8 with ``W_scale_inv`` of shape [ceil(rows / br), ceil(cols / bc)] reads as
    ``fp8 * scale_inv[row // br, col // bc]``; tensors without a scale read as stored."""

    def __init__(self, store: _TensorStore, block: tuple[int, int]):
        self._store, self._block = store, block

    def names(self) -> set[str]:
        return self._store.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._store.shape(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        import torch

        raw = self._store.rows(name, start, stop)
        scale_name = name + "_scale_inv"
        if scale_name not in self._store.names():
            return raw
        br, bc = self._block
        first, last = start // br, (stop - 1) // br + 1
        scales = self._store.rows(scale_name, first, last).to(torch.float32)
        per_row = scales.repeat_interleave(br, dim=0)[start - first * br : stop - first * br]
        per_elem = per_row.repeat_interleave(bc, dim=1)[:, : raw.shape[1]]
        return raw.to(torch.float32) * per_elem


# quantization_config methods the reader can dequantize itself; every other one is refused (never read raw).
_READABLE_QUANTIZATION = ("fp8",)


def _dequantizing_store(store: _TensorStore, quantization: dict, name: str) -> _TensorStore:
    method = str(quantization.get("quant_method", "unknown"))
    block = quantization.get("weight_block_size")
    scaled = any(n.endswith("_scale_inv") for n in store.names())
    if method == "fp8" and scaled and block and len(block) == 2:
        return _BlockFP8Store(store, (int(block[0]), int(block[1])))
    if method == "fp8" and not scaled:
        return store  # float8 weights without scales: their stored values are the weights
    raise ValueError(
        f"{name} is a quantized checkpoint (quantization_config quant_method={method!r}), whose stored tensors are "
        f"not the weights; ALPS reads {', '.join(_READABLE_QUANTIZATION)} (with block scales) only. Pass the "
        "full-precision checkpoint it was made from (scores of a quantized model carry its quantization error)."
    )


def _open_weight_files(path: str) -> _TensorStore:
    single, index = os.path.join(path, SAFE_SINGLE), os.path.join(path, SAFE_INDEX)
    if os.path.isfile(single):
        return _SafetensorsStore([single])
    if os.path.isfile(index):
        return _SafetensorsStore(sorted(set(_weight_map(index).values())))
    single, index = os.path.join(path, BIN_SINGLE), os.path.join(path, BIN_INDEX)
    if os.path.isfile(single):
        return _TorchBinStore([single])
    if os.path.isfile(index):
        weight_map = _weight_map(index)
        return _TorchBinStore(sorted(set(weight_map.values())), weight_map)
    raise FileNotFoundError(f"No model weights in {path!r}: expected one of {', '.join(WEIGHT_FILES)}.")


def _weight_map(index_path: str) -> dict[str, str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path} is not a valid shard index ({type(err).__name__}: {err}).") from None
    folder = os.path.dirname(index_path)
    files = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    for shard in sorted(set(files.values())):
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"Shard {shard!r} listed in {index_path} does not exist.")
    return files


def _resolve_hub_id(repo_id: str, revision: str | None = None, missing_ok: bool = False) -> str | None:
    """The local snapshot directory of `repo_id` in the HF cache; never downloads.

    A hub id the cache does not hold raises FileNotFoundError, or gives None with `missing_ok`.
    """
    looks_like_id = repo_id.count("/") <= 1 and not repo_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise FileNotFoundError(f"{repo_id!r} does not exist (and is not a hub id).")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError

        return snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=True,
            allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"],
        )
    except HFValidationError:
        raise FileNotFoundError(f"{repo_id!r} is neither an existing directory nor a valid hub id.") from None
    except Exception as err:  # LocalEntryNotFoundError and friends: the cache does not hold it.
        if missing_ok:
            return None
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory and is not in the local Hugging Face cache "
            f"({type(err).__name__}). ALPS downloads nothing unless told to: pass --fetch qkv (alps_fetch='qkv') "
            f"to read only its q/k/v rows from the hub, run `hf download {repo_id}`, or pass a local checkpoint "
            "directory."
        ) from None
