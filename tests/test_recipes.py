"""Recipe YAMLs and script arguments: every recipe parses with its script, names an existing accelerate config,
keeps the paper's effective batch and hyperparameters, and bad input fails before training with a clear message."""

import json
import logging
import os

import pytest
from recipe_helpers import (
    ACCELERATE_CONFIG_DIR,
    REPO,
    SCRIPTS,
    check_launch_command,
    fenced_shell_commands,
    load_script,
    parse_script_args,
    read_yaml,
    recipe_marker,
    recipe_yamls,
    split_command,
)

from alps_trl.recipes import arguments, demo, loading, report

RECIPES = recipe_yamls()
PAPER_SFT = [r for r in RECIPES if "/dpo/" not in r and "/grpo/" not in r]
EXPECTED_RECIPES = (
    {
        f"recipes/{model}/{task}/config_alps.yaml"
        for model in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
        for task in ("general", "math", "code")
    }
    | {"recipes/llama-3.2-1b/dpo/config_alps.yaml", "recipes/llama-3.1-8b/general/config_alps_4bit.yaml"}
    | {
        "recipes/llama-3.2-1b/grpo/config_alps.yaml",
        "recipes/llama-3.1-8b/grpo/config_alps.yaml",
    }
)


def test_all_paper_recipes_exist():
    assert EXPECTED_RECIPES <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_parses_with_its_script(recipe):
    marker = recipe_marker(recipe)
    script = marker["script"]
    assert script in SCRIPTS
    script_args, training_args, model_args = parse_script_args(script, ["--config", recipe])
    raw = read_yaml(recipe)
    assert model_args.model_name_or_path == raw["model_name_or_path"]
    assert script_args.dataset_name == raw["dataset_name"]
    assert training_args.alps_ratio == raw["alps_ratio"] == 0.1
    assert training_args.alps_mode == raw.get("alps_mode", "auto")
    assert not model_args.use_peft


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_names_existing_accelerate_config_and_effective_batch(recipe):
    marker = recipe_marker(recipe)
    acc_path = os.path.join(REPO, ACCELERATE_CONFIG_DIR, marker["accelerate_config"] + ".yaml")
    assert os.path.isfile(acc_path), f"{recipe} names a missing accelerate config {acc_path}"
    acc = read_yaml(os.path.relpath(acc_path, REPO))
    gpus = int(marker["num_gpus"])
    assert int(acc.get("num_processes", 1)) == gpus, "the accelerate config's num_processes must match num_gpus"
    raw = read_yaml(recipe)
    effective = raw["per_device_train_batch_size"] * raw.get("gradient_accumulation_steps", 1) * gpus
    assert effective == int(marker["effective_batch_size"]) == 128
    text = open(os.path.join(REPO, recipe)).read()
    assert f"x {gpus} GPU" in text and "Effective batch 128" in text


@pytest.mark.parametrize("recipe", RECIPES)
def test_launch_commands_in_recipe_comments_parse(recipe):
    """The `accelerate launch ...` lines in a recipe's header name existing files and parse with the script."""
    text = open(os.path.join(REPO, recipe)).read()
    commands, current = [], ""
    for line in text.splitlines():
        body = line.lstrip("#").strip()
        if body.startswith("accelerate launch") or current:
            current += " " + body.rstrip("\\").strip()
            if not body.endswith("\\"):
                commands.append(current.strip())
                current = ""
    assert commands, f"{recipe} shows no launch command"
    for command in commands:
        (argv,) = split_command(command)
        _, _, _ = check_launch_command(argv)
        assert recipe in argv, f"{recipe}: its launch command should name the recipe itself: {command}"


