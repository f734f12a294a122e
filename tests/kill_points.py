"""Run a Python script and SIGKILL it at a chosen point, the way a preempted or OOM-killed job dies.

    python tests/kill_points.py SPEC SCRIPT [ARGS...]
    accelerate launch --num_processes 2 tests/kill_points.py SPEC SCRIPT [ARGS...]

SPEC (several joined by ","; the first to fire kills the process, and under several processes only rank
``KILL_RANK``, default 0, fires):

- ``step:N``: right after the backward of the N-th `Trainer.training_step` call, before the optimizer step.
- ``write:PATTERN``: half-way through writing the first file whose path contains PATTERN (or matches it, when it
  holds a ``*``, as `fnmatch` does: ``*checkpoint-8/*alps_delta*`` also matches the temporary name an atomic
  write uses in a staging folder of checkpoint-8): a Python ``open``
  for writing (JSON), ``torch.save``, ``shutil.copyfile`` or safetensors' ``save_file``. The first half of the
  bytes reaches the disk.
- ``call:MODULE:QUALNAME[@N]``: on entering that function (the N-th time, default the first), e.g.
  ``call:alps_trl.trainers.head_sources:share_selection`` or ``call:transformers.trainer:Trainer._save_checkpoint@2``.
- ``none``: no kill (the uninterrupted run, through the same wrapper).

With ``KILL_STAMP=PATH`` the dying process first writes the time of its death there (to time how fast the rest of
a multi-process job goes down). ``KILL_SIGNAL=STOP`` freezes the process instead (SIGSTOP: its connections stay
open, as with a node that hangs or drops off the network).

Test-only: nothing in the package knows about it.
"""

from __future__ import annotations

import builtins
import fnmatch
import os
import runpy
import signal
import sys


def _die() -> None:
    stamp = os.environ.get("KILL_STAMP")
    if stamp:
        import time

        with builtins.__dict__.get("_kill_points_open", open)(stamp, "w") as f:
            f.write(repr(time.time()))
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP if os.environ.get("KILL_SIGNAL") == "STOP" else signal.SIGKILL)


def _armed() -> bool:
    return os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0")


class _HalfWriter:
    """A file object that writes the first half of its first write and then kills the process."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        os.fsync(self._f.fileno())
        _die()

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _install_write_kill(pattern: str) -> None:
    import io
    import shutil

    import safetensors.torch
    import torch

    real_open, real_save_file = builtins.open, safetensors.torch.save_file

    def hit(path) -> bool:
        path = str(path)
        return _armed() and (fnmatch.fnmatch(path, pattern) if "*" in pattern else pattern in path)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = "" if isinstance(file, int) else os.fspath(file)
        if any(m in mode for m in "wax") and hit(path):
            return _HalfWriter(f)
        return f

    def save_file(tensors, filename, metadata=None):
        if not hit(os.fspath(filename)):
            return real_save_file(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        with real_open(filename, "wb") as f:
            _HalfWriter(f).write(data)

    def torch_save(obj, f, *args, **kwargs):  # a path is written by torch's C++ writer, not Python's open
        if not (isinstance(f, (str, os.PathLike)) and hit(os.fspath(f))):
            return real_torch_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_torch_save(obj, buffer, *args, **kwargs)
        with real_open(f, "wb") as out:
            _HalfWriter(out).write(buffer.getvalue())

    def copyfile(src, dst, *args, **kwargs):  # copies go through os.sendfile, not write()
        if not hit(os.fspath(dst)):
            return real_copyfile(src, dst, *args, **kwargs)
        with real_open(src, "rb") as f, real_open(dst, "wb") as out:
            _HalfWriter(out).write(f.read())

    real_torch_save, real_copyfile = torch.save, shutil.copyfile
    builtins._kill_points_open = real_open
    builtins.open = open_
    safetensors.torch.save_file = save_file
    torch.save = torch_save
    shutil.copyfile = copyfile


def _install_step_kill(n: int) -> None:
    import transformers

    real = transformers.Trainer.training_step
    calls = [0]

    def training_step(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == n and _armed():
            _die()
        return loss

    transformers.Trainer.training_step = training_step


def _install_call_kill(target: str) -> None:
    import importlib

    target, _, nth = target.partition("@")
    module_name, _, qualname = target.partition(":")
    calls = [0]
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth or 1) and _armed():
            _die()
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def install(spec: str) -> None:
    for part in spec.split(","):
        kind, _, arg = part.partition(":")
        if kind == "step":
            _install_step_kill(int(arg))
        elif kind == "write":
            _install_write_kill(arg)
        elif kind == "call":
            _install_call_kill(arg)
        elif kind != "none":
            raise SystemExit(f"kill_points: unknown kill point {part!r}")


if __name__ == "__main__":
    spec, script, *argv = sys.argv[1:]
    install(spec)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
