"""tests/gpu/gpu_check.py: exits cleanly without CUDA, and every section's code path runs on the CPU (tiny)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "gpu" / "gpu_check.py"


def test_without_cuda_it_says_so_and_exits_zero():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CUDA is not available" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run is for machines without a GPU")
@pytest.mark.slow
def test_every_section_runs_on_cpu_with_tiny_models(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    argv = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--output-dir", str(tmp_path)]
    code = gpu_check.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "FAILED" not in out
    report = (tmp_path / "gpu_check.md").read_text()
    for label, _, _ in gpu_check.VARIANTS:
        assert f"| {label} |" in report
    assert report.count("| True | ok |") == 4  # the four ALPS variants kept every unselected row exact
    assert "4-bit NF4 delta training: ok" in report
