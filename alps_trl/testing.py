"""Tiny models and a locally trained tokenizer, for the offline demo, tests and benchmarks.

Nothing here touches the network: configs are built in code, the tokenizer is a byte-level BPE
trained with the `tokenizers` library on text given by the caller.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# Chat template in the style of the common ones: role headers, eos after each turn; the
# {% generation %} markers let TRL's assistant_only_loss find the assistant tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Public so that scripts building the same tiny shape (e.g. tests/gpu/gpu_check.py) need not repeat it.
TINY_DIMS: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_config(arch: str = "llama", **overrides: Any):
    """A small config of `arch` ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3").

    Defaults: d=64, 2 layers, 8 query heads, 2 kv heads (GQA), head_dim 8, vocab 512.
    """
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
        "phi3": transformers.Phi3Config,
    }
    if arch not in classes:
        raise ValueError(f"No tiny config for {arch!r}; choose one of {sorted(classes)}.")
    dims = dict(TINY_DIMS)
    if arch in ("gemma", "qwen3"):
        dims["head_dim"] = dims["hidden_size"] // dims["num_attention_heads"]
    # Token ids match `build_tokenizer`: <|pad|> = 0, <|endoftext|> = 1.
    dims.update(pad_token_id=0, bos_token_id=1, eos_token_id=1)
    dims.update(overrides)
    return classes[arch](**dims)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny causal LM (float32, CPU, sdpa attention), deterministic in `seed`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a PreTrainedTokenizerFast.

    The result has pad/eos tokens and `CHAT_TEMPLATE`, so TRL's conversational datasets work.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


@dataclass
class Push:
    """One weight push to vLLM: how many tensors and bytes it sent, and their names in order."""

    tensors: int = 0
    bytes: int = 0
    names: list[str] = field(default_factory=list)


class _Recorder:
    """What a vLLM engine would hold: ``held`` (name -> tensor, updated by every push, pre-fill it to stand for the
    weights vLLM started with), ``pushes`` (one `Push` per sync, closed by TRL's ``reset_prefix_cache``)."""

    def __init__(self) -> None:
        self.held: dict[str, torch.Tensor] = {}
        self.pushes: list[Push] = []
        self._open = Push()

    def _receive(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().clone()
        self.held[name] = tensor
        self._open.tensors += 1
        self._open.bytes += tensor.numel() * tensor.element_size()
        self._open.names.append(name)

    @property
    def pushed(self) -> dict[str, torch.Tensor]:
        """The tensors of the last push."""
        return {name: self.held[name] for name in self.pushes[-1].names} if self.pushes else {}

    def reset_prefix_cache(self) -> None:
        self.pushes.append(self._open)
        self._open = Push()


class RecordingVLLMClient(_Recorder):
    """Stands in for TRL's `VLLMClient` (server mode): records what `update_named_params` receives."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata: list | None = None

    def update_named_params(self, metadata: list, named_params) -> None:
        self.metadata = metadata
        for name, tensor in named_params:
            self._receive(name, tensor)


class RecordingVLLM(_Recorder):
    """Stands in for ``vllm.LLM`` (colocate mode): the model runner's ``load_weights`` receives (name, tensor)."""

    def __init__(self) -> None:
        super().__init__()
        runner = type("Runner", (), {"model": type("Model", (), {"load_weights": self._load})()})()
        worker = type("Worker", (), {"model_runner": runner})()
        executor = type("Executor", (), {"driver_worker": worker})()
        self.llm_engine = type("Engine", (), {"model_executor": executor})()

    def _load(self, weights) -> None:
        for name, tensor in weights:
            self._receive(name, tensor)


def recording_vllm_generation(trainer: Any, client: Any, mode: str = "server") -> Any:
    """TRL's own `VLLMGeneration` (its `sync_weights` and parameter iteration) for `trainer`'s policy, with the
    vLLM side replaced by `client` (server mode: a `RecordingVLLMClient`; colocate: a `RecordingVLLM`), and ALPS's
    effective-weights push installed as the trainer installs it."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    from alps_trl.trainers.vllm_sync import push_effective_weights

    gen = object.__new__(VLLMGeneration)
    gen.model, gen.accelerator, gen.mode = trainer.model, trainer.accelerator, mode
    gen._dist, gen._weight_metadata, gen.enable_sleep_mode = DistributedBackend(trainer.accelerator), None, False
    if mode == "server":
        gen.vllm_client = client
    else:
        gen.llm = client
    push_effective_weights(gen, trainer)
    return gen


class LoopbackHub:
    """A Hugging Face hub stand-in on 127.0.0.1 that serves local checkpoint directories as model repositories.

    It answers the requests huggingface_hub makes: ``GET /api/models/{repo}/revision/{rev}`` (commit and file
    list, as `HfApi.model_info` reads them) and ``GET``/``HEAD /{repo}/resolve/{rev}/{file}`` with byte ranges,
    ``X-Repo-Commit`` and ``ETag``; errors carry the hub's ``X-Error-Code`` (RepoNotFound, EntryNotFound,
    GatedRepo). It counts the response body bytes and the requests, and can drop a connection in the middle of
    a range. Use as a context manager; `url` is the value for ``HF_ENDPOINT``.

    Attributes:
        bytes_served: body bytes sent so far (every response, errors included).
        requests: (method, path, Range header or None) of every request, in order.
        drop_after: when set, the next ranged GET of more bytes is cut off after this many body bytes (once).
    """

    def __init__(self) -> None:
        self._repos: dict[str, tuple[str, str]] = {}
        self._gated: dict[str, str] = {}
        self._lock = threading.Lock()
        self.bytes_served = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.drop_after: int | None = None
        self._server: Any = None

    def add_repo(self, repo_id: str, folder: str, gated_token: str | None = None) -> str:
        """Serve the files of `folder` as `repo_id`; with `gated_token`, files need ``Bearer <gated_token>`` (no
        token: 401, another token: 403, both with X-Error-Code GatedRepo, as the hub answers for a gated model).

        Returns the repository's commit sha (derived from the repo id and the file names and sizes).
        """
        import hashlib
        import os

        listing = sorted((f, os.path.getsize(os.path.join(folder, f))) for f in os.listdir(folder))
        commit = hashlib.sha1(repr((repo_id, listing)).encode()).hexdigest()
        self._repos[repo_id] = (folder, commit)
        if gated_token is not None:
            self._gated[repo_id] = gated_token
        return commit

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reset_counts(self) -> None:
        with self._lock:
            self.bytes_served, self.requests = 0, []

    def __enter__(self) -> LoopbackHub:
        from http.server import ThreadingHTTPServer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _hub_handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_served += nbytes


def _hub_handler(hub: LoopbackHub) -> type:
    import json
    import os
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import unquote, urlsplit

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: tests read hub.requests instead
            pass

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            with hub._lock:
                hub.requests.append((self.command, path, self.headers.get("Range")))
            if path.startswith("/api/models/"):
                repo_id, _, revision = path[len("/api/models/") :].partition("/revision/")
                if repo_id not in hub._repos:
                    return self._error(404, "RepoNotFound", head)
                folder, commit = hub._repos[repo_id]
                info = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit,
                    "private": False,
                    "gated": "manual" if repo_id in hub._gated else False,
                    "siblings": [{"rfilename": f} for f in sorted(os.listdir(folder))],
                }
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
            repo_id, sep, rest = path.lstrip("/").partition("/resolve/")
            if not sep or repo_id not in hub._repos:
                return self._error(404, "RepoNotFound", head)
            folder, commit = hub._repos[repo_id]
            revision, _, filename = rest.partition("/")
            if revision not in (commit, "main"):
                return self._error(404, "RevisionNotFound", head)
            token, auth = hub._gated.get(repo_id), self.headers.get("Authorization")
            if token is not None and auth != f"Bearer {token}":  # as the hub: 401 without a token, 403 with another
                return self._error(403 if auth else 401, "GatedRepo", head)
            file_path = os.path.join(folder, filename)
            if not filename or not os.path.isfile(file_path):
                return self._error(404, "EntryNotFound", head)
            self._send_file(file_path, commit, head)

        def _error(self, status: int, code: str, head: bool) -> None:
            self._send(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code}, head)

        def _send(self, status: int, body: bytes, headers: dict, head: bool) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
                hub._count(len(body))

        def _send_file(self, file_path: str, commit: str, head: bool) -> None:
            size = os.path.getsize(file_path)
            start, stop, status = 0, size, 200
            ranged = self.headers.get("Range")
            if ranged:
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start, stop, status = int(first), min(size, int(last) + 1 if last else size), 206
                if start >= size:  # as HTTP servers answer a range that starts past the end
                    return self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head)
            self.send_response(status)
            self.send_header("Content-Length", str(stop - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{commit[:16]}-{size}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
            self.end_headers()
            if head:
                return
            count = stop - start
            drop = None
            with hub._lock:
                if ranged and hub.drop_after is not None and count > hub.drop_after:
                    drop, hub.drop_after = hub.drop_after, None
            if drop is not None:
                count = min(count, drop)
            with open(file_path, "rb") as f:
                sent = self.connection.sendfile(f, start, count)
            hub._count(sent)
            if drop is not None:
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler
