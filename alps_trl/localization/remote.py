"""Read a hub model's q/k/v rows with HTTP range requests, without downloading its checkpoint.

Layer 2, beside `alps_trl.localization.weights`. ALPS scores heads from the q/k/v weights alone, about a tenth
of a checkpoint. For a hub id that is not in the local cache (and only when the caller passes ``fetch="qkv"``)
this module asks the hub, through huggingface_hub (``HF_ENDPOINT``, ``HF_TOKEN``, revisions), for:

1. the revision's commit and file list (``/api/models/{repo}/revision/{rev}``),
2. ``config.json`` and ``model.safetensors.index.json`` (when sharded),
3. of each shard that holds q/k/v tensors: its 8-byte header length, then its header,
4. then only the q/k/v byte ranges, layer by layer, in a background thread.

The fetched bytes are written verbatim into a small safetensors file per shard (only the q/k/v tensors, with
their own header) under the cache::

    $ALPS_TRL_CACHE (default ~/.cache/alps_trl)/qkv/models--{org}--{name}/
        snapshots/{commit}/config.json, [model.safetensors.index.json], {shard file names}
        refs/{revision}                              # the commit; written last: the snapshot is complete

Every file is written to a temporary name and moved into place with os.replace, so an interrupted run leaves
no partial snapshot behind (a later run fetches again). The rows are read back with the local reader
(`weights._SafetensorsFile`): while fetching, each read waits for its tensor's bytes; a later run opens the
snapshot as a local checkpoint directory, with no request at all. Both paths parse the same bytes with the
same code, so scores are bit-identical to those of the full local checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from alps_trl.localization.anatomy import AttentionLayout
from alps_trl.localization.weights import (
    SAFE_INDEX,
    SAFE_SINGLE,
    WeightSource,
    _from_directory,
    _read_config_json,
    _SafetensorsFile,
    _SafetensorsStore,
    parse_header,
    parse_header_length,
    source_from_store,
)

CACHE_ENV = "ALPS_TRL_CACHE"
# Attempts of one byte range after a dropped connection (each resumes where the last one stopped).
MAX_RANGE_ATTEMPTS = 6
_RETRY_WAIT_S = 0.25
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def cache_root() -> str:
    """Where fetched q/k/v rows live: $ALPS_TRL_CACHE/qkv, default ~/.cache/alps_trl/qkv."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "alps_trl")
    return os.path.join(base, "qkv")


def _repo_folder(repo_id: str) -> str:
    return os.path.join(cache_root(), "models--" + repo_id.replace("/", "--"))


def _ref_path(repo_id: str, revision: str | None) -> str:
    return os.path.join(_repo_folder(repo_id), "refs", quote(revision or "main", safe=""))


def cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The complete cached snapshot directory of `repo_id` at `revision`, or None (no request is made)."""
    try:
        with open(_ref_path(repo_id, revision)) as f:
            commit = f.read().strip()
    except OSError:
        return None
    path = os.path.join(_repo_folder(repo_id), "snapshots", commit)
    return path if commit and os.path.isdir(path) else None


def open_remote_source(
    repo_id: str,
    *,
    revision: str | None = None,
    config: dict | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
    endpoint: str | None = None,
) -> WeightSource:
    """A `WeightSource` of hub model `repo_id` that reads only its q/k/v rows (from the cache when it holds them).

    Args:
        revision: branch, tag or commit (default main). A cached branch is not checked for new commits: pass the
            commit, or remove the cache entry, to move on.
        config: overrides the fetched config.json (a dict).
        progress: a tqdm bar of the bytes fetched against the planned total.
        endpoint: the hub's address (default: huggingface_hub's, i.e. ``HF_ENDPOINT``).
    Raises:
        PermissionError: 401/403 (gated or private model: what to do is in the message).
        FileNotFoundError: 404 (repository, revision or file), or a repository without safetensors weights.
        ConnectionError: the hub cannot be reached, or a range still fails after MAX_RANGE_ATTEMPTS.
    """
    cached = cached_snapshot(repo_id, revision)
    if cached is not None:
        return _from_directory(cached, config, trust_remote_code, name=repo_id)
    hub = _Hub(repo_id, revision, endpoint)
    commit, files = hub.resolve()
    snapshot = os.path.join(_repo_folder(repo_id), "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    _atomic_write(os.path.join(snapshot, "config.json"), hub.get("config.json"))
    cfg = config if config is not None else _read_config_json(os.path.join(snapshot, "config.json"), trust_remote_code)
    plan = _plan(hub, files, cfg, snapshot)
    fetch = _Fetch(hub, plan, snapshot, _ref_path(repo_id, revision), progress)
    store = _SafetensorsStore([shard.file for shard in plan.shards])
    source = source_from_store(store, cfg, repo_id)
    fetch.start()
    return source


# ---- the hub: requests through huggingface_hub, errors as one line ------------------------------------
class _Hub:
    """Requests to one repository at one revision, through huggingface_hub's session, headers and URLs."""

    def __init__(self, repo_id: str, revision: str | None, endpoint: str | None):
        from huggingface_hub import constants

        self.repo_id, self.revision = repo_id, revision or "main"
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.commit = self.revision
        self.sizes: dict[str, int] = {}  # file name -> total bytes, from the Content-Range of a 206 answer

    def resolve(self) -> tuple[str, list[str]]:
        """(commit sha, file names) of the revision; later requests name the commit, so they all see one state."""
        from huggingface_hub import HfApi

        with self.errors():
            info = HfApi(endpoint=self.endpoint).model_info(self.repo_id, revision=self.revision)
        if not info.sha:
            raise OSError(f"{self.endpoint} gave no commit for {self.repo_id}@{self.revision}.")
        self.commit = info.sha
        return info.sha, [s.rfilename for s in info.siblings or []]

    def url(self, filename: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=self.endpoint)

    def get(self, filename: str) -> bytes:
        """The whole (small) file."""
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        with self.errors(filename):
            response = http_backoff("GET", self.url(filename), headers=build_hf_headers(), base_wait_time=0.5)
            hf_raise_for_status(response)
            return response.content

    def read_range(self, filename: str, start: int, stop: int, sink: Callable[[int, bytes], None]) -> None:
        """Bytes [start, stop) of `filename`, handed to sink(position, chunk) in order.

        A connection dropped mid-range is resumed from the last byte received, up to MAX_RANGE_ATTEMPTS times.
        """
        from huggingface_hub import get_session
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        pos, attempts = start, 0
        while pos < stop:
            attempts += 1
            headers = {**build_hf_headers(), "Range": f"bytes={pos}-{stop - 1}"}
            try:
                # Not http_stream_backoff: it retries only until the response starts, and an error while the body
                # streams (a dropped connection) cannot go back into it. This loop resumes at `pos` instead.
                with (
                    self.errors(filename),
                    get_session().stream("GET", self.url(filename), headers=headers) as response,
                ):
                    if response.status_code in _RETRY_STATUS:
                        raise ConnectionError(f"HTTP {response.status_code}")
                    hf_raise_for_status(response)
                    if response.status_code != 206:
                        raise OSError(
                            f"{self.endpoint} ignored the byte range asked of {self.repo_id}/{filename} (HTTP "
                            f"{response.status_code}); --fetch qkv needs a server with range requests."
                        )
                    self._record_size(filename, response.headers.get("Content-Range"))
                    for chunk in response.iter_bytes():  # as received: a drop loses none of it
                        chunk = chunk[: stop - pos]
                        sink(pos, chunk)
                        pos += len(chunk)
                        if pos >= stop:
                            break
                    if pos < stop:  # the body ended early without an error: as a drop, so the loop is bounded
                        raise ConnectionError(f"the answer ended at byte {pos} of {stop}")
            except ConnectionError as err:  # a dropped connection (translated by errors()), resumed at `pos`
                if attempts >= MAX_RANGE_ATTEMPTS:
                    raise ConnectionError(
                        f"Fetching {self.repo_id}/{filename} from {self.endpoint} failed {attempts} times ({err}); "
                        "check the connection and run again (fetched rows are kept only for complete models)."
                    ) from None
                time.sleep(_RETRY_WAIT_S * attempts)

    def _record_size(self, filename: str, content_range: str | None) -> None:
        """Keep the file's total size from a ``bytes a-b/total`` Content-Range (absent or ``*``: unknown)."""
        total = (content_range or "").rpartition("/")[2].strip()
        if total.isdigit():
            self.sizes[filename] = int(total)

    def read_bytes(self, filename: str, start: int, stop: int) -> bytes:
        parts: list[bytes] = []
        self.read_range(filename, start, stop, lambda _pos, chunk: parts.append(chunk))
        return b"".join(parts)

    @contextlib.contextmanager
    def errors(self, filename: str | None = None) -> Iterator[None]:
        """Turn huggingface_hub's HTTP errors into one-line OSErrors that say what to do."""
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo, page = self.repo_id, f"{self.endpoint}/{self.repo_id}"
        from huggingface_hub import get_token

        token_hint = "a token is set but lacks access" if get_token() else "no token is set"
        access = (
            f"accept the model's license on {page} (gated models) and set HF_TOKEN to a read token of that account "
            f"({token_hint})"
        )
        import httpx2

        try:
            yield
        except httpx2.TransportError as err:
            raise ConnectionError(f"Cannot fetch {repo} from {self.endpoint}: {err}.") from None
        except OfflineModeIsEnabled:
            raise ConnectionError(
                f"{repo} is not in the local caches and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to fetch "
                "its q/k/v rows."
            ) from None
        except GatedRepoError as err:
            raise PermissionError(f"{repo} is a gated model (HTTP {_status(err)}): {access}.") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(
                f"{repo} has no revision {self.revision!r} on {self.endpoint}: check --revision."
            ) from None
        except RemoteEntryNotFoundError:
            raise FileNotFoundError(f"{repo} has no file {filename!r} at revision {self.revision!r}.") from None
        except (RepositoryNotFoundError, HfHubHTTPError) as err:
            status = _status(err)
            if status in (401, 403):
                raise PermissionError(
                    f"{repo}: access denied by {self.endpoint} (HTTP {status}); the model is gated or private, or "
                    f"the id is wrong: {access}."
                ) from None
            if status == 404 or isinstance(err, RepositoryNotFoundError):
                raise FileNotFoundError(
                    f"{repo} was not found on {self.endpoint} (HTTP {status}): check the hub id."
                ) from None
            raise OSError(f"{repo}: HTTP {status} from {self.endpoint} ({str(err).splitlines()[0]}).") from None


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


