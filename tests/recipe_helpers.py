"""Helpers for the recipe, demo and README tests: load the recipe scripts, parse recipe YAMLs and launch commands."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import sys
from functools import cache

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"recipes/sft_alps.py": "sft", "recipes/dpo_alps.py": "dpo", "recipes/grpo_alps.py": "grpo"}
ACCELERATE_CONFIG_DIR = "recipes/accelerate_configs"
RECIPE_MARKER = re.compile(r"^# alps-recipe: (.*)$", re.MULTILINE)


@cache
def load_script(rel_path: str):
    """Import a script by its repository path (recipes/*.py, docs/*.py are not packages) as a module."""
    path = os.path.join(REPO, rel_path)
    name = "recipe_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_script_args(script: str, args: list[str]):
    """Parse `args` exactly like `python <script> <args>` does; returns (script_args, training_args, model_args)."""
    from alps_trl.recipes.arguments import parse_recipe_args

    module = load_script(script)
    args = list(args)
    if not _has_cuda() and "--use_cpu" not in args:
        # The paper recipes ask for bf16, which transformers refuses on a CPU-only machine unless use_cpu is set.
        args += ["--use_cpu", "true"]
    return parse_recipe_args(module.make_parser(), SCRIPTS[script], args, str(module.DEMO_DIR))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def recipe_yamls() -> list[str]:
    """Every recipe YAML (recipes/<model>/<task>/*.yaml), repo-relative."""
    paths = glob.glob(os.path.join(REPO, "recipes", "*", "*", "*.yaml"))
    return sorted(os.path.relpath(p, REPO) for p in paths if ACCELERATE_CONFIG_DIR not in p)


def recipe_marker(rel_path: str) -> dict[str, str]:
    """The `# alps-recipe: key=value ...` line of a recipe YAML as a dict."""
    with open(os.path.join(REPO, rel_path)) as f:
        match = RECIPE_MARKER.search(f.read())
    if match is None:
        raise AssertionError(f"{rel_path} has no '# alps-recipe:' line")
    return dict(item.split("=", 1) for item in match.group(1).split())


def read_yaml(rel_path: str) -> dict:
    with open(os.path.join(REPO, rel_path)) as f:
        return yaml.safe_load(f)


# ---- shell commands --------------------------------------------------------------------------------------------

SHELL_FENCES = ("bash", "sh", "shell", "console")


def fenced_shell_commands(text: str) -> list[str]:
    """Shell commands in the fenced bash/sh/shell/console blocks of markdown `text` (continuations joined)."""
    commands = []
    for lang, body in re.findall(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if lang not in SHELL_FENCES:
            continue
        current = ""
        for line in body.splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ ") and not current:
                    continue  # console output
                line = line.removeprefix("$ ")
            if not current and (not line or line.startswith("#")):
                continue
            current += line.removesuffix("\\").strip() + " "
            if not line.endswith("\\"):
                commands.append(current.strip())
                current = ""
    return commands


def split_command(command: str) -> list[list[str]]:
    """Split a shell line into its `&&`-joined simple commands, each as argv; leading VAR=value kept in place."""
    parts = [[]]
    for token in shlex.split(command, comments=True):
        if token == "&&":
            parts.append([])
        else:
            parts[-1].append(token)
    return [p for p in parts if p]


def env_and_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        key, value = argv[0].split("=", 1)
        env[key] = value
        argv = argv[1:]
    return env, argv


def parse_accelerate_launch(argv: list[str]):
    """Parse `accelerate launch ...` with accelerate's own parser; returns its namespace."""
    from accelerate.commands.launch import launch_command_parser

    assert argv[:2] == ["accelerate", "launch"], argv
    return launch_command_parser().parse_args(argv[2:])


def check_launch_command(argv: list[str]) -> tuple:
    """Check an `accelerate launch [--config_file F] recipes/x.py [args]` or `python recipes/x.py [args]` command.

    Asserts the accelerate config and recipe script exist, and parses the script arguments with the script's
    own TrlParser (which also reads any `--config` YAML). Returns the parsed dataclasses.
    """
    if argv[0] == "accelerate":
        ns = parse_accelerate_launch(argv)
        if ns.config_file:
            assert os.path.isfile(os.path.join(REPO, ns.config_file)), f"missing accelerate config {ns.config_file}"
        script, script_args = ns.training_script, list(ns.training_script_args)
    else:
        assert argv[0] in ("python", "python3"), argv
        script, script_args = argv[1], argv[2:]
    assert script in SCRIPTS, f"unknown recipe script {script}"
    assert os.path.isfile(os.path.join(REPO, script))
    return parse_script_args(script, script_args)


def run_env() -> dict[str, str]:
    """Environment for subprocess runs of the recipes: offline, quiet trackers, repo importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def python_executable_dir() -> str:
    return os.path.dirname(sys.executable)
