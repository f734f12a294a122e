"""`alps-localize` end to end, its refusals of bad input, and the benchmark script's --tiny mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from localize_helpers import copy_model, perturb_query_heads
from safetensors.torch import load_file, save_file

from alps_trl.cli.localize import THREAD_VARIABLES, main
from alps_trl.localization.scoring import cuda_impossible
from alps_trl.localization.selection import HeadSelection, HeadSelectionError
from alps_trl.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = tiny_model("llama", seed=0)
    task = copy_model(base)
    perturb_query_heads(task, [(0, 3), (1, 6)])
    base.save_pretrained(root / "base")
    task.save_pretrained(root / "task", max_shard_size="80KB")
    return root


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_cli_end_to_end_writes_json_and_png(ckpts, tmp_path):
    out, png = tmp_path / "heads.json", tmp_path / "heads.png"
    cmd = [sys.executable, "-m", "alps_trl.cli.localize", str(ckpts / "base"), str(ckpts / "task")]
    cmd += ["--ratio", "0.125", "--output", str(out), "--heatmap", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    sel = HeadSelection.load(out)
    assert sel.heads == [(0, 3), (1, 6)] and sel.strategy == "top_k" and sel.metric == "pad"
    assert sel.provenance["base"] == str(ckpts / "base")
    assert png.read_bytes()[:8] == PNG_MAGIC
    # The summary: selected count, per-layer counts, top heads, score stats, trainable q/k/v weights.
    for text in ("2/16 heads selected", "per layer: L0:1 L1:1", "top heads: (", "scores: min", "trainable q/k/v"):
        assert text in proc.stdout, text
    assert "Scoring heads" in proc.stderr  # tqdm progress over layers


NO_TORCH = r"""
import sys
from alps_trl.cli.localize import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "trl", "scipy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("metric", ["pad", "js"])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_cli_on_safetensors_cpu_never_imports_torch(ckpts, tmp_path, metric, device):
    # numpy does the math on CPU: the checkpoint (sharded or not) is read and scored without torch.
    if device is None and not cuda_impossible():
        pytest.skip("the default device may be CUDA here: torch is rightly asked")
    out, png = tmp_path / "heads.json", tmp_path / "heads.png"
    argv = [str(ckpts / "base"), str(ckpts / "task"), "--ratio", "0.125", "--metric", metric, "-o", str(out)]
    argv += ["--heatmap", str(png), "--threads", "1"] + ([] if device is None else ["--device", device])
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout
    sel = HeadSelection.load(out)
    assert sel.heads == [(0, 3), (1, 6)] and sel.metric == metric
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_bad_input_is_one_clear_line_without_traceback(ckpts, tmp_path):
    cmd = [sys.executable, "-m", "alps_trl.cli.localize", str(ckpts / "base"), str(tmp_path / "nothing-here")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("alps-localize: error:") and "nothing-here" in proc.stderr


def _run(argv, capsys):
    """Call the CLI in-process (fast) and return (exit code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2", "nan"])
def test_cli_ratio_outside_unit_interval(ratio, ckpts, tmp_path, capsys):
    code, err = _run(
        [str(ckpts / "base"), str(ckpts / "task"), "--ratio", ratio, "-o", str(tmp_path / "h.json")], capsys
    )
    assert code != 0 and "ratio must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h.json").exists()


def test_cli_thread_cap_is_undone_when_it_returns(ckpts, tmp_path, capsys, monkeypatch):
    for var in THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    for extra in ([], ["--threads", "1"]):
        code, err = _run(
            [str(ckpts / "base"), str(ckpts / "task"), "-o", str(tmp_path / "h.json"), "-q", *extra], capsys
        )
        assert code == 0, err
        assert torch.get_num_threads() == before and not any(var in os.environ for var in THREAD_VARIABLES)
    code, err = _run([str(ckpts / "base"), str(ckpts / "task"), "--threads", "0"], capsys)
    assert code == 2 and "--threads must be >= 1" in err


def test_cli_ratio_edge_selects_six_of_sixty(tmp_path, capsys):
    dims = dict(num_hidden_layers=3, num_attention_heads=20, num_key_value_heads=5, hidden_size=40, head_dim=2)
    tiny_model("llama", seed=0, **dims).save_pretrained(tmp_path / "b")
    tiny_model("llama", seed=1, **dims).save_pretrained(tmp_path / "t")
    code, err = _run([str(tmp_path / "b"), str(tmp_path / "t"), "-o", str(tmp_path / "h.json"), "-q"], capsys)
    assert code == 0, err
    assert len(HeadSelection.load(tmp_path / "h.json").heads) == 6


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_cli_refuses_bad_checkpoints(ckpts, tmp_path, capsys):
    base = str(ckpts / "base")
    out = ["-o", str(tmp_path / "h.json"), "-q"]

    no_config = _copy_ckpt(ckpts / "base", tmp_path / "no_config")
    os.remove(no_config / "config.json")
    code, err = _run([base, str(no_config), *out], capsys)
    assert code == 1 and "No config.json" in err

    no_weights = _copy_ckpt(ckpts / "base", tmp_path / "no_weights")
    os.remove(no_weights / "model.safetensors")
    code, err = _run([base, str(no_weights), *out], capsys)
    assert code == 1 and "No model weights" in err

    missing = _copy_ckpt(ckpts / "base", tmp_path / "missing_k")
    state = load_file(missing / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, missing / "model.safetensors")
    code, err = _run([base, str(missing), *out], capsys)
    assert code == 1 and "model.layers.1.self_attn.k_proj.weight" in err

    unsupported = _copy_ckpt(ckpts / "base", tmp_path / "unsupported")
    cfg = json.loads((unsupported / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (unsupported / "config.json").write_text(json.dumps(cfg))
    code, err = _run([base, str(unsupported), *out], capsys)
    assert code == 1 and "'falcon' is not supported" in err and "llama" in err and "qwen2" in err

    other_arch = tmp_path / "qwen2"
    tiny_model("qwen2", seed=0).save_pretrained(other_arch)
    code, err = _run([base, str(other_arch), *out], capsys)
    assert code == 1 and "different architectures" in err

    other_shape = tmp_path / "mha"
    tiny_model("llama", seed=0, num_key_value_heads=8).save_pretrained(other_shape)
    code, err = _run([base, str(other_shape), *out], capsys)
    assert code == 1 and "model.layers.0.self_attn.k_proj.weight" in err and "[16, 64]" in err
    assert not (tmp_path / "h.json").exists()


def test_cli_random_strategy_and_device_flag(ckpts, tmp_path, capsys):
    out = tmp_path / "h.json"
    argv = [str(ckpts / "base"), str(ckpts / "task"), "--strategy", "layer_consistent", "--seed", "5"]
    code, err = _run([*argv, "--ratio", "0.25", "--device", "cpu", "-o", str(out), "-q"], capsys)
    assert code == 0, err
    sel = HeadSelection.load(out)
    assert sel.strategy == "layer_consistent" and sel.scores is None and len(sel.heads) == 4
    if not torch.cuda.is_available():
        code, err = _run([*argv, "--device", "cuda", "-o", str(out), "-q"], capsys)
        assert code == 1 and "CUDA is not available" in err


def test_heads_file_errors(ckpts, tmp_path, capsys):
    good = tmp_path / "good.json"
    code, err = _run([str(ckpts / "base"), str(ckpts / "task"), "-o", str(good), "-q"], capsys)
    assert code == 0, err
    data = json.loads(good.read_text())

    malformed = tmp_path / "malformed.json"
    malformed.write_text(good.read_text()[:50])
    with pytest.raises(HeadSelectionError, match="not valid JSON"):
        HeadSelection.load(malformed)

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"heads": [[0, 1]], "model": "something else"}))
    with pytest.raises(HeadSelectionError, match="is not an ALPS head selection"):
        HeadSelection.load(foreign)

    version = tmp_path / "version.json"
    version.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(HeadSelectionError, match="format_version 99"):
        HeadSelection.load(version)

    sel = HeadSelection.load(good)
    with pytest.raises(HeadSelectionError, match="num_kv_heads=2, but the model has num_kv_heads=8"):
        sel.check_compatible(tiny_model("llama", num_key_value_heads=8))
    with pytest.raises(HeadSelectionError, match="num_layers=2, but the model has num_layers=3"):
        sel.check_compatible(tiny_model("llama", num_hidden_layers=3).config)


def test_benchmark_script_tiny(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.cost.localization", "--tiny", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "alps-localize" in proc.stdout and "naive (HF load + scipy)" in proc.stdout
    assert "== planted heads: True" in proc.stdout
    assert "top-10% sets identical: True" in proc.stdout