# ---- the plan: which bytes of which files ------------------------------------------------------------
@dataclass
class _Range:
    """One q/k/v tensor: where its bytes are in the hub file and where they go in the cached file."""

    name: str
    src: int
    dst: int
    nbytes: int


@dataclass
class _Shard:
    filename: str
    file: _FetchingFile
    ranges: list[_Range]


@dataclass
class _Plan:
    shards: list[_Shard]
    index: dict | None  # the cached index's content (sharded repositories)
    order: list[tuple[_Shard, _Range]]  # every range, layer by layer
    header_bytes: int

    @property
    def qkv_bytes(self) -> int:
        return sum(r.nbytes for _, r in self.order)


def _plan(hub: _Hub, files: list[str], cfg: dict, snapshot: str) -> _Plan:
    """Read the index and the needed shards' headers; lay out the cached files (their headers written)."""
    if SAFE_SINGLE in files:
        shard_of, index = None, None
        headers = {SAFE_SINGLE: _read_header(hub, SAFE_SINGLE)}
        names = set(headers[SAFE_SINGLE][1])
    elif SAFE_INDEX in files:
        index = _json(hub.get(SAFE_INDEX), f"{hub.repo_id}/{SAFE_INDEX}")
        shard_of = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(shard_of, dict):
            raise ValueError(f"{hub.repo_id}/{SAFE_INDEX} is not a valid shard index (no weight_map).")
        names, headers = set(shard_of), {}
    else:
        bins = [f for f in files if f.endswith(".bin")]
        kind = f"only PyTorch .bin weights ({', '.join(sorted(bins)[:2])})" if bins else "no safetensors weights"
        raise FileNotFoundError(
            f"{hub.repo_id} has {kind}: --fetch qkv reads byte ranges of safetensors files ({SAFE_SINGLE} or "
            f"{SAFE_INDEX}); a pickled .bin must be downloaded whole (`hf download {hub.repo_id}`, then pass the "
            "local directory)."
        )
    try:
        layout = AttentionLayout.from_config(cfg, names)
    except ValueError as err:
        raise type(err)(f"{hub.repo_id}: {err}") from None
    wanted: list[str] = []
    for lp in layout.layers:
        for name in lp.qkv_tensor_names():
            wanted += [name] + [name + "_scale_inv"] * (name + "_scale_inv" in names)
    by_shard: dict[str, list[str]] = {}
    for name in wanted:
        by_shard.setdefault(SAFE_SINGLE if shard_of is None else shard_of[name], []).append(name)
    shards, header_bytes = [], 0
    for filename, tensor_names in by_shard.items():
        if filename not in headers:
            headers[filename] = _read_header(hub, filename)
        header_len, entries = headers[filename]
        header_bytes += 8 + header_len
        shards.append(_shard(filename, entries, 8 + header_len, tensor_names, snapshot, hub))
    cached_index = None
    if index is not None:
        cached_index = {"metadata": {"source": f"{hub.repo_id}@{hub.commit}"}, "weight_map": {}}
        for shard in shards:
            cached_index["weight_map"].update(dict.fromkeys(shard.file.entries, shard.filename))
    pos = {s.filename: 0 for s in shards}
    order = []
    for name in wanted:  # layer by layer, across shards
        shard = next(s for s in shards if name in s.file.entries)
        order.append((shard, shard.ranges[pos[shard.filename]]))
        pos[shard.filename] += 1
    return _Plan(shards, cached_index, order, header_bytes)


