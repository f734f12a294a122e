"""Fuzzing of the file readers: mutate and truncate real files, feed them through the public entry points.

Every input either gives the correct result (the one an independent reader of the same bytes implies: the
safetensors library, upstream gguf, the reference run on the unmutated file) or is refused with one line that
names the file. Anything else is a defect: another exception type, a traceback out of a CLI, a message of several
lines or without the path, a run past the time bound, an allocation past the memory bound.

Used by tests/test_fuzz.py (a small seeded run in the everyday loop, a larger one marked slow).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import resource
import shutil
import signal
import struct
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Bounds of one input: wall time, Python/numpy allocations (tracemalloc), address space above the start.
TIME_LIMIT_S = 20
TRACED_PEAK_LIMIT = 64 << 20
ADDRESS_SPACE_MARGIN = 2 << 30
CLEAN_ERRORS = (ValueError, OSError)  # HeadSelectionError is a ValueError


class Hang(Exception):
    pass


@dataclass
class Outcome:
    kind: str  # "correct", "refused", "defect"
    detail: str = ""


@dataclass
class Tally:
    """Counts per format, and the defects found (format, input description, what went wrong)."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    defects: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, fmt: str, label: str, outcome: Outcome) -> None:
        row = self.counts.setdefault(fmt, {"tried": 0, "correct": 0, "refused": 0, "defect": 0})
        row["tried"] += 1
        row[outcome.kind] += 1
        if outcome.kind == "defect":
            self.defects.append((fmt, label, outcome.detail))

    def table(self) -> str:
        lines = [f"{'format':<24}{'tried':>7}{'correct':>9}{'refused':>9}{'defect':>8}"]
        for fmt, row in sorted(self.counts.items()):
            lines.append(f"{fmt:<24}{row['tried']:>7}{row['correct']:>9}{row['refused']:>9}{row['defect']:>8}")
        return "\n".join(lines)


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def guarded() -> Iterator[dict]:
    """Run a block under the time bound (SIGALRM), an address-space bound and a traced-allocation bound.

    Yields a dict that gets "peak" (traced bytes) and "seconds" on exit.
    """
    info: dict = {}

    def on_alarm(signum, frame):
        raise Hang(f"still running after {TIME_LIMIT_S} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + ADDRESS_SPACE_MARGIN
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    tracemalloc.reset_peak()
    start = time.perf_counter()
    signal.alarm(TIME_LIMIT_S)
    try:
        yield info
    finally:
        signal.alarm(0)
        info["seconds"] = time.perf_counter() - start
        info["peak"] = tracemalloc.get_traced_memory()[1]
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)


def _names(message: str, paths: tuple[str, ...]) -> bool:
    return any(p in message for p in paths)


def run_api(call: Callable[[], Any], paths: tuple[str, ...], check: Callable[[Any], str | None]) -> Outcome:
    """A library call: its result must pass `check` (None = correct, else why not), or it raises a clean error."""
    try:
        with guarded() as info:
            result = call()
    except Hang as err:
        return Outcome("defect", f"hang: {err}")
    except MemoryError:
        return Outcome("defect", "MemoryError (an allocation past the bound)")
    except CLEAN_ERRORS as err:
        message = str(err)
        if "\n" in message.strip():
            return Outcome("defect", f"{type(err).__name__} of several lines: {message[:300]!r}")
        if not _names(message, paths):
            return Outcome("defect", f"{type(err).__name__} without the path: {message[:300]!r}")
        return _bounded(info, Outcome("refused", f"{type(err).__name__}: {message[:200]}"))
    except Exception as err:  # noqa: BLE001 - every other type is what the fuzzer looks for
        return Outcome("defect", f"{type(err).__name__}: {str(err)[:300]!r}")
    why = check(result)
    return _bounded(info, Outcome("correct") if why is None else Outcome("defect", f"wrong result: {why}"))


