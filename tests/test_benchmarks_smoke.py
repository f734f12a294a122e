"""End-to-end smoke tests of the benchmarks (pipeline only, not the numbers), and of the accuracy metric they use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(args: list[str], timeout: int) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_reproduce_paper_quick_writes_every_table_and_figure(tmp_path):
    out = _run(["-m", "benchmarks.miniature.reproduce", "--quick", "--output-dir", str(tmp_path)], timeout=170)
    assert "wrote" in out
    report = (tmp_path / "RESULTS.md").read_text()
    for heading in (
        "## Table 1: main comparison",
        "## Table 1b: controls for the selection",
        "## Table 2: ratio ablation",
        "## Table 3: metric ablation",
        "## Table 4: transfer to dataset B",
        "## Table 5: forgetting on the general corpus",
        "### Learning rates (seed 0, validation split only)",
    ):
        assert heading in report, heading
    for row in (
        "| Full |",
        "| w/o attn |",
        "| Random 10% |",
        "| LC 10% |",
        "| ALPS 10% |",
        "| LoRA r=",
        "| Random, ALPS footprint |",
        "| Lowest-scoring 10% |",
        "| ALPS 10%, heads from A |",
    ):
        assert row in report, row
    assert "± " in report and "Command: `python -m benchmarks.miniature.reproduce --quick" in report
    for fig in ("accuracy_vs_ratio.png", "alps_heads_heatmap.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 1000


@pytest.mark.slow
def test_bench_train_quick_reports_every_method(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\nkept text\n")
    out = _run(
        ["-m", "benchmarks.cost.training", "--quick", "--threads", "1", "--update-results", str(results)], timeout=120
    )
    for name in ("| Full |", "| w/o attn |", "| ALPS mask 10% |", "| ALPS delta 10%, rest frozen |", "| LoRA r=8"):
        assert name in out, name
    assert "ALPS mask / Full step time" in out
    text = results.read_text()
    assert "kept text" in text and "<!-- bench_train:start -->" in text and "| ALPS mask 10% |" in text


def _bench_files() -> dict[Path, int]:
    """Non-source files under benchmarks/ and their mtimes: a benchmark run must not write there unless told to."""
    return {
        f: f.stat().st_mtime_ns
        for f in BENCH.rglob("*")
        if f.is_file() and f.suffix != ".py" and "__pycache__" not in f.parts
    }


@pytest.mark.slow
def test_bench_localize_smollm2_quick_agrees_with_naive(tmp_path, smollm2_gguf):
    """Real model, briefly fine-tuned copy: alps-localize (directory and GGUF base) picks the naive path's heads."""
    before = _bench_files()
    out = _run(
        ["-m", "benchmarks.cost.localization", "--model", "smollm2", "--quick", "--workdir", str(tmp_path)],
        timeout=420,
    )
    assert "alps-localize, BASE = .gguf top-10% == alps-localize top-10%: True (27 heads)" in out
    assert "naive (HF load + scipy)" in out
    assert out.count("top-10% sets identical: True (27/27 in common)") == 2, out
    assert (tmp_path / "smollm2-quick" / "task" / "model.safetensors").is_file()
    assert _bench_files() == before


def test_bench_localize_8b_shape_tiny_runs_local_and_over_loopback(tmp_path):
    """The 8B-shaped case on tiny shapes: local (mixed, float64), over the loopback hub, then from the q/k/v cache."""
    before = _bench_files()
    args = ["-m", "benchmarks.cost.localization", "--model", "llama-3.1-8b-shape", "--tiny"]
    out = _run(args + ["--workdir", str(tmp_path), "--cleanup"], timeout=120)
    for label in ("(local, --precision mixed)", "--precision float64 (reference)", "--fetch qkv (loopback hub)"):
        assert f"alps-localize {label}" in out, out
    assert "top-10% (mixed) == top-10% (float64 reference): True (2 heads)" in out
    assert "top-10% (mixed) == planted heads: True" in out
    assert "top-10% (remote, first and second run) == top-10% (local): True" in out
    # 2 models x 2 layers x (8 + 2 * 2 heads of 8 rows) x 64 columns x 2 bytes; the second run asks nothing.
    assert "= the q/k/v bytes of both models (49,152) + " in out and "second run: 0 requests" in out
    assert "targets: local time " in out and "peak RSS " in out and "same top-10% as float64: True" in out
    assert not (tmp_path / "tiny-qkv").exists()  # --cleanup
    assert _bench_files() == before


