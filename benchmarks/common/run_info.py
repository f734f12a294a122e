"""What a benchmark report records about the run that made it: the commit (and whether the code it ran was
committed), package versions, and hand-written sections of an earlier report to keep; plus atomic JSON writes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
# Where the committed results of each benchmark live (repository-relative, as commands and reports write them).
RESULTS = "benchmarks/results"
MINIATURE_RESULTS = f"{RESULTS}/miniature"
REAL_MODEL_RESULTS = f"{RESULTS}/real_model"
# The training-cost section that `cost.training --update-results` writes into the miniature's RESULTS.md, and that
# the miniature's report keeps when it rewrites that file.
TRAINING_COST_START = "<!-- bench_train:start -->"
TRAINING_COST_END = "<!-- bench_train:end -->"


def git_commit(own_outputs: Sequence[str] = (), short: bool = True) -> str:
    """`git rev-parse HEAD` of the repository, plus a note when the working tree has uncommitted changes.

    `own_outputs`: paths (absolute, or relative to the repository root) the run itself wrote; changes there do not
    make the code it ran "uncommitted". Paths outside the repository are ignored.
    """
    try:
        rev = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
        out = subprocess.run(rev, cwd=HERE, capture_output=True, text=True)
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True)
        root = top.stdout.strip()
        excludes = []
        for path in own_outputs:
            full = os.path.abspath(os.path.join(root, path))
            if full == root or full.startswith(root + os.sep):
                excludes.append(f":(exclude,top){os.path.relpath(full, root)}")
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ":/", *excludes], cwd=HERE, capture_output=True, text=True
        ).stdout
        return out.stdout.strip() + (" (working tree has uncommitted changes)" if dirty.strip() else "")
    except OSError:
        return "unknown"


def package_versions(names: Sequence[str]) -> dict[str, str]:
    """Installed version of each distribution ("not installed" where missing)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def kept_section(path: str, start: str, end: str) -> str:
    """Text between the markers in an existing report (hand-written interpretation, the training-cost table), or ''."""
    if not os.path.isfile(path):
        return ""
    text = open(path).read()
    if start in text and end in text:
        return text.split(start, 1)[1].split(end, 1)[0].strip()
    return ""


def write_json(path: str, data: Any) -> None:
    """Write `data` as JSON atomically (a temporary file renamed over `path`): a crash leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Write `text` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
