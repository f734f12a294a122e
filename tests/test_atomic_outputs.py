"""Killed, failed and concurrent saves never leave a broken output (alps_trl.localization.atomic).

Kill tests run the real entry points (`alps-localize`, `alps-merge`, `alps-merge --to-peft`, `convert_gguf`,
the trainers' save helpers) in a subprocess behind a test-side harness (HARNESS below, nothing in the product
code) that wraps the file-system calls (os.rename/replace/mkdir/unlink, shutil.rmtree/copyfile and
safetensors' save_file) and SIGKILLs the process at the K-th of them; at a save_file it first writes half the
file. A dry run lists the calls, and the kill points are the interesting ones (a half-written file, just before
the old output is moved aside, between the two renames, before the old one is deleted) plus seeded random ones;
the slow tests kill at every call, and also at the moment the temporary entry appears and after seeded delays.
After each kill the output path holds the previous output byte for byte, the new one, or nothing (with no
previous output), `cleanup_stale` restores the previous output from the two-rename window, and the next run
succeeds with the right output and no leftovers.

Read-only and full directories: the saving step runs in a subprocess without root's capabilities (bounding set
dropped before exec, so root obeys file modes: a 0o555 directory is read-only) or with RLIMIT_FSIZE (writes past
it fail with EFBIG, SIGXFSZ ignored), then: non-zero exit, a one-line error naming the path, the previous output
intact, no temporary files. The trainer's `save_model` is covered in-process with the write failure simulated
(os.mkdir of the staging directory refused, safetensors' writer raising ENOSPC), on a real AlpsSFTTrainer.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pathlib
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from alps_trl.localization.atomic import (
    OutputWriteError,
    atomic_directory,
    atomic_write_file,
    cleanup_stale,
    sibling_path,
)
from alps_trl.testing import tiny_model

REPO = pathlib.Path(__file__).resolve().parents[1]

HARNESS = r"""
import os, signal, shutil, sys
_KILL_AT = int(os.environ.get("KILL_AT", "-1"))
_LOG = os.environ.get("KILL_LOG")
_count = [0]

def _event(name, *paths):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(name + "\t" + "\t".join(map(str, paths)) + "\n")
    hit = _count[0] == _KILL_AT
    _count[0] += 1
    return hit

def _die():
    os.kill(os.getpid(), signal.SIGKILL)

def _wrap(module, name):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        if _event(name, *args[:2]):
            _die()
        return original(*args, **kwargs)
    setattr(module, name, wrapper)

for _name in ("rename", "replace", "mkdir", "unlink"):
    _wrap(os, _name)
_wrap(shutil, "rmtree")
_wrap(shutil, "copyfile")

import safetensors.torch as _st
_save_file = _st.save_file
def _half_save_file(tensors, filename, metadata=None):
    if _event("save_file", filename):
        _save_file(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        _die()
    return _save_file(tensors, filename, metadata=metadata)
_st.save_file = _half_save_file
"""


# ---- helpers ------------------------------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # PYTHONHASHSEED: PEFT writes adapter_config.json's target_modules in set order; fixed, the bytes repeat.
    env.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra})
    return env


def run_py(code: str, kill_at: int | None = None, log: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    extra = {"KILL_AT": str(-1 if kill_at is None else kill_at)}
    if log:
        extra["KILL_LOG"] = log
    env = _env(**extra, **kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-c", HARNESS + code], env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def _content(path: pathlib.Path):
    """A file's bytes; for a complete safetensors file, its header with sorted keys and its data (safetensors
    writes the metadata in Rust HashMap order, which changes from process to process)."""
    data = path.read_bytes()
    if path.suffix != ".safetensors" or len(data) < 8:
        return data
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        return data  # partial: compares unequal to any complete file
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if len(data) != 8 + size + end:
        return data
    return json.dumps(header, sort_keys=True).encode() + data[8 + size :]


def snapshot(path: pathlib.Path):
    """None (missing), the content of a file, or {relative path: content} of a directory."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return _content(path)
    return {str(p.relative_to(path)): _content(p) for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".alps-tmp-" in n or ".alps-old-" in n)