def run_cli(
    main: Callable[[list[str]], int],
    argv: list[str],
    prog: str,
    paths: tuple[str, ...],
    check: Callable[[], str | None],
) -> Outcome:
    """A CLI's main(): 0 and a result that passes `check`, or non-zero with one stderr line `prog: error: ...` naming
    the file. An exception out of main() is a traceback for the user: a defect."""
    err_buf, out_buf = io.StringIO(), io.StringIO()
    try:
        with guarded() as info, contextlib.redirect_stderr(err_buf), contextlib.redirect_stdout(out_buf):
            rc = main(argv)
    except Hang as err:
        return Outcome("defect", f"hang: {err}")
    except SystemExit as err:
        return Outcome("defect", f"SystemExit({err.code}) out of main: {err_buf.getvalue()[-300:]!r}")
    except BaseException as err:  # noqa: BLE001
        if isinstance(err, KeyboardInterrupt):
            raise
        return Outcome("defect", f"traceback: {type(err).__name__}: {str(err)[:300]!r}")
    stderr = err_buf.getvalue().strip()
    if rc == 0:
        why = check()
        return _bounded(info, Outcome("correct") if why is None else Outcome("defect", f"wrong result: {why}"))
    lines = [line for line in stderr.splitlines() if line.strip()]
    if len(lines) != 1:
        return Outcome("defect", f"rc={rc} with {len(lines)} stderr lines: {stderr[-400:]!r}")
    if not lines[0].startswith(f"{prog}: error: "):
        return Outcome("defect", f"rc={rc}, stderr not '{prog}: error: ...': {lines[0][:300]!r}")
    if not _names(lines[0], paths):
        return Outcome("defect", f"rc={rc}, error without the path: {lines[0][:300]!r}")
    return _bounded(info, Outcome("refused", lines[0][:200]))


def _bounded(info: dict, outcome: Outcome) -> Outcome:
    if info.get("peak", 0) > TRACED_PEAK_LIMIT:
        return Outcome("defect", f"allocated {info['peak'] / 2**20:.0f} MiB (bound {TRACED_PEAK_LIMIT >> 20} MiB)")
    return outcome


# ---- mutations ----------------------------------------------------------------------------------------------
def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.randrange(0, len(data))
    return data[:cut], f"truncated at {cut} of {len(data)}"


def flip_bytes(data: bytes, rng: random.Random, start: int = 0, stop: int | None = None) -> tuple[bytes, str]:
    stop = len(data) if stop is None else stop
    buf = bytearray(data)
    where = []
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(start, stop)
        buf[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        where.append(pos)
    return bytes(buf), f"bytes flipped at {where}"


WEIRD_INTS = [0, -1, 1, 3, 7, 16, 2**31, 2**40, 2**63, 2**64 + 5, -(2**63)]
WEIRD_VALUES = [None, True, "8", 8.5, [8], {"a": 1}, "", float("1e300")]


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: Any, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length % 2**64) + raw + body


