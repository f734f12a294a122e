"""Kill and resume as separate processes: a job SIGKILLed at a chosen point (inside a training step, half-way
through writing a checkpoint's optimizer state, its alps_heads.json or its alps_delta.safetensors)
and resumed with the same command plus ``--resume_from_checkpoint`` as users find it
(`transformers.trainer_utils.get_last_checkpoint`, which can name the half-written checkpoint) ends with the
uninterrupted run's weights, bit for bit, as plain TRL does from its last complete checkpoint; the unselected q/k/v
rows stay the base's, the selection is the uninterrupted run's, and the complete checkpoints written before the
kill are untouched.

The kills come from tests/kill_points.py (deterministic points, no hook in the package).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import ACCELERATE_CLI, CONFIGS, REPO, child_env, free_port
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from alps_trl.localization.selection import HeadSelection
from alps_trl.trainers import checkpoints

pytestmark = pytest.mark.slow

KILL = str(REPO / "tests" / "kill_points.py")
JOB = str(REPO / "tests" / "kill_resume_job.py")
RECIPE = str(REPO / "recipes" / "sft_alps.py")
# The toy SFT recipe, shortened: 12 steps, a checkpoint every 4, no evaluation.
RECIPE_ARGS = ["--config", str(REPO / "recipes" / "demo" / "toy_sft.yaml"), "--max_steps", "12", "--save_strategy",
               "steps", "--save_steps", "4", "--eval_before_and_after", "false", "--alps_probe_steps", "1",
               "--logging_steps", "4", "--disable_tqdm", "true"]  # fmt: skip
SIGKILL = -9


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def accelerate(config: str) -> list[str]:
    """An `accelerate launch` prefix for 2 CPU ranks with one of the repo's configs (a fresh port each call)."""
    return [*ACCELERATE_CLI, "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2",
            "--main_process_port", str(free_port()), "--mixed_precision", "no"]  # fmt: skip