def events(code: str, log: pathlib.Path) -> list[list[str]]:
    """The wrapped file-system calls a run makes, in order (a dry run: nothing is killed)."""
    log.unlink(missing_ok=True)
    proc = run_py(code, log=str(log))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split("\t") for line in log.read_text().splitlines()]


def key_points(calls: list[list[str]], out: pathlib.Path, seed: int, extra: int = 2) -> list[int]:
    """Kill points: the first save_file (half-written), the old output moved aside, the new one renamed in (the
    two-rename window), the old one deleted; plus `extra` seeded random calls."""
    out_s = str(out)
    points = set()
    saves = [i for i, (name, *_) in enumerate(calls) if name == "save_file"]
    points.update(saves[:1])
    for i, (name, *paths) in enumerate(calls):
        if name == "rename" and paths[:1] == [out_s]:
            points.add(i)
        elif name in ("rename", "replace") and paths[1:2] == [out_s]:
            points.add(i)
        elif name == "rmtree" and paths and ".alps-old-" in paths[0]:
            points.add(i)
    rng = random.Random(seed)
    points.update(rng.sample(range(len(calls)), min(extra, len(calls))))
    return sorted(points)


def assert_killed_state(proc, out: pathlib.Path, old, new, where: str) -> None:
    """After a kill: the output is the old one, the new one, or (only without an old one) missing; after
    cleanup_stale (what the next run does first) it is the old or the new one whenever there was an old one."""
    state = snapshot(out)
    # None with an old output: killed between the two renames of a directory swap (the old one is aside).
    assert state in (old, new, None), f"{where}: mixed or partial output at {out}"
    cleanup_stale(out)
    assert snapshot(out) in ((old, new) if old is not None else (None, new)), f"{where}: not recovered"


def sweep(code: str, out: pathlib.Path, old, new, points: list[int], restore, rerun_after=()) -> int:
    """Kill `code` at each of `points` (restoring the previous output first); returns how many runs were killed."""
    killed = 0
    for k in points:
        restore()
        proc = run_py(code, kill_at=k)
        if proc.returncode == 0:
            assert snapshot(out) == new
            continue
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        killed += 1
        assert_killed_state(proc, out, old, new, f"killed at call {k}")
        if k in rerun_after:
            rerun = run_py(code)
            assert rerun.returncode == 0, rerun.stderr[-3000:]
            assert snapshot(out) == new
            assert leftovers(out.parent) == []
    proc = run_py(code)  # the next run works and cleans up what the kills left
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(out) == new
    assert leftovers(out.parent) == []
    return killed


def write_tree(path: pathlib.Path, tree) -> None:
    """Put a snapshot back at `path` (None: remove it)."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if tree is None:
        return
    if isinstance(tree, bytes):
        path.write_bytes(tree)
        return
    for rel, data in tree.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)


def _drop_root_powers() -> None:
    """preexec_fn: empty the capability bounding set, so the exec'd process (still uid 0) obeys file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def _file_size_limit(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def assert_one_line_error(proc, prog: str, path: pathlib.Path) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert str(path) in lines[0], lines[0]


