"""Tiny models and a locally trained tokenizer, for the offline demo, tests and benchmarks.

Nothing here touches the network: configs are built in code, the tokenizer is a byte-level BPE
trained with the `tokenizers` library on text given by the caller.
"""

from __future__ import annotations

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