def _job(spec: str, out: Path, *args: str, launcher: str | None = None, env=None) -> subprocess.CompletedProcess:
    """Run the recipe (args starting with "recipe") or tests/kill_resume_job.py under tests/kill_points.py `spec`;
    `launcher`: an accelerate config name for 2 processes, else one plain process."""
    script = [RECIPE, *RECIPE_ARGS, "--output_dir", str(out)] if args[:1] == ("recipe",) else [JOB, "--out", str(out)]
    extra = list(args[1:]) if args[:1] == ("recipe",) else list(args)
    prefix = accelerate(launcher) if launcher else [sys.executable]
    return _run([*prefix, KILL, spec, *script, *extra], env=env, timeout=600)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    final = out / "final" if (out / "final").is_dir() else out
    return load_file(final / "model.safetensors")


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def kill_and_resume(spec: str, out: Path, *args: str, launcher: str | None = None) -> dict:
    """Kill a job at `spec`, resume it from what `get_last_checkpoint` finds; what happened, for the assertions."""
    killed = _job(spec, out, *args, launcher=launcher)
    assert killed.returncode != 0, f"the kill point {spec} was never reached:\n{killed.stderr[-3000:]}"
    if (out / "alps_heads.json").exists():  # the run's own selection file is never left cut short
        HeadSelection.load(out / "alps_heads.json")
    complete = {p: _digest(p) for p in out.glob("checkpoint-*") if checkpoints.checkpoint_problem(str(p)) is None}
    broken = [p.name for p in out.glob("checkpoint-*") if p not in complete]
    found = get_last_checkpoint(str(out))
    flag = "--resume_from_checkpoint" if args[:1] == ("recipe",) else "--resume"
    resumed = _job("none", out, *args, flag, found, launcher=launcher)
    assert resumed.returncode == 0, f"resume from {found} failed:\n{resumed.stderr[-4000:]}"
    for path, digest in complete.items():  # the complete checkpoints the kill left are untouched
        assert path.is_dir() and {k: v for k, v in _digest(path).items() if k in digest} == digest, path
    return {"found": found, "broken": broken, "log": resumed.stderr}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs, one per setup, run once."""
    made: dict[tuple, Path] = {}

    def get(*args: str, launcher: str | None = None) -> Path:
        key = (*args, launcher)
        if key not in made:
            out = tmp_path_factory.mktemp("reference")
            proc = _job("none", out, *args, launcher=launcher)
            assert proc.returncode == 0, proc.stderr[-4000:]
            made[key] = out
        return made[key]

    return get


def _assert_alps_run(out: Path, reference: Path, base: dict[str, torch.Tensor] | None = None) -> None:
    final = out / "final" if (out / "final").is_dir() else out
    selection = HeadSelection.load(final / "alps_heads.json")
    assert selection == HeadSelection.load(reference / "alps_heads.json")
    difference = _max_difference(_final_weights(out), _final_weights(reference))
    assert difference == 0.0, f"final weights differ from the uninterrupted run's by {difference}"
    if base is not None:
        from trainer_helpers import selected_row_mask, tiny_model

        model = tiny_model("llama")
        weights = _final_weights(out)
        for name, old in base.items():
            frozen = ~selected_row_mask(model, selection, name)
            assert torch.equal(weights[name][frozen], old[frozen]), name


def _tiny_base_qkv() -> dict[str, torch.Tensor]:
    from trainer_helpers import qkv_snapshot, tiny_model

    return qkv_snapshot(tiny_model("llama"))


@pytest.mark.parametrize(
    ("mode", "spec"),
    [
        ("mask", "step:13"),  # inside optimizer step 7 (2 micro-batches per step), between checkpoints 4 and 8
        ("mask", "write:checkpoint-8/optimizer.pt"),  # during the save of checkpoint-8
        ("delta", "write:*checkpoint-8/*alps_heads.json*"),  # globs: the files are written under temporary names
        ("delta", "write:*checkpoint-8/*alps_delta*"),
    ],
)
def test_recipe_killed_and_resumed_matches_the_uninterrupted_run(mode, spec, tmp_path, references):
    args = ("recipe", "--alps_mode", mode, "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "8")
    reference = references(*args)
    out = tmp_path / "run"
    result = kill_and_resume(spec, out, *args)
    if spec.startswith("write:"):
        assert result["broken"] == ["checkpoint-8"] and result["found"].endswith("checkpoint-8")
        assert "resuming from" in result["log"] and (out / "incomplete-checkpoint-8").is_dir()
    _assert_alps_run(out, reference)


def test_plain_trl_killed_and_resumed_is_the_reference(tmp_path, references):
    """The tolerance ALPS is held to: plain TRL's SFTTrainer killed inside a step and resumed from its last complete
    checkpoint ends with its uninterrupted run's weights bit for bit (measured), so ALPS must too (every test here
    asserts a difference of exactly 0)."""
    args = ("--kind", "sft", "--trainer", "plain")
    reference = references(*args)
    out = tmp_path / "plain"
    assert _job("step:7", out, *args).returncode == SIGKILL
    resume = checkpoints.last_complete_checkpoint(str(out))
    assert _job("none", out, *args, "--resume", resume).returncode == 0
    difference = _max_difference(_final_weights(out), _final_weights(reference))
    print(f"plain TRL SFT killed inside a step: final weights vs uninterrupted differ by {difference}")
    assert difference == 0.0


@pytest.mark.parametrize(
    ("kind", "mode", "spec"),
    [
        ("sft", "mask", "step:7"),  # inside optimizer step 4 (2 micro-batches a step), after checkpoint-2
        ("dpo", "delta", "write:*checkpoint-4/*alps_heads.json*"),
        ("grpo", "mask", "step:5"),
    ],
)
def test_trainers_killed_and_resumed_match_the_uninterrupted_run(kind, mode, spec, tmp_path, references):
    """SFT, DPO and GRPO on a tiny model, resumed from what get_last_checkpoint finds: the uninterrupted run's
    weights bit for bit, the base's unselected q/k/v rows, the same selection."""
    args = ("--kind", kind, "--trainer", "alps", "--mode", mode)
    reference = references(*args)
    out = tmp_path / "alps"
    kill_and_resume(spec, out, *args)
    _assert_alps_run(out, reference / "final", base=_tiny_base_qkv())


@pytest.mark.distributed
def test_ddp_job_killed_during_a_save_resumes_exactly(tmp_path, references):
    """2-process DDP (gloo): rank 0 is killed half-way through checkpoint-4's optimizer state; the launcher takes the
    job down, and the resumed job ends with the uninterrupted job's weights."""
    args = ("--kind", "sft", "--trainer", "alps", "--mode", "delta")
    reference = references(*args, launcher="multi_gpu.yaml")
    out = tmp_path / "run"
    result = kill_and_resume("write:checkpoint-4/optimizer.pt", out, *args, launcher="multi_gpu.yaml")
    assert result["broken"] == ["checkpoint-4"]
    _assert_alps_run(out, reference / "final")
    shutil.rmtree(out)


