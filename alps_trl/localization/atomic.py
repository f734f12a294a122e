"""Writing output files and directories so that a killed, crashed or failed save never leaves a half-written one.

Layer 1 (the lowest, so every layer can use it); standard library only.

- `atomic_write_file(path)` yields a temporary path beside `path` (same directory, so the same file system);
  the caller writes the whole file there (``safetensors.torch.save_file``, ``torch.save``, ``open``), and on a
  clean exit it is fsynced and ``os.replace``d onto `path`. On an error the temporary file is removed and
  `path` keeps what it held before (the previous complete file, or nothing).
- `atomic_directory(path)` yields a temporary directory beside `path` to build the whole output in; on a
  clean exit its files are fsynced and it takes `path`'s place. When `path` already exists it is renamed
  aside, the new directory renamed in, then the old one deleted. A kill therefore leaves the old complete
  directory or the new complete one at `path`, except in the window between those two renames (two
  syscalls), where `path` is missing and the old output sits in its aside directory: the next
  `atomic_directory` / `atomic_write_file` on `path` (or `cleanup_stale(path)`) renames it back first.
- Temporary and aside entries are hidden siblings named
  ``.<name>.alps-tmp-<host>-<pid>-<random>`` / ``.<name>.alps-old-<host>-<pid>-<random>`` (host: 8 hex digits
  of the host name's hash). `cleanup_stale(path)` removes those of `path` whose process is gone (same host,
  pid no longer alive), or that are older than `STALE_SECONDS` (another host sharing the file system);
  every atomic write on `path` runs it first, so a kill's leftovers are cleaned by the next run.

Write errors (a read-only directory, a full disk, a file-size limit) surface as an `OSError` with the
errno of the failure and a one-line message naming `path`, the output the caller asked for, rather than
the temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator

TMP_KIND = "tmp"
OLD_KIND = "old"
# Leftovers of a process on another host (a shared file system) are removed only once this old.
STALE_SECONDS = 24 * 3600
_ENTRY = re.compile(
    r"^\.(?P<name>.+)\.alps-(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})"
    r"(?P<suffix>\.[A-Za-z0-9]+)?$"
)


class OutputWriteError(OSError):
    """An output could not be written; ``filename`` is the output path, the message one line."""


def _host_id() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def sibling_path(path: str | os.PathLike, kind: str = TMP_KIND, suffix: str = "") -> str:
    """A fresh hidden name beside `path` for a temporary (`kind` "tmp") or aside ("old") entry."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.alps-{kind}-{_host_id()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(entry: str, host: str, pid: int) -> bool:
    if host == _host_id():
        return not _pid_alive(pid)
    try:
        return time.time() - os.lstat(entry).st_mtime > STALE_SECONDS
    except OSError:
        return False


def _remove(entry: str) -> None:
    if os.path.isdir(entry) and not os.path.islink(entry):
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)


def cleanup_stale(path: str | os.PathLike) -> list[str]:
    """Recover from and remove what a killed atomic write of `path` left beside it; returns what it removed.

    When `path` is missing and a dead process's aside entry (the previous output, moved aside just before the
    kill) exists, it is renamed back to `path` first. A directory that cannot be listed is left alone.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = _ENTRY.match(entry)
        if match is None or match["name"] != name:
            continue
        full = os.path.join(folder, entry)
        if _is_stale(full, match["host"], int(match["pid"])):
            stale.append((match["kind"], full))
    removed = []
    # The previous output first (newest aside first), so that it is back in place before anything is deleted.
    for kind, full in sorted(stale, key=lambda e: (e[0] != OLD_KIND, -_mtime(e[1]))):
        if kind == OLD_KIND and not os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.rename(full, path)
                continue
        _remove(full)
        removed.append(full)
    return removed


def _mtime(entry: str) -> float:
    try:
        return os.lstat(entry).st_mtime
    except OSError:
        return 0.0


def fsync_path(path: str) -> None:
    """fsync a file or directory (best effort where the platform cannot fsync directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(directory: str) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def output_error(err: BaseException, path: str, temp: str | None = None) -> OutputWriteError:
    """`err` (raised while writing `path`, possibly at its temporary name `temp`) as a one-line error naming `path`
    (or, for an error about a file inside the temporary directory `temp`, that file's place under `path`)."""
    filename = getattr(err, "filename", None)
    if temp and isinstance(filename, str) and os.path.abspath(filename).startswith(temp + os.sep):
        path = os.path.join(path, os.path.relpath(os.path.abspath(filename), temp))
    code = getattr(err, "errno", None)
    os_error = re.search(r"os error (\d+)", str(err))
    if code is None and os_error:
        code = int(os_error[1])
    if code is None:
        text = str(err).lower()
        code = next(
            (
                c
                for c, words in (
                    (errno.ENOSPC, ("no space", "disk full")),
                    (errno.EFBIG, ("file too large",)),
                    (errno.EACCES, ("permission denied",)),
                    (errno.EROFS, ("read-only",)),
                )
                if any(w in text for w in words)
            ),
            errno.EIO,
        )
    reason = getattr(err, "strerror", None) or os.strerror(code)
    reason = " ".join(str(reason).split())
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += f"; is {os.path.dirname(path) or '.'} writable?"
    elif code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += f"; free space on the file system of {os.path.dirname(path) or '.'}"
    return OutputWriteError(code, f"cannot write {path}: {reason}", path)


def is_write_error(err: BaseException, temp: str) -> bool:
    """Whether `err` came from writing under `temp` (not, say, from a missing input file)."""
    if isinstance(err, OutputWriteError):
        return False
    names = [getattr(err, "filename", None), getattr(err, "filename2", None)]
    if any(isinstance(n, str) and os.path.abspath(n).startswith(temp) for n in names):
        return True
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS) or (
            err.errno in (errno.EACCES, errno.EPERM) and not any(names)
        )
    # safetensors and torch report a failed write as their own error types with the OS message in the text.
    text = str(err).lower()
    return any(w in text for w in ("no space", "file too large", "permission denied", "read-only", "disk full"))


