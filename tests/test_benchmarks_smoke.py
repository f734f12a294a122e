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
    out = _run([str(BENCH / "reproduce_paper.py"), "--quick", "--output-dir", str(tmp_path)], timeout=170)
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
    assert "± " in report and "Command: `python benchmarks/reproduce_paper.py --quick" in report
    for fig in ("accuracy_vs_ratio.png", "alps_heads_heatmap.png"):
        assert (tmp_path / "figures" / fig).stat().st_size > 1000


@pytest.mark.slow
def test_bench_train_quick_reports_every_method(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\nkept text\n")
    out = _run(
        [str(BENCH / "bench_train.py"), "--quick", "--threads", "1", "--update-results", str(results)], timeout=120
    )
    for name in ("| Full |", "| w/o attn |", "| ALPS mask 10% |", "| ALPS delta 10%, rest frozen |", "| LoRA r=8"):
        assert name in out, name
    assert "ALPS mask / Full step time" in out
    text = results.read_text()
    assert "kept text" in text and "<!-- bench_train:start -->" in text and "| ALPS mask 10% |" in text


def test_teacher_forced_exact_match_equals_greedy_decoding():
    """The reproduction scores exact match in one teacher-forced pass; it must agree with real greedy decoding."""
    sys.path.insert(0, str(BENCH))
    import finetune_loop as loop
    import reproduce_paper as rp
    import synthetic_tasks as data

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
    import synthetic_tasks as data

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
