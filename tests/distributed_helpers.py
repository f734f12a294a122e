"""Helpers for the multi-process tests: a tiny base checkpoint, free ports, launching the repo's configs on CPU.

Every launch goes through `accelerate launch` with a config from recipes/accelerate_configs/, with
ACCELERATE_USE_CPU=true so that the ranks pick the CPU and talk over gloo (docs/platform.md: the multi-GPU
launcher is the one that starts several local ranks; `--cpu` would start independent jobs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from recipe_helpers import run_env

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate_configs"
TRAIN_TINY = REPO / "tests" / "distributed" / "train_tiny.py"
LAUNCH_NODE = REPO / "launch" / "launch_node.sh"
ACCELERATE_CLI = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
CORPUS = [
    f"Question: what is {a} plus {b}? Answer: {a + b}. The quick brown fox jumps over the dog."
    for a in range(12)
    for b in range(4)
]


def free_port() -> int:
    """A TCP port nobody listens on right now (fresh per launch: gloo rendezvous ports linger)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_base(path: Path) -> Path:
    """Save the tiny Llama (2 layers, 8 heads, 2 kv heads, d=64), a local tokenizer and two datasets to `path`.

    The datasets live on disk (path/data_sft, path/data_dpo) as they would in a real run: TRL's precomputed DPO
    reference log-probs are cached next to the dataset's files, which every rank must be able to read.
    """
    from datasets import Dataset

    from alps_trl.testing import build_tokenizer, tiny_model

    if not (path / "data_grpo").is_dir():
        tiny_model("llama", seed=0).save_pretrained(path)
        build_tokenizer(CORPUS, vocab_size=512).save_pretrained(path)
        Dataset.from_dict({"text": CORPUS[:32]}).save_to_disk(str(path / "data_sft"))
        Dataset.from_dict(
            {
                "prompt": [f"Question: what is {a} plus 1?" for a in range(16)],
                "chosen": [f" Answer: {a + 1}." for a in range(16)],
                "rejected": [f" Answer: {a + 7}, the fox." for a in range(16)],
            }
        ).save_to_disk(str(path / "data_dpo"))
        Dataset.from_dict(
            {
                "prompt": [f"Question: what is {a} plus 1?" for a in range(16)],
                "solution": [f" {a + 1}" for a in range(16)],
            }
        ).save_to_disk(str(path / "data_grpo"))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """The recipes' offline subprocess environment, plus CPU-only ranks with one thread each."""
    env = run_env()
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    # tests/distributed/train_tiny.py imports distributed_helpers from tests/.
    env["PYTHONPATH"] = str(REPO / "tests") + os.pathsep + env["PYTHONPATH"]
    env.update(extra)
    return env


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: int = 240, check: bool = True):
    """Run `cmd`; on failure (when `check`) raise with the tail of its output."""
    proc = subprocess.run(
        cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if "Error" in line or "error:" in line][:40]
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            + "\n".join(errors)
            + f"\n--- output tail ---\n{output[-4000:]}"
        )
    return proc


def accelerate_launch(
    config: str, num_processes: int, script_args: list[str], *, check: bool = True, timeout: int = 240
) -> subprocess.CompletedProcess:
    """`accelerate launch` of tests/distributed/train_tiny.py with one of the repo's configs, on CPU, in fp32."""
    cmd = [
        *ACCELERATE_CLI,
        "launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        str(TRAIN_TINY),
        *script_args,
    ]
    return run(cmd, check=check, timeout=timeout)


def read_reports(out: Path, scenario: str, world_size: int) -> list[dict]:
    reports = []
    for rank in range(world_size):
        path = out / scenario / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no report for {scenario}"
        reports.append(json.loads(path.read_text()))
    return reports


def assert_run_exact(
    reports: list[dict],
    *,
    world_size: int,
    distributed_type: str,
    fsdp: bool,
    wrapper: str = "DistributedDataParallel",
) -> None:
    """The distributed setup was the one meant, and the ALPS guarantees hold on every rank.

    - world size and distributed type as intended (a silently single-process run fails here);
    - FSDP2: parameters were DTensors; otherwise the model was wrapped in `wrapper` (DDP by default);
    - every unselected q/k/v row bit-identical to the base, every selected row changed (gathered full tensors,
      deltas merged in delta mode); in delta mode the base q/k/v tensors themselves untouched;
    - non-attention weights trained (nothing else frozen), or stayed bit-identical when they were frozen;
    - all ranks end with identical weights (sha256 over every tensor, gathered from all ranks).
    """
    assert len(reports) == world_size
    assert sorted(r["rank"] for r in reports) == list(range(world_size))
    digests = {r["digest"] for r in reports}
    for r in reports:
        assert r["world_size"] == world_size, r
        assert r["distributed_type"] == f"DistributedType.{distributed_type}", r["distributed_type"]
        if fsdp:
            assert r["fsdp_version"] == 2 and r["params_are_dtensors"], r
        else:
            assert r["wrapper"] == wrapper and not r["params_are_dtensors"], r
        for name, row in r["rows"].items():
            assert row["unselected_identical"], f"rank {r['rank']}: unselected rows of {name} changed"
            if row["selected"]:
                assert row["selected_changed"], f"rank {r['rank']}: selected rows of {name} did not change"
        if r["mode"] == "delta":
            assert r["base_qkv_untouched"], f"rank {r['rank']}: delta mode modified the base q/k/v"
        if r["expect_non_attention_trained"]:
            assert r["mlp_changed"], f"rank {r['rank']}: non-attention weights did not train"
        else:
            assert not r["mlp_changed"], f"rank {r['rank']}: frozen non-attention weights changed"
        assert len(r["all_digests"]) == world_size and set(r["all_digests"]) == digests
    assert len(digests) == 1, f"ranks ended with different weights: {digests}"
    assert len({r["fingerprint"] for r in reports}) == 1


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Same digest as tests/distributed/train_tiny.py computes on the ranks."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(str(state[name].dtype).encode())
        h.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