def _make_parent(path: str) -> None:
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise output_error(err, path) from None


@contextlib.contextmanager
def atomic_write_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path to write the whole of `path` into; it replaces `path` on a clean exit.

    Args:
        path: the output file (its directory is created).
        suffix: appended to the temporary name, for writers that pick the format from it (``.png``).
    """
    path = os.path.abspath(os.fspath(path))
    _make_parent(path)
    cleanup_stale(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory", path)
    temp = sibling_path(path, TMP_KIND, suffix)
    try:
        yield temp
        if not os.path.isfile(temp):
            raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: the writer wrote nothing", path)
        fsync_path(temp)
        os.replace(temp, path)
        fsync_path(os.path.dirname(path))
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(err, Exception) and is_write_error(err, temp):
            raise output_error(err, path, temp) from err
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` as the whole content of `path`, atomically."""
    with atomic_write_file(path) as temp, open(temp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) as the whole content of `path`, atomically."""
    write_bytes_atomic(path, text.encode())


def copy_file_atomic(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy `source` to `target` so that `target` is the old file or the complete copy, never part of it."""
    with atomic_write_file(target) as temp:
        shutil.copyfile(source, temp)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, replaceable: Callable[[str], bool] | None = None, what: str = "output directory"
) -> Iterator[str]:
    """Yield a temporary directory to build the whole of `path` in; it takes `path`'s place on a clean exit.

    Args:
        path: the output directory. An existing one is replaced as a whole (its other files are not kept).
        replaceable: called with an existing, non-empty `path` before anything is written; False refuses to
            replace it (FileExistsError), so that a mistyped path never deletes unrelated files.
        what: what `path` is, for that error message.
    """
    path = os.path.abspath(os.fspath(path))
    _make_parent(path)
    cleanup_stale(path)
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise FileExistsError(errno.EEXIST, f"cannot write {path}: it exists and is not a directory", path)
        if os.listdir(path) and replaceable is not None and not replaceable(path):
            raise FileExistsError(
                errno.EEXIST,
                f"{path} exists and is not an earlier {what}: refusing to replace it; pass a new directory",
                path,
            )
    temp = sibling_path(path, TMP_KIND)
    try:
        os.mkdir(temp)
    except OSError as err:
        raise output_error(err, path, temp) from None
    try:
        yield temp
        _fsync_tree(temp)
        _swap_in(temp, path)
    except BaseException as err:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(err, Exception) and is_write_error(err, temp):
            raise output_error(err, path, temp) from err
        raise


def _swap_in(temp: str, path: str) -> None:
    """Rename the complete directory `temp` to `path`, moving an existing `path` aside first and deleting it after."""
    folder = os.path.dirname(path)
    for _ in range(5):  # another process may put a directory at `path` between the calls: try again
        if not os.path.lexists(path):
            try:
                os.rename(temp, path)
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue
            fsync_path(folder)
            return
        old = sibling_path(path, OLD_KIND)
        try:
            os.rename(path, old)
        except FileNotFoundError:
            continue
        # From here to the next rename `path` is missing; a kill in between is undone by cleanup_stale(path).
        try:
            os.rename(temp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(old, path)
            raise
        fsync_path(folder)
        shutil.rmtree(old, ignore_errors=True)
        return
    raise FileExistsError(errno.EEXIST, f"cannot write {path}: other processes keep replacing it", path)
