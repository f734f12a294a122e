"""The offline demo: `accelerate launch recipes/sft_alps.py` (the README's main job) and the DPO demo, run for real.

The SFT demo runs exactly as the README's Quick start runs it (plus --output_dir), in a subprocess, single
process on a CPU machine; it must finish in under 3 minutes and its eval loss must clearly go down.
"""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from recipe_helpers import REPO, load_script, parse_script_args, run_env

from alps_trl.selection import HeadSelection

TIME_LIMIT_S = 180
DEMO_HEADS = 4  # ceil(0.1 * 4 layers * 8 heads)
EVAL_LOSS = re.compile(r"^eval_loss: before ([0-9.]+) -> after ([0-9.]+)", re.MULTILINE)


def accelerate_launch() -> list[str]:
    exe = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [exe, "launch"] if os.path.exists(exe) else [sys.executable, "-m", "accelerate.commands.launch"]


def run_recipe(argv: list[str], tmp_path, timeout: int = 600) -> tuple[str, float]:
    """Run a recipe command in the repo root; returns (combined output, seconds). Fails with the output's tail."""
    env = run_env()
    # No user-level `accelerate config` may change what a bare `accelerate launch` does here.
    env["HF_HOME"] = str(tmp_path / "hf_home")
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output, seconds


def eval_losses(output: str) -> tuple[float, float]:
    match = EVAL_LOSS.search(output)
    assert match, f"no 'eval_loss: before ... -> after ...' line in:\n{output[-3000:]}"
    return float(match.group(1)), float(match.group(2))


@pytest.fixture(scope="module")
def sft_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_demo")
    out = tmp / "out"
    output, seconds = run_recipe(accelerate_launch() + ["recipes/sft_alps.py", "--output_dir", str(out)], tmp)
    print(f"\nSFT demo (accelerate launch recipes/sft_alps.py): {seconds:.1f} s wall")
    return out, output, seconds


def test_sft_demo_accelerate_launch(sft_demo):
    """README Quick start: `accelerate launch recipes/sft_alps.py` trains, localizes, reports and saves."""
    out, output, seconds = sft_demo
    assert seconds < TIME_LIMIT_S, f"the demo took {seconds:.1f} s (limit {TIME_LIMIT_S} s)"
    before, after = eval_losses(output)
    assert after < 0.5 * before, f"eval loss did not go down clearly: {before} -> {after}"
    assert "Processes: 1 (NO" in output, "a bare `accelerate launch` on this machine should run one process"
    assert f"Selected heads ({DEMO_HEADS}/32):" in output
    assert "% of attention q/k/v" in output and "% of the model" in output
    for name in ("model.safetensors", "config.json", "tokenizer.json", "alps_heads.json", "alps_heads.png"):
        assert (out / name).is_file(), f"{name} missing from {out}"
    assert f"Model: {out}" in output
    assert f"Head selection: {out / 'alps_heads.json'}" in output and f"Heatmap: {out / 'alps_heads.png'}" in output
    selection = HeadSelection.load(out / "alps_heads.json")
    assert len(selection.heads) == DEMO_HEADS and selection.scores is not None
    assert "probe" in str(selection.provenance.get("task", ""))
    assert "it/s]" in output or "s/it]" in output, "no progress bars in the demo output"


def test_dpo_demo(tmp_path):
    """`accelerate launch recipes/dpo_alps.py` (shortened by CLI overrides): the DPO loss goes down from log 2."""
    out = tmp_path / "out"
    argv = accelerate_launch() + ["recipes/dpo_alps.py", "--output_dir", str(out), "--max_steps", "16"]
    output, seconds = run_recipe(argv, tmp_path)
    print(f"\nDPO demo (16 steps): {seconds:.1f} s wall")
    before, after = eval_losses(output)
    assert before == pytest.approx(0.6931, abs=1e-3)  # policy == reference before training
    assert after < before
    assert (out / "model.safetensors").is_file() and (out / "alps_heads.json").is_file()


def test_reuse_saved_heads_skips_localization(sft_demo, tmp_path):
    """README: `python recipes/sft_alps.py --alps_heads outputs/sft_alps_demo/alps_heads.json ...` reuses them."""
    demo_out, _, _ = sft_demo
    heads = demo_out / "alps_heads.json"
    out = tmp_path / "reuse"
    args = ["--alps_heads", str(heads), "--output_dir", str(out), "--max_steps", "3", "--eval_before_and_after", "0"]
    script_args, training_args, model_args = parse_script_args("recipes/sft_alps.py", args)
    load_script("recipes/sft_alps.py").main(script_args, training_args, model_args)
    assert HeadSelection.load(out / "alps_heads.json") == HeadSelection.load(heads)
    assert (out / "model.safetensors").is_file()


def test_localize_only_writes_heads_and_stops(tmp_path):
    out = tmp_path / "heads"
    args = ["--localize_only", "true", "--alps_probe_steps", "2", "--output_dir", str(out)]
    script_args, training_args, model_args = parse_script_args("recipes/sft_alps.py", args)
    load_script("recipes/sft_alps.py").main(script_args, training_args, model_args)
    assert len(HeadSelection.load(out / "alps_heads.json").heads) == DEMO_HEADS
    assert (out / "alps_heads.png").is_file()
    assert not (out / "model.safetensors").exists()


def test_demo_assets_are_reproducible():
    """The committed demo data, tokenizer and config equal a fresh deterministic build."""
    sys.path.insert(0, os.path.join(REPO, "recipes", "demo"))
    try:
        import build_demo_assets
    finally:
        sys.path.pop(0)
    assert build_demo_assets.main(["--check"]) == 0, build_demo_assets.check()