def _read_header(hub: _Hub, filename: str) -> tuple[int, dict[str, dict]]:
    """(header length, checked tensor entries) of one remote safetensors file, read with two range requests.

    The file's size (from the first answer's Content-Range) bounds the header and every tensor's bytes, so a file
    cut short on the server fails here, in one line, before any q/k/v range is asked for.
    """
    where = f"{hub.repo_id}/{filename}"
    raw_len = hub.read_bytes(filename, 0, 8)
    size = hub.sizes.get(filename)  # known once the first answer came
    header_len = parse_header_length(raw_len, where, size)
    data_size = None if size is None else size - 8 - header_len
    return header_len, parse_header(hub.read_bytes(filename, 8, 8 + header_len), where, data_size)


def _shard(filename: str, entries: dict, data_start: int, names: list[str], snapshot: str, hub: _Hub) -> _Shard:
    """The cached file of one shard: a safetensors header of `names` only, their data laid out in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "source": f"{hub.repo_id}@{hub.commit}/{filename}"}}
    ranges, offset = [], 0
    for name in names:
        entry = entries.get(name)
        if entry is None:
            raise ValueError(f"{hub.repo_id}/{filename} lacks tensor {name!r}, which its index places there.")
        begin, end = entry["data_offsets"]
        header[name] = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "data_offsets": [offset, offset + end - begin],
        }
        ranges.append(_Range(name, data_start + begin, offset, end - begin))
        offset += end - begin
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd, tmp = tempfile.mkstemp(dir=snapshot, prefix=f".{os.path.basename(filename)}.", suffix=".part")
    os.write(fd, len(raw).to_bytes(8, "little") + raw)
    os.ftruncate(fd, 8 + len(raw) + offset)
    for r in ranges:
        r.dst += 8 + len(raw)
    return _Shard(filename, _FetchingFile(tmp, fd, header, 8 + len(raw)), ranges)


def _json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON: {err}.") from None


# ---- fetching in the background, reading as the rows arrive ------------------------------------------
class _FetchingFile(_SafetensorsFile):
    """A cached shard being filled: reads wait until their tensor's bytes have arrived.

    Reads go through the descriptor opened at creation, which stays valid when the finished file is moved
    into place.
    """

    def __init__(self, path: str, fd: int, header: dict, data_start: int):
        self.path, self.fd, self.data_start = path, fd, data_start
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.arrived = {name: threading.Event() for name in self.entries}
        self.error: BaseException | None = None
        weakref.finalize(self, os.close, fd)

    def _read_bytes(self, name: str, view: memoryview, offset: int) -> None:
        self.arrived[name].wait()
        if self.error is not None:
            raise OSError(str(self.error)) if not isinstance(self.error, OSError) else self.error
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if not n:
                raise ValueError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file.")
            got += n


class _Fetch(threading.Thread):
    """Fetches a plan's ranges in layer order into the cached files, then moves the snapshot into place."""

    def __init__(self, hub: _Hub, plan: _Plan, snapshot: str, ref_path: str, progress: bool):
        super().__init__(name=f"alps-fetch-{hub.repo_id}", daemon=True)
        self.hub, self.plan, self.snapshot, self.ref_path = hub, plan, snapshot, ref_path
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=plan.qkv_bytes,
                unit="B",
                unit_scale=True,
                desc=f"Fetching q/k/v of {hub.repo_id}",
                leave=True,
            )

    def run(self) -> None:
        try:
            for i, (shard, r) in enumerate(self.plan.order):
                self.hub.read_range(shard.filename, r.src, r.src + r.nbytes, self._sink(shard.file.fd, r))
                if i < len(self.plan.order) - 1:
                    shard.file.arrived[r.name].set()
            # The last tensor is released only once the snapshot is in place: a reader that has read every
            # layer finds the cache complete.
            self._finish()
            self.plan.order[-1][0].file.arrived[self.plan.order[-1][1].name].set()
        except BaseException as err:  # noqa: BLE001 - handed to the reading thread, which raises it
            for shard in self.plan.shards:
                shard.file.error = err
                for event in shard.file.arrived.values():
                    event.set()
                with contextlib.suppress(OSError):
                    os.unlink(shard.file.path)
        finally:
            if self.bar is not None:
                self.bar.close()

    def _sink(self, fd: int, r: _Range) -> Callable[[int, bytes], None]:
        def write(pos: int, chunk: bytes) -> None:
            os.pwrite(fd, chunk, r.dst + pos - r.src)
            if self.bar is not None:
                self.bar.update(len(chunk))

        return write

    def _finish(self) -> None:
        for shard in self.plan.shards:
            # No fsync: os.replace alone makes the file appear whole or not at all to other processes, and
            # flushing gigabytes would cost seconds; after a power loss the ref may need a fresh fetch.
            os.replace(shard.file.path, os.path.join(self.snapshot, shard.filename))
        if self.plan.index is not None:
            _atomic_write(os.path.join(self.snapshot, SAFE_INDEX), json.dumps(self.plan.index, indent=1).encode())
        os.makedirs(os.path.dirname(self.ref_path), exist_ok=True)
        _atomic_write(self.ref_path, self.hub.commit.encode())  # last: marks the snapshot complete


def _atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