# ---- inputs -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs under a world-readable folder: a sharded qwen2 base, two delta files (old and new output), a task
    model for localizing, and a tiny GGUF file."""
    from restriction_helpers import selection_for

    from alps_trl.restriction import build_restriction

    root = tmp_path_factory.mktemp("atomic")
    os.chmod(root, 0o755)
    base = tiny_model("qwen2", seed=0)
    base.save_pretrained(root / "base", max_shard_size="100KB")
    from alps_trl.restriction.delta import save_delta_file

    for name, seed in (("old", 1), ("new", 2)):
        model = tiny_model("qwen2", seed=0)
        restriction = build_restriction(model, selection_for(model), "delta", train_non_attention=False)
        restriction.install(model)
        gen = torch.Generator().manual_seed(seed)
        deltas = {
            k: torch.randn(v.shape, generator=gen) * 0.01 if k.endswith("alps_delta") else v
            for k, v in restriction.delta_state_dict(model).items()
        }
        save_delta_file(deltas, root / f"{name}.safetensors", selection=restriction.selection, base_model="tiny")
    task = tiny_model("qwen2", seed=0)
    with torch.no_grad():
        task.model.layers[1].self_attn.q_proj.weight[8:16] += 0.5
    task.save_pretrained(root / "task")
    return root


# ---- unit level: the helper -----------------------------------------------------------------------------------------
def test_atomic_write_file_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write_file(path) as temp:
        pathlib.Path(temp).write_bytes(b"half")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []
    with atomic_write_file(path) as temp:
        pathlib.Path(temp).write_bytes(b"new")
    assert path.read_bytes() == b"new" and leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _as_dead(entry: str, pid: int) -> str:
    """`entry` (a sibling_path of this process) renamed as if a dead process `pid` had made it."""
    folder, name = os.path.split(entry)
    parts = name.split("-")
    parts[-2] = str(pid)
    return os.path.join(folder, "-".join(parts))


def test_killed_swap_is_undone_by_the_next_run(tmp_path):
    """A kill between the two renames of a directory swap: `out` missing, the old output aside, the new one in its
    temporary directory. cleanup_stale puts the old one back and removes the temporary one; dead processes'
    leftovers go, a live process's stay."""
    out = tmp_path / "out"
    pid = _dead_pid()
    old = pathlib.Path(_as_dead(sibling_path(out, "old"), pid))
    old.mkdir()
    (old / "config.json").write_text("old")
    tmp = pathlib.Path(_as_dead(sibling_path(out, "tmp"), pid))
    tmp.mkdir()
    (tmp / "config.json").write_text("half")
    live = pathlib.Path(sibling_path(out, "tmp"))  # this (live) process's
    live.mkdir()
    cleanup_stale(out)
    assert (out / "config.json").read_text() == "old"
    assert leftovers(tmp_path) == [live.name]
    live.rmdir()
    with atomic_directory(out) as new:
        pathlib.Path(new, "config.json").write_text("new")
    assert snapshot(out) == {"config.json": b"new"} and leftovers(tmp_path) == []


def test_atomic_directory_refuses_to_replace_unrelated_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with (
        pytest.raises(FileExistsError, match="refusing to replace"),
        atomic_directory(tmp_path, replaceable=lambda d: os.path.isfile(os.path.join(d, "config.json"))),
    ):
        pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_merge_refuses_an_output_that_holds_its_inputs(world, tmp_path):
    from alps_trl.restriction.delta import merge_delta_checkpoint

    with pytest.raises(ValueError, match="holds the input"):
        merge_delta_checkpoint(world / "base", world / "new.safetensors", world)
    assert (world / "base" / "config.json").is_file()