def mutate_safetensors(data: bytes, rng: random.Random, focus: list[str]) -> tuple[bytes, str]:
    """One mutation of a safetensors file; structural edits go to a tensor of `focus` (the ones that are read)."""
    header, body = split_safetensors(data)
    data_len = len(body)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(focus) if rng.random() < 0.8 else rng.choice(names)
    entry = header[name]
    kind = rng.choice(
        ["truncate", "flip_header", "flip_data", "length", "dtype", "shape", "offsets", "overlap", "drop", "json"]
    )
    if kind == "truncate":
        return truncate(data, rng)
    if kind == "flip_header":
        n = struct.unpack("<Q", data[:8])[0]
        return flip_bytes(data, rng, 0, 8 + n)
    if kind == "flip_data":
        return flip_bytes(data, rng, len(data) - data_len, len(data))
    if kind == "length":
        n = struct.unpack("<Q", data[:8])[0]
        value = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), len(data) + 1, 10**12, 2**63, 2**64 - 1, 99_999_999])
        return struct.pack("<Q", value % 2**64) + data[8:], f"header length {n} -> {value}"
    if kind == "dtype":
        value = rng.choice(["F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "XYZ", "f32", "", 5, None, "missing"])
        if value == "missing":
            del entry["dtype"]
        else:
            entry["dtype"] = value
        return join_safetensors(header, body), f"{name} dtype -> {value!r}"
    if kind == "shape":
        s = list(entry["shape"])
        value = rng.choice(
            [
                [-s[0], *s[1:]],
                [2**40, 2**40],
                [2**62, 2**62, 2**62],
                [s[0] * 2, *s[1:]],
                [s[0] // 2, *s[1:]],
                [*s, 1],
                s[:1],
                [],
                [float(x) for x in s],
                [True, *s[1:]],
                [str(x) for x in s],
                str(s),
                None,
                list(reversed(s)),
                [0, *s[1:]],
                "missing",
            ]
        )
        if value == "missing":
            del entry["shape"]
        else:
            entry["shape"] = value
        return join_safetensors(header, body), f"{name} shape {s} -> {value!r}"
    if kind in ("offsets", "overlap"):
        begin, end = entry["data_offsets"]
        if kind == "overlap":
            other = header[rng.choice([n for n in names if n != name])]
            ob, oe = other["data_offsets"]
            shift = rng.choice([0, 4, (oe - ob) // 2])
            value = [ob + shift, ob + shift + (end - begin)]
        else:
            value = rng.choice(
                [
                    [end, begin],
                    [-4, end - begin - 4],
                    [begin - 8, end - 8],
                    [begin, end + 4],
                    [begin + 4, end + 4],
                    [data_len - (end - begin) + 4, data_len + 4],
                    [begin, 2**62],
                    [2**63, 2**63 + end - begin],
                    [float(begin), float(end)],
                    [str(begin), str(end)],
                    [begin],
                    [begin, end, end],
                    None,
                    begin,
                    "missing",
                ]
            )
        if value == "missing":
            del entry["data_offsets"]
        else:
            entry["data_offsets"] = value
        return join_safetensors(header, body), f"{name} data_offsets {[begin, end]} -> {value!r}"
    if kind == "drop":
        del header[name]
        return join_safetensors(header, body), f"{name} dropped from the header"
    value = rng.choice(["list", "string", "number", "null", "nested", "non_utf8", "metadata", "entry_not_dict", "dup"])
    if value == "list":
        raw = json.dumps([header]).encode()
    elif value == "string":
        raw = b'"abc"'
    elif value == "number":
        raw = b"12345"
    elif value == "null":
        raw = b"null"
    elif value == "nested":
        depth = rng.choice([1000, 100_000])
        raw = b"[" * depth + b"]" * depth
    elif value == "non_utf8":
        raw = json.dumps(header).encode().replace(b'"dtype"', b'"\xff\xfetype"', 1)
    elif value == "metadata":
        header["__metadata__"] = rng.choice([[1, 2], "x", {"format": 5}, None])
        raw = json.dumps(header).encode()
    elif value == "entry_not_dict":
        header[name] = rng.choice([[1, 2], "x", 5, None])
        raw = json.dumps(header).encode()
    else:
        text = json.dumps(header)
        raw = (text[:-1] + ", " + json.dumps(name) + ": " + json.dumps({**entry, "dtype": "XYZ"}) + "}").encode()
    return join_safetensors(raw, body), f"header JSON: {value}"


def mutate_json(data: Any, rng: random.Random, keys: dict[str, list]) -> tuple[Any, str]:
    """One edit of a JSON object: a key dropped, or set to a value from `keys` (or a weird one)."""
    data = json.loads(json.dumps(data))
    key = rng.choice(list(keys))
    if rng.random() < 0.15:
        data.pop(key, None)
        return data, f"{key} dropped"
    value = rng.choice(keys[key] + WEIRD_VALUES + WEIRD_INTS)
    data[key] = value
    return data, f"{key} -> {str(value)[:80]}"


def write(path: str, data: bytes | str) -> None:
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def copy_dir(src: str, dst: str) -> str:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def write_gguf(model: Any, path: str) -> None:
    """A small llama GGUF of a tiny model's attention (F32 q/k, F16 v, a Q8_0 token embedding)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_embedding_length(cfg.hidden_size)
    w.add_context_length(256)
    emb = model.model.embed_tokens.weight.detach().numpy()[:64].copy()
    w.add_tensor(
        "token_embd.weight",
        gguf.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        w.add_tensor(f"blk.{i}.attn_q.weight", attn.q_proj.weight.detach().numpy().copy())
        w.add_tensor(f"blk.{i}.attn_k.weight", attn.k_proj.weight.detach().numpy().copy())
        w.add_tensor(f"blk.{i}.attn_v.weight", attn.v_proj.weight.detach().numpy().astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