@pytest.mark.parametrize("recipe", PAPER_SFT)
def test_sft_recipes_use_the_paper_hyperparameters(recipe):
    _, args, model_args = parse_script_args("recipes/sft_alps.py", ["--config", recipe])
    script_args = parse_script_args("recipes/sft_alps.py", ["--config", recipe])[0]
    assert args.learning_rate == 2e-5
    assert args.optim.value == "adamw_torch_fused"
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)
    assert args.weight_decay == 0.1
    assert args.lr_scheduler_type.value == "cosine_with_min_lr"
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.warmup_steps == 0.1
    assert args.num_train_epochs == 3
    assert args.bf16
    assert model_args.attn_implementation == "flash_attention_2"
    assert script_args.prompt_template == "alpaca"
    assert script_args.dataset_format in ("ultrachat", "mathinstruct", "magicoder")


def test_cosine_with_min_lr_decays_to_ten_percent():
    """transformers supports the paper's schedule: cosine decay to 10% of the peak lr after warmup."""
    import torch
    from transformers import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = get_scheduler(
        "cosine_with_min_lr",
        opt,
        num_warmup_steps=10,
        num_training_steps=100,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[10] == pytest.approx(2e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-6)


def test_4bit_recipe_uses_delta_mode_and_nf4():
    _, args, model_args = parse_script_args(
        "recipes/sft_alps.py", ["--config", "recipes/llama-3.1-8b/general/config_alps_4bit.yaml"]
    )
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4"
    assert args.alps_mode == "delta"
    assert args.alps_task_model  # the probe cannot train a quantized base


def test_fsdp_recipes_do_not_rely_on_the_probe_in_one_step():
    """The probe needs the unsharded model: FSDP recipes use a task model or document the two-step localization."""
    for recipe in RECIPES:
        if recipe_marker(recipe)["accelerate_config"].startswith("fsdp"):
            raw = read_yaml(recipe)
            text = open(os.path.join(REPO, recipe)).read()
            assert raw.get("alps_task_model") or ("--localize_only true" in text and "--alps_heads" in text), recipe


# ---- demo arguments ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_demo_defaults_are_all_consumed_by_the_parser(script):
    parser = load_script(script).make_parser()
    assert parser.set_defaults_with_config(**demo.demo_defaults(SCRIPTS[script])) == []


def test_no_arguments_means_demo_and_cli_overrides_demo_defaults():
    """The demo: SmolLM2-135M-Instruct's packaged GGUF file and the shipped task data, head-only delta training."""
    from real_model import smollm2_gguf_or_skip

    gguf_file = smollm2_gguf_or_skip()
    script_args, args, model_args = parse_script_args("recipes/sft_alps.py", [])
    assert model_args.model_name_or_path == gguf_file
    assert script_args.dataset_name.endswith(os.path.join("recipes", "demo", "data", "reverse_words"))
    assert args.output_dir == "outputs/sft_alps_demo"
    assert args.report_to in ("none", [], ["none"])
    assert script_args.eval_before_and_after and script_args.eval_generations > 0
    assert (args.alps_mode, args.alps_train_non_attention) == ("delta", False)
    _, args, _ = parse_script_args("recipes/sft_alps.py", ["--output_dir", "elsewhere", "--learning_rate", "1e-4"])
    assert (args.output_dir, args.learning_rate) == ("elsewhere", 1e-4)
    script_args, args, _ = parse_script_args("recipes/dpo_alps.py", [])
    assert args.output_dir == "outputs/dpo_alps_demo"
    assert script_args.dataset_name.endswith(os.path.join("recipes", "demo", "data", "terse_answers"))


def test_toy_configs_name_a_random_init_model():
    for script, yaml_file in (("recipes/sft_alps.py", "toy_sft.yaml"), ("recipes/dpo_alps.py", "toy_dpo.yaml")):
        script_args, _, model_args = parse_script_args(script, ["--config", f"recipes/demo/{yaml_file}"])
        assert script_args.random_init and model_args.model_name_or_path == "recipes/demo/model"


def test_is_demo_run(tmp_path):
    assert arguments.is_demo_run([])
    assert not arguments.is_demo_run(["--model_name_or_path", "x"])
    assert not arguments.is_demo_run(["--model_name_or_path=x"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: some/model\n")
    assert not arguments.is_demo_run(["--config", str(cfg)])
    cfg.write_text("learning_rate: 0.1\n")
    assert arguments.is_demo_run(["--config", str(cfg)])


# ---- bad input fails early, naming the key -------------------------------------------------------------------------


def test_unknown_alps_key_in_yaml_is_named(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("alps_ratoi: 0.2\nlearning_rate: 1.0e-4\n")
    with pytest.raises(ValueError, match=r"Unknown ALPS option 'alps_ratoi' in .*bad\.yaml.*'alps_ratio'"):
        parse_script_args("recipes/sft_alps.py", ["--config", str(cfg)])


def test_unknown_alps_flag_on_cli_is_named():
    with pytest.raises(ValueError, match=r"Unknown ALPS option 'alps_modes' on the command line.*'alps_mode'"):
        parse_script_args("recipes/dpo_alps.py", ["--alps_modes", "delta"])


def test_unknown_other_key_in_yaml_is_named(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_script_args("recipes/sft_alps.py", ["--config", str(cfg)])


@pytest.mark.parametrize("where", ["yaml", "cli"])
def test_zero_ratio_is_refused_naming_alps_ratio(tmp_path, where):
    if where == "yaml":
        cfg = tmp_path / "zero.yaml"
        cfg.write_text("alps_ratio: 0\n")
        args = ["--config", str(cfg)]
    else:
        args = ["--alps_ratio", "0"]
    with pytest.raises(ValueError, match=r"alps_ratio.*\(0, 1\]"):
        parse_script_args("recipes/sft_alps.py", args)


def test_missing_dataset_column_fails_before_any_model_is_built(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "answer": "a"}) for i in range(4)) + "\n")
    script_args, training_args, model_args = parse_script_args(
        "recipes/sft_alps.py",
        ["--dataset_name", str(data), "--dataset_format", "magicoder", "--output_dir", str(tmp_path / "out")],
    )

    def no_model(*a, **k):
        raise AssertionError("a model was built before the dataset was checked")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", no_model)
    with pytest.raises(ValueError, match=r"column\(s\) \['response'\] missing"):
        load_script("recipes/sft_alps.py").main(script_args, training_args, model_args)


def test_missing_eval_split_is_named(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    script_args, _, _ = parse_script_args("recipes/sft_alps.py", ["--dataset_name", str(data)])
    with pytest.raises(ValueError, match=r"Evaluation needs split 'test'.*\['train'\]"):
        loading.prepare_datasets(script_args, "sft", want_eval=True)


def test_use_peft_is_refused():
    _, _, model_args = parse_script_args("recipes/sft_alps.py", ["--use_peft", "true"])
    with pytest.raises(ValueError, match="--use_peft is not supported"):
        arguments.check_no_peft(model_args)


def test_adapter_export_of_a_run_that_trains_the_rest_is_refused_before_loading():
    argv = ["--model_name_or_path", "some/model", "--alps_save_adapter", "true"]
    _, training_args, model_args = parse_script_args(
        "recipes/sft_alps.py", argv + ["--alps_train_non_attention", "true"]
    )
    with pytest.raises(ValueError, match="the MLP, norms and embeddings move too"):
        arguments.check_adapter_export(training_args, model_args)
    _, training_args, model_args = parse_script_args("recipes/sft_alps.py", argv + ["--load_in_4bit", "true"])
    arguments.check_adapter_export(training_args, model_args)  # a 4-bit base trains only the deltas
    _, training_args, model_args = parse_script_args(
        "recipes/sft_alps.py", argv + ["--alps_train_non_attention", "false"]
    )
    arguments.check_adapter_export(training_args, model_args)


# ---- model loading helpers ------------------------------------------------------------------------------------------


def test_flash_attention_falls_back_to_sdpa_with_one_warning(monkeypatch, caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without CUDA/flash-attn")
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="alps_trl.recipes.loading"):
        assert loading.resolve_attn_implementation("flash_attention_2") == "sdpa"
        assert loading.resolve_attn_implementation("flash_attention_2") == "sdpa"
    assert sum("flash_attention_2" in r.getMessage() for r in caplog.records) == 1
    assert loading.resolve_attn_implementation("eager") == "eager"
    assert loading.resolve_attn_implementation(None) is None


def test_flash_attention_on_a_gpu_older_than_it_supports_falls_back(monkeypatch, caplog):
    """A T4 (compute capability 7.5) with flash-attn installed: FA2 needs Ampere (8.0); sdpa, with the reason."""
    import torch
    import transformers.utils
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    hf_logging.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="alps_trl.recipes.loading"):
        assert loading.resolve_attn_implementation("flash_attention_2") == "sdpa"
    assert "Tesla T4 has compute capability 7.5, and flash_attention_2 needs 8.0 or newer" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert loading.resolve_attn_implementation("flash_attention_2") == "flash_attention_2"


def test_bf16_on_a_gpu_without_bf16_stops_with_what_to_change(monkeypatch):
    """`bf16: true` (as in a recipe YAML) on a GPU before Ampere stops before any work, saying what to set."""
    import transformers.training_args as ta

    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(ta, "is_torch_cuda_available", lambda: True)
    with pytest.raises(SystemExit) as exc:
        parse_script_args(
            "recipes/sft_alps.py", ["--model_name_or_path", "some/model", "--bf16", "true", "--use_cpu", "false"]
        )
    assert "--bf16 false --fp16 true" in str(exc.value)


def test_kbit_device_map_and_model_init_kwargs():
    import torch

    expected = {"": 0} if torch.cuda.is_available() else "cpu"
    assert loading.kbit_device_map() == expected
    _, args, model_args = parse_script_args(
        "recipes/sft_alps.py", ["--model_name_or_path", "some/model", "--attn_implementation", "sdpa"]
    )
    kwargs = loading.model_init_kwargs(model_args, args)
    assert kwargs["attn_implementation"] == "sdpa" and kwargs["trust_remote_code"] is False


def test_report_lines():
    before = {"eval_loss": 4.0, "eval_mean_token_accuracy": 0.1, "eval_runtime": 1.0}
    after = {"eval_loss": 1.0, "eval_mean_token_accuracy": 0.5, "eval_runtime": 2.0}
    assert report.loss_lines(before, after) == [
        "eval_loss: before 4.0000 -> after 1.0000 (-75.0%)",
        "eval_mean_token_accuracy: before 0.1000 -> after 0.5000",
    ]
    assert report.loss_lines(None, after) == []


def test_4bit_base_through_the_script_on_cpu(tmp_path):
    """The quantized branch: the script loads the 4-bit base itself, skips the eval-before on CPU, saves deltas."""
    pytest.importorskip("bitsandbytes")
    model, tokenizer = loading.build_demo_model(os.path.join(REPO, "recipes", "demo", "model"), seed=0)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(base), "--load_in_4bit", "true", "--dtype", "float32", "--bf16", "false"]
    args += ["--alps_strategy", "random", "--dataset_name", os.path.join(REPO, "recipes", "demo", "data", "sft")]
    args += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "96", "--save_strategy", "no"]
    args += ["--activation_checkpointing", "false", "--eval_before_and_after", "true", "--output_dir", str(out)]
    script_args, training_args, model_args = parse_script_args("recipes/sft_alps.py", args)
    load_script("recipes/sft_alps.py").main(script_args, training_args, model_args)
    assert (out / "alps_delta.safetensors").is_file() and (out / "alps_heads.json").is_file()
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_usage_commands_in_script_docstrings_parse(script):
    """The usage examples in each script's docstring name existing files and parse with the script's parser."""
    commands = fenced_shell_commands(load_script(script).__doc__)
    assert len(commands) >= 2
    for command in commands:
        (argv,) = split_command(command)
        check_launch_command(argv)