def test_kill_points_reach_the_disk_half_written(tmp_path):
    """The harness itself: a write kill leaves a cut-short file, as a real kill mid-write does."""
    target = tmp_path / "victim.json"
    code = f"import json; json.dump({{'x': list(range(1000))}}, open({str(target)!r}, 'w'))"
    script = tmp_path / "write.py"
    script.write_text(code)
    proc = _run([sys.executable, KILL, "write:victim.json", str(script)], env={**os.environ})
    assert proc.returncode == SIGKILL
    assert 0 < target.stat().st_size < len(str({"x": list(range(1000))}))


RANK_DEATHS = [
    ("multi_gpu.yaml", "localization", "call:alps_trl.trainers.head_sources:share_selection"),
    ("multi_gpu.yaml", "training", "step:5"),
    ("multi_gpu.yaml", "save", "call:transformers.trainer:Trainer._save_checkpoint@2"),
    ("fsdp2.yaml", "training", "step:5"),
    ("fsdp2.yaml", "save", "call:transformers.trainer:Trainer._save_checkpoint@2"),
]
RANK_DEATH_BOUND_S = 60
# A rank that hangs with its connections open (SIGSTOP: a frozen or unreachable node) is found by the collective
# timeout (TrainingArguments.ddp_timeout on GPUs, 1800 s by default): the job must end within it plus a grace.
HANG_TIMEOUT_S = 20


@pytest.mark.distributed
@pytest.mark.parametrize(("config", "when", "spec"), RANK_DEATHS, ids=[f"{c[:-5]}-{w}" for c, w, _ in RANK_DEATHS])
def test_a_dead_rank_fails_the_job_fast_and_the_job_resumes(config, when, spec, tmp_path):
    """Rank 1 of 2 is SIGKILLed; the launcher takes the whole job down within RANK_DEATH_BOUND_S (gloo reports the
    closed connection to rank 0 at once, torchrun's agent stops the rest), naming the dead rank; the job then resumes
    from its last complete checkpoint."""
    import time

    args = ["--kind", "sft", "--trainer", "alps", "--mode", "delta", *(["--fsdp"] if config == "fsdp2.yaml" else [])]
    out, stamp = tmp_path / "run", tmp_path / "died_at"
    proc = _job(spec, out, *args, launcher=config, env=child_env(KILL_RANK="1", KILL_STAMP=str(stamp)))
    ended = time.time()
    assert proc.returncode != 0 and stamp.is_file(), proc.stderr[-3000:]
    took = ended - float(stamp.read_text())
    log = proc.stdout + proc.stderr
    assert "rank: 1" in log or "local_rank: 1" in log, log[-3000:]
    assert took < RANK_DEATH_BOUND_S, f"the job took {took:.1f} s to fail after rank 1 died"
    print(f"rank death during {when} ({config}): job exited {proc.returncode} {took:.1f} s after the kill")
    if when == "localization":
        return
    found = checkpoints.last_complete_checkpoint(str(out))
    assert found is not None
    resumed = _job("none", out, *args, "--resume", get_last_checkpoint(str(out)), launcher=config)
    assert resumed.returncode == 0, resumed.stderr[-4000:]


@pytest.mark.distributed
def test_a_hung_rank_fails_the_job_within_the_collective_timeout(tmp_path):
    """Rank 1 freezes (SIGSTOP) in training: rank 0's next collective times out after the process group's timeout,
    and the launcher ends the job (the frozen rank too) within RANK_DEATH_BOUND_S of that."""
    import time

    args = ["--kind", "sft", "--trainer", "alps", "--mode", "delta", "--collective-timeout", str(HANG_TIMEOUT_S)]
    out, stamp = tmp_path / "run", tmp_path / "died_at"
    env = child_env(KILL_RANK="1", KILL_STAMP=str(stamp), KILL_SIGNAL="STOP")
    proc = _job("step:5", out, *args, launcher="multi_gpu.yaml", env=env)
    took = time.time() - float(stamp.read_text())
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert HANG_TIMEOUT_S <= took < HANG_TIMEOUT_S + RANK_DEATH_BOUND_S, took
    print(f"hung rank during training: job exited {proc.returncode} {took:.1f} s after rank 1 froze")