@pytest.mark.slow
def test_bench_train_smollm2_quick_reports_every_method_and_its_peak_rss(smollm2_gguf):
    before = _bench_files()
    out = _run(["-m", "benchmarks.cost.training", "--model", "smollm2", "--quick"], timeout=420)
    assert "Model: SmolLM2-135M-Instruct" in out and "Per-process peak RSS MB |" in out
    rows = {line.split(" | ")[0].lstrip("| "): line.strip(" |").split(" | ") for line in out.splitlines()}
    names = ("Full", "ALPS mask 10%", "ALPS delta 10%, rest frozen", "LoRA r=8 q/k/v", "LoRA r=128 q/k/v")
    for name in names:
        assert name in rows, name
    assert "w/o attn" not in rows
    peak = {name: float(rows[name][-1].replace(",", "")) for name in names}
    # Full holds ~1.5 GB more gradients and AdamW state than the deltas: a per-process peak must show it.
    assert peak["Full"] > peak["ALPS delta 10%, rest frozen"] + 1000
    assert "ALPS delta / LoRA r=128 q/k/v" in out
    assert _bench_files() == before


def test_teacher_forced_exact_match_equals_greedy_decoding():
    """The reproduction scores exact match in one teacher-forced pass; it must agree with real greedy decoding."""
    from benchmarks.common import finetune_loop as loop
    from benchmarks.miniature import reproduce as rp
    from benchmarks.miniature import tasks as data

    tok = data.CharTokenizer()
    scale = rp.Scale(hidden=32, layers=2, heads=4, kv_heads=2)
    torch.manual_seed(0)
    model = rp.build_model(scale, tok)
    train = data.make_split(data.TASKS["add_a"], "train", 200, seed=0)
    loop.train(loop.prepare(model, loop.Method("full", "full")), data.batches(tok, train, 16, 40, seed=0), 1e-2)
    pairs = data.make_split(data.TASKS["add_a"], "val", 16, seed=0)
    greedy = [_greedy(model, tok, instr, max_new=5) for instr, _ in pairs]
    # Half of the labels are the model's own greedy output (where it stopped), so both outcomes occur.
    mixed = [
        (instr, tok.decode(g) if g is not None and i % 2 == 0 else ans)
        for i, ((instr, ans), g) in enumerate(zip(pairs, greedy))
    ]
    per_pair = [rp.evaluate(model, tok, [p])[0] for p in mixed]
    expected = [float(g is not None and g == tok.encode(ans)) for (_, ans), g in zip(mixed, greedy)]
    assert per_pair == expected
    assert 0 < sum(expected) < len(expected)
    batched, _ = rp.evaluate(model, tok, mixed, chunk=5)
    assert batched == pytest.approx(sum(expected) / len(expected))


def _greedy(model, tok, instruction: str, max_new: int):
    """Greedy decoding token by token (no cache): the ids before eos, or None if no eos within max_new tokens."""
    from benchmarks.miniature import tasks as data

    ids = tok.encode(data.alpaca_prompt(instruction))
    out: list[int] = []
    model.eval()
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                return out
            out.append(nxt)
    return None