# ---- kill tests -------------------------------------------------------------------------------------------------
def _previous_and_new(code_for, out: pathlib.Path):
    """(old snapshot, new snapshot): the output of the old delta, then of the new one (via the same code)."""
    proc = run_py(code_for("old.safetensors"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = snapshot(out)
    proc = run_py(code_for("new.safetensors"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = snapshot(out)
    assert old != new and old and new
    return old, new


@pytest.mark.slow
@pytest.mark.parametrize("to_peft", [False, True], ids=["checkpoint", "to_peft"])
def test_killed_alps_merge_leaves_old_or_new(world, tmp_path, to_peft):
    out = tmp_path / "out"
    extra = ("--to-peft",) if to_peft else ()

    def code_for(delta):
        args = [str(world / "base"), str(world / delta), str(out), *extra]
        return f"from alps_trl.cli.merge import main; sys.exit(main({args!r}))"

    old, new = _previous_and_new(code_for, out)
    code = code_for("new.safetensors")
    calls = events(code, tmp_path / "log")
    points = key_points(calls, out, seed=7, extra=0 if to_peft else 1)
    window = [i for i in points if calls[i][0] == "rename" and calls[i][2:3] == [str(out)]]
    assert window, "the swap of an existing output renames the new directory in"
    killed = sweep(code, out, old, new, points, restore=lambda: write_tree(out, old), rerun_after=window)
    assert killed == len(points)
    # No previous output: a kill leaves nothing or the new output.
    first = [i for i, c in enumerate(calls) if c[0] == "save_file"][:1]
    sweep(code, out, None, new, first, restore=lambda: write_tree(out, None))


@pytest.mark.slow
def test_killed_alps_localize_leaves_old_or_new(world, tmp_path):
    out = tmp_path / "heads.json"

    def code_for(ratio):
        args = [str(world / "base"), str(world / "task"), "--output", str(out), "--quiet", "--ratio", ratio]
        return f"from alps_trl.cli.localize import main; sys.exit(main({args!r}))"

    assert run_py(code_for("0.0625")).returncode == 0
    old = snapshot(out)
    code = code_for("0.25")
    calls = events(code, tmp_path / "log")
    new = snapshot(out)
    assert old != new
    replace = [i for i, c in enumerate(calls) if c[0] == "replace" and c[2:3] == [str(out)]]
    assert replace
    points = sorted(set(replace) | set(random.Random(3).sample(range(len(calls)), min(3, len(calls)))))
    sweep(code, out, old, new, points, restore=lambda: write_tree(out, old), rerun_after=replace)


# ---- GGUF -----------------------------------------------------------------------------------------------------
def make_tiny_gguf(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A 2-layer llama GGUF file (float32, a 64-token llama tokenizer) that transformers loads."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    rng = np.random.default_rng(seed)
    layers, d, heads, kv, ff, vocab = 2, 64, 4, 2, 128, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"{chr(97 + i % 26)}{i}" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("token_embd.weight", vocab, d)
    tensor("output_norm.weight", d)
    tensor("output.weight", vocab, d)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", d)
        tensor(f"blk.{i}.ffn_norm.weight", d)
        tensor(f"blk.{i}.attn_q.weight", d, d)
        tensor(f"blk.{i}.attn_k.weight", kv * d // heads, d)
        tensor(f"blk.{i}.attn_v.weight", kv * d // heads, d)
        tensor(f"blk.{i}.attn_output.weight", d, d)
        tensor(f"blk.{i}.ffn_gate.weight", ff, d)
        tensor(f"blk.{i}.ffn_up.weight", ff, d)
        tensor(f"blk.{i}.ffn_down.weight", d, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _convert_code(gguf_path) -> str:
    return f"from alps_trl.localization.gguf import convert_gguf; print(convert_gguf({str(gguf_path)!r}))"


def _assert_complete_cache(directory: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM

    from alps_trl.localization.gguf import is_converted

    assert is_converted(str(directory))
    assert AutoModelForCausalLM.from_pretrained(directory).config.num_hidden_layers == 2
    assert leftovers(directory.parent) == []


@pytest.fixture
def tiny_gguf(tmp_path):
    return make_tiny_gguf(tmp_path / "tiny.gguf")


@pytest.mark.slow
def test_killed_gguf_conversion_is_never_reused_half_written(tiny_gguf, tmp_path, monkeypatch):
    from alps_trl.localization.gguf import converted_dir, is_converted

    cache = tmp_path / "cache"
    monkeypatch.setenv("ALPS_TRL_CACHE", str(cache))
    target = pathlib.Path(converted_dir(str(tiny_gguf), str(cache)))
    code = _convert_code(tiny_gguf)
    events(code, tmp_path / "log")  # creates the cache folders and the lock file, as every later run finds them
    write_tree(target, None)
    calls = events(code, tmp_path / "log")
    new = snapshot(target)
    points = [i for i, c in enumerate(calls) if c[0] == "save_file"][:1]
    points += [i for i, c in enumerate(calls) if c[0] == "rename" and c[2:3] == [str(target)]]
    assert len(points) == 2
    for k in points:
        write_tree(target, None)
        proc = run_py(code, kill_at=k, env={"ALPS_TRL_CACHE": str(cache)})
        assert proc.returncode == -signal.SIGKILL
        assert not target.exists() or is_converted(str(target))
        proc = run_py(code, env={"ALPS_TRL_CACHE": str(cache)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == str(target)
        assert snapshot(target).keys() == new.keys()
        _assert_complete_cache(target)


@pytest.mark.slow
def test_concurrent_gguf_conversions_both_end_with_the_cache(tiny_gguf, tmp_path):
    from alps_trl.localization.gguf import converted_dir

    cache = tmp_path / "cache"
    env = _env(ALPS_TRL_CACHE=str(cache))
    cmd = [sys.executable, "-c", _convert_code(tiny_gguf)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = [p.communicate(timeout=300) for p in procs]
    target = converted_dir(str(tiny_gguf), str(cache))
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == target
    # The lock makes the second wait for the first and reuse its directory: one conversion.
    assert sum("ALPS: converting" in err for _, err in results) == 1
    _assert_complete_cache(pathlib.Path(target))


def test_conversion_replaces_an_unmarked_directory(tiny_gguf, tmp_path):
    """A directory without the COMPLETE marker at the target (an older alps_trl killed mid-rename, or a user's
    copy) is an incomplete conversion: replaced, not an error; old `.converting-*` leftovers are removed."""
    from alps_trl.localization.gguf import convert_gguf, converted_dir

    cache = tmp_path / "cache"
    target = pathlib.Path(converted_dir(str(tiny_gguf), str(cache)))
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")
    legacy = target.parent / ".converting-abc"
    legacy.mkdir()
    old = time.time() - 7200
    os.utime(legacy, (old, old))
    assert convert_gguf(str(tiny_gguf), str(cache)) == str(target)
    _assert_complete_cache(target)
    assert not legacy.exists()


# ---- trainer saves (unit level: the helpers AlpsTrainerMixin calls) ----------------------------------------------
TRAINER_SAVE = """
import torch
from restriction_helpers import selection_for
from alps_trl.restriction import build_restriction
from alps_trl.testing import tiny_model
from alps_trl.trainers import checkpoints
model = tiny_model("qwen2", seed=0)
restriction = build_restriction(model, selection_for(model), "delta", train_non_attention=False)
restriction.install(model)
gen = torch.Generator().manual_seed({seed})
deltas = {{k: torch.randn(v.shape, generator=gen) * 0.01 if k.endswith("alps_delta") else v
          for k, v in restriction.delta_state_dict(model).items()}}
out = {out!r}
{action}
"""
ACTIONS = {
    "delta_file": "checkpoints.write_delta_file(model, restriction, deltas, out)",
    "adapter": "checkpoints.write_adapter(model, restriction, deltas, out, False)",
    "final_save": (
        "def save(d):\n"
        "    torch.manual_seed({seed}); tiny_model('qwen2', seed={seed}).save_pretrained(d)\n"
        "    checkpoints.write_delta_file(model, restriction, deltas, d + '/' + checkpoints.DELTA_FILE)\n"
        "checkpoints.staged_save(out, save)"
    ),
}


def _trainer_code(kind: str, out: pathlib.Path, seed: int) -> str:
    action = ACTIONS[kind].replace("{seed}", str(seed))
    return TRAINER_SAVE.format(seed=seed, out=str(out), action=action)


def _trainer_env() -> dict:
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["delta_file", "adapter", "final_save"])
def test_killed_trainer_save_leaves_old_or_new(tmp_path, kind):
    """write_delta_file (alps_delta.safetensors) and write_adapter (alps_save_adapter's adapter/) are atomic;
    the final save (staged_save around Trainer._save) replaces each file atomically: every file of output_dir is
    the old one or the new one, byte for byte."""
    out = tmp_path / ("alps_delta.safetensors" if kind == "delta_file" else "out")
    env = _trainer_env()

    def run(seed, kill_at=None, log=None):
        return run_py(_trainer_code(kind, out, seed), kill_at=kill_at, log=log, env=env)

    assert run(1).returncode == 0
    old = snapshot(out)
    log = tmp_path / "log"
    assert run(2, log=str(log)).returncode == 0
    new = snapshot(out)
    assert old != new
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    points = key_points(calls, out, seed=11, extra=1)
    if kind == "final_save":  # moves into output_dir: kill before each one
        points = sorted(set(points) | {i for i, c in enumerate(calls) if c[0] == "replace" and str(out) in c[2]})
    for k in points:
        write_tree(out, old)
        proc = run(2, kill_at=k)
        if proc.returncode == 0:
            continue
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        if kind == "final_save":
            state = snapshot(out)
            for name, data in state.items():
                if ".alps-tmp-" in name.split("/")[0]:
                    continue  # the killed save's staging directory, removed by the next save
                assert data in (old.get(name), new.get(name)), f"killed at call {k}: {name} is partial"
        else:
            assert_killed_state(proc, out, old, new, f"killed at call {k}")
    proc = run(2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert snapshot(out) == new
    assert leftovers(out.parent) == [] and (kind != "final_save" or leftovers(out) == [])


# ---- read-only and full directories ------------------------------------------------------------------------------
def _run_failing(code: str, failure: str, read_only: list, size_limit: int):
    """Run `code` in a child that cannot write `read_only` ("read_only") or past `size_limit` bytes ("full")."""
    if failure == "full":
        return run_py(code, preexec_fn=_file_size_limit(size_limit))
    for p in read_only:
        os.chmod(p, 0o555)
    try:
        return run_py(code, preexec_fn=_drop_root_powers)
    finally:
        for p in read_only:
            os.chmod(p, 0o755)


@pytest.mark.parametrize("to_peft", [False, True], ids=["checkpoint", "to_peft"])
@pytest.mark.parametrize("failure", ["read_only", "full"])
def test_alps_merge_into_read_only_or_full_directory(world, tmp_path, failure, to_peft):
    parent = tmp_path / "target"
    parent.mkdir()
    out = parent / "out"
    extra = ["--to-peft"] if to_peft else []
    args = [str(world / "base"), str(world / "old.safetensors"), str(out), *extra]
    code = f"from alps_trl.cli.merge import main; sys.exit(main({args!r}))"
    assert run_py(code).returncode == 0
    old = snapshot(out)
    code = code.replace("old.safetensors", "new.safetensors")
    proc = _run_failing(code, failure, [parent, out], 4096)
    assert_one_line_error(proc, "alps-merge", out)
    assert snapshot(out) == old
    assert leftovers(parent) == []


@pytest.mark.parametrize("failure", ["read_only", "full"])
def test_alps_localize_into_read_only_or_full_directory(world, tmp_path, failure):
    parent = tmp_path / "target"
    parent.mkdir()
    out = parent / "heads.json"
    args = [str(world / "base"), str(world / "task"), "--output", str(out), "--quiet", "--ratio", "0.0625"]
    code = f"from alps_trl.cli.localize import main; sys.exit(main({args!r}))"
    assert run_py(code).returncode == 0
    old = snapshot(out)
    code = code.replace("0.0625", "0.25")
    proc = _run_failing(code, failure, [parent], 64)
    assert_one_line_error(proc, "alps-localize", out)
    assert snapshot(out) == old
    assert leftovers(parent) == []


@pytest.mark.parametrize("failure", ["read_only", "full"])
def test_trainer_save_model_into_read_only_or_full_directory(tmp_path, failure, monkeypatch):
    """trainer.save_model on a real AlpsSFTTrainer (delta mode, alps_save_adapter): the write failure is simulated
    in-process (as root, a chmod does not stop this process): os.mkdir refused under the directory (read-only), or
    safetensors' writer failing with ENOSPC (full). The error is an OSError naming the path; the previous save is
    intact, byte for byte, and no staging directory is left."""
    from restriction_helpers import selection_for
    from trainer_helpers import sft_config, sft_dataset, tiny_tokenizer

    from alps_trl.trainers.sft import AlpsSFTTrainer

    model = tiny_model("llama")
    selection = selection_for(model)
    args = sft_config(
        str(tmp_path / "run"), alps_mode="delta", alps_train_non_attention=False, alps_save_adapter=True, max_steps=1
    )
    trainer = AlpsSFTTrainer(
        model=model,
        args=args,
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
        head_selection=selection,
    )
    trainer.train()
    final = tmp_path / "final"
    trainer.save_model(str(final))
    old = snapshot(final)
    assert "alps_delta.safetensors" in old and "adapter/adapter_model.safetensors" in old
    real_mkdir = os.mkdir
    if failure == "read_only":

        def mkdir(path, *a, **k):
            if str(path).startswith(str(final)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
    else:
        import safetensors.torch
        import transformers.modeling_utils

        def full(tensors, filename, metadata=None):
            pathlib.Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", filename)

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
        monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        trainer.save_model(str(final))
    monkeypatch.undo()
    assert str(final) in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, OutputWriteError)
    assert snapshot(final) == old
    assert leftovers(final) == [] and leftovers(final / "adapter") == [] and leftovers(tmp_path) == []


# ---- slow: every kill point, kills at the temp's appearance and after seeded delays ------------------------------
def _kill_when(code: str, appears: callable, delays: list[float], env: dict | None = None) -> list[int]:
    """Start `code` and SIGKILL it when appears() (polled) or after each of `delays`; returns the exit codes."""
    codes = []
    for delay in [None, *delays]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], env=_env(**(env or {})), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        start = time.monotonic()
        while proc.poll() is None:
            if (delay is None and appears()) or (delay is not None and time.monotonic() - start >= delay):
                proc.kill()
                break
            time.sleep(0.001)
        codes.append(proc.wait())
    return codes


@pytest.mark.slow
def test_alps_merge_killed_at_every_call(world, tmp_path):
    """Every rename, replace, mkdir, unlink and write of a merge, one kill each (the --to-peft output goes through the
    same atomic_directory; its chosen kill points are in test_killed_alps_merge_leaves_old_or_new)."""
    out = tmp_path / "out"
    extra = ()

    def code_for(delta):
        args = [str(world / "base"), str(world / delta), str(out), *extra]
        return f"from alps_trl.cli.merge import main; sys.exit(main({args!r}))"

    old, new = _previous_and_new(code_for, out)
    code = code_for("new.safetensors")
    calls = events(code, tmp_path / "log")
    sweep(code, out, old, new, list(range(len(calls))), restore=lambda: write_tree(out, old))
    rng = random.Random(5)
    for _ in range(3):
        write_tree(out, old)
        _kill_when(code, lambda: bool(leftovers(tmp_path)), [rng.uniform(1.0, 6.0)])
        assert_killed_state(None, out, old, new, "timed kill")


@pytest.mark.slow
def test_gguf_conversion_killed_when_its_temp_appears(tiny_gguf, tmp_path):
    from alps_trl.localization.gguf import converted_dir, is_converted

    cache = tmp_path / "cache"
    target = pathlib.Path(converted_dir(str(tiny_gguf), str(cache)))
    env = {"ALPS_TRL_CACHE": str(cache)}
    rng = random.Random(9)
    codes = _kill_when(
        _convert_code(tiny_gguf),
        lambda: target.parent.is_dir() and bool(leftovers(target.parent)),
        [rng.uniform(2.0, 8.0) for _ in range(3)],
        env=env,
    )
    assert codes[0] == -signal.SIGKILL
    assert not target.exists() or is_converted(str(target))
    proc = subprocess.run([sys.executable, "-c", _convert_code(tiny_gguf)], env=_env(**env), capture_output=True)
    assert proc.returncode == 0
    _assert_complete_cache(target)