@pytest.mark.slow
def test_reproduce_real_quick_paths_write_every_part_and_skip_it_on_rerun(tmp_path, smollm2_gguf):
    """benchmarks.real_model.reproduce --quick (two steps, tiny evaluation) into tmp_path: the head-choice part for one
    arm, and each ablation part's quick path (ratio, metric, transfer, Table 1 setting) with its table; a rerun
    resumes."""
    import json

    before = _bench_files()
    args = [
        *("-m", "benchmarks.real_model.reproduce", "--quick", "--arms", "random", "random_upper"),
        *("--output-dir", str(tmp_path)),
    ]
    out = _run(args, timeout=900)  # a hang guard: ~3 min on 2 idle cores, 3-4x that on a loaded machine
    result = tmp_path / "runs" / "arithmetic" / "random" / "seed0.json"
    data = json.loads(result.read_text())
    assert data["arm"] == "random" and len(data["test"]["correct"]) == 12 and data["from_sweep"], out
    report = (tmp_path / "RESULTS_REAL.md").read_text()
    assert "SmolLM2-135M-Instruct" in report and "| Random | 1/1 |" in report
    assert "| Lowest-10% PAD | 0/1 | missing |" in report  # an arm that did not run shows as missing, not a number

    runs = tmp_path / "ablations"
    for path in (
        "ratio/arithmetic/alps_5%/seed0.json",
        "ratio/arithmetic/importance_5%/seed0.json",
        "metric/arithmetic/pad/seed0.json",
        "metric/arithmetic/kl/seed0.json",
        "metric/arithmetic/cosine/seed0.json",
        "transfer/text/from_arithmetic/seed0.json",
        "transfer/arithmetic/from_text/seed0.json",
        "table1/arithmetic/lc_rest/seed0.json",
        "table1/arithmetic/wo_attn/seed0.json",
        "table1/arithmetic/lora128/seed0.json",
        "table1/times/alps_rest/seed0.json",  # the held-out family's smallest path
        "table1/times/random_rest/seed0.json",
        "table1/times/importance_rest/seed0.json",
    ):
        assert (runs / path).is_file(), f"{path} missing:\n{out[-3000:]}"
    ratio = json.loads((runs / "ratio/arithmetic/alps_5%/seed0.json").read_text())
    assert len(ratio["heads"]) == 14 and not ratio["variant"]["rest_trains"]  # ceil(5% of 270)
    rest = json.loads((runs / "table1/arithmetic/alps_rest/seed0.json").read_text())
    frozen = json.loads((runs / "table1/arithmetic/wo_attn/seed0.json").read_text())
    assert rest["variant"]["rest_trains"] and frozen["trainable"] < rest["trainable"] < 134_515_008
    metric = json.loads((runs / "metric/arithmetic/task_model.json").read_text())
    assert metric["pad_heads_shared_with_head_choice"] == 27  # the retrained task model reproduces ALPS's heads
    ablations = report[report.index("## The paper's ablations") : report.index("## Figures")]
    for table in ("Table 4", "Table 5", "Table 2", "Table 1"):
        assert f"mirrors the paper's {table}" in ablations
    assert "missing" not in ablations, ablations  # every quick row ran
    assert (tmp_path / "figures" / "ratio_curve.png").is_file()
    upper = json.loads((tmp_path / "runs" / "times" / "random_upper" / "seed0.json").read_text())
    importance = json.loads((tmp_path / "selections" / "times" / "importance_seed0.json").read_text())
    median = sorted(x for row in importance["scores"] for x in row)[135]
    assert len(upper["heads"]) == 27 and all(importance["scores"][la][h] >= median for la, h in upper["heads"])
    assert not (tmp_path / "runs" / "arithmetic" / "random_upper").exists()  # the candidate is the held-out's only
    verdict = report[report.index("## The recommendation against the held-out family") :]
    assert "| P4 | Random from the more important half − Random | 1 |" in verdict and "no interval (1 seed)" in verdict
    for fam in ("arithmetic", "text", "times"):
        assert (tmp_path / "figures" / f"tradeoff_{fam}.png").is_file()

    stamp = result.stat().st_mtime_ns
    again = _run(args, timeout=300)
    assert "0 to run" in again and result.stat().st_mtime_ns == stamp
    assert _bench_files() == before


def test_reproduce_paper_quick_without_output_dir_leaves_benchmarks_untouched(monkeypatch, capsys):
    """`benchmarks.miniature.reproduce --quick` with no --output-dir writes into a new temporary directory (the
    experiment and the report writers are stubbed here: this checks where the files go, the smoke test above checks
    the run)."""
    from benchmarks.miniature import reproduce as rp

    class NoExperiment:
        lr, base_general, sweep, runs, sel = {}, {}, [], [], {}

        def __init__(self, scale, log):
            pass

        def run(self):
            pass

    written = []
    monkeypatch.setattr(rp, "MiniatureExperiment", NoExperiment)
    monkeypatch.setattr(rp.report, "figures", lambda exp, folder: [])
    monkeypatch.setattr(rp.report, "write_report", lambda exp, path, *a: written.append(path))
    before = _bench_files()
    rp.main(["--quick"])
    assert written and not Path(written[0]).resolve().is_relative_to(BENCH.resolve())
    assert _bench_files() == before


@pytest.mark.slow
def test_peft_layers_trains_both_from_the_same_start(smollm2_gguf):
    """The design check of the adapter export: ALPS's delta modules and PEFT LoRA layers with a frozen 0/1 B start
    from the same logits, train to the same logits, and both report step time and memory (pipeline only; the
    ratios are the benchmark's output, not a test)."""
    import re

    out = _run(
        ["-m", "benchmarks.cost.peft_layers", "--blocks", "1", "--threads", "1", "--rss-steps", "1"], timeout=400
    )
    for when in ("at the start", "after training"):
        gap = float(re.search(rf"max \|logit difference\| of the two {when}: (\S+)", out).group(1))
        assert gap < 1e-5, out
    for key in ("ALPS delta modules", "PEFT LoRA layers, frozen 0/1 B"):
        assert re.search(rf"{re.escape(key)}: median step [0-9.]+ s CPU, [0-9,]+ trainable, training state", out)
        assert re.search(rf"{re.escape(key)}: peak RSS [0-9]+ MB", out), out
    for what in ("step time", "training state", "peak RSS"):
        assert re.search(rf"PEFT LoRA / ALPS delta {what}: [0-9.]+x", out), out
