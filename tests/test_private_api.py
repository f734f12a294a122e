"""The private APIs listed in alps_trl.trainers.private_api exist in the installed packages with the signatures
alps_trl relies on: an upgrade that moves one fails here, with its name, not somewhere inside a training run."""

import ast
import importlib
import inspect
import pathlib
import re

import pytest

import alps_trl
from alps_trl.trainers.private_api import (
    COMPAT_PAIRS,
    PRIVATE_API,
    SUPPORTED,
    enable_activation_checkpointing,
    is_activation_checkpointing,
)

pytestmark = pytest.mark.compat


def _resolve(target: str):
    module_name, _, path = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(target: str):
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    for part in path.split(".")[:-1]:
        owner = getattr(owner, part)
    return owner, path.split(".")[-1]


@pytest.mark.parametrize("entry", PRIVATE_API, ids=lambda e: e.target)
def test_private_api_is_where_alps_expects_it(entry):
    if entry.target.startswith("torch.ops.mkldnn"):
        import torch

        assert callable(torch.ops.mkldnn._is_mkldnn_bf16_supported)
        return
    if entry.use == "attribute":
        owner, name = _owner(entry.target)
        if isinstance(owner, type) and name not in dir(owner):
            # Instance attributes: set in the constructor's source.
            source = inspect.getsource(owner)
            assert f"self.{name}" in source or f".{name}" in source, f"{entry.target} is gone"
        return
    obj = _resolve(entry.target)
    assert callable(obj), entry.target
    params = tuple(inspect.signature(obj).parameters)
    assert params[: len(entry.parameters)] == entry.parameters, (
        f"{entry.target} now takes {params}; alps_trl ({entry.where}) relies on {entry.parameters}. "
        "Check the override/call against the new version before raising the cap in pyproject.toml."
    )


def test_overrides_match_the_overridden_signatures():
    from alps_trl.trainers.dpo import AlpsDPOTrainer
    from alps_trl.trainers.mixin import AlpsTrainerMixin

    for entry in (e for e in PRIVATE_API if e.use == "override"):
        owner, name = _owner(entry.target)
        ours = getattr(AlpsDPOTrainer if "dpo" in entry.target else AlpsTrainerMixin, name)
        assert tuple(inspect.signature(ours).parameters) == tuple(inspect.signature(getattr(owner, name)).parameters)


def test_every_private_use_in_the_package_is_listed():
    """A private name of another package used in alps_trl/ but missing from the list fails here."""
    listed = {e.target.rpartition(".")[2].rpartition(":")[2] for e in PRIVATE_API}
    pattern = re.compile(r"(?:super\(\)|trainer|self|tensor|param|torch\.ops\.mkldnn|module)\.(_[a-z][a-z_]+)\b")
    own = set()
    for path in pathlib.Path(alps_trl.__file__).parent.rglob("*.py"):
        text = path.read_text()
        own.update(re.findall(r"(?:def|class) (_[a-z][a-z_]*)|self\.(_[a-z][a-z_]*)\s*[:=]", text))
        own.update(re.findall(r'object\.__setattr__\(self, "(_[a-z][a-z_]*)"()', text))
    own_names = {n for pair in own for n in pair if n}
    unlisted = set()
    for path in pathlib.Path(alps_trl.__file__).parent.rglob("*.py"):
        for name in pattern.findall(path.read_text()):
            if not name.startswith("_alps") and name not in own_names and name not in listed and name != "_utils":
                unlisted.add(f"{path.name}: {name}")
    assert not unlisted, f"private APIs used but not in alps_trl.trainers.private_api: {sorted(unlisted)}"


REPO = pathlib.Path(alps_trl.__file__).parent.parent


_VERSION_CALLS = {"Version", "LooseVersion", "StrictVersion", "parse_version"}
_VERSION_NAMES = {"__version__", "version_info"}


def _looks_at_a_version(node: ast.AST) -> bool:
    """A name or call that yields a package's version: `x.__version__`, `sys.version_info`, `version("pkg")` /
    `importlib.metadata.version(...)`."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in _VERSION_NAMES:
            return True
        if isinstance(sub, ast.Name) and sub.id in _VERSION_NAMES:
            return True
        if isinstance(sub, ast.Call):
            func = sub.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "version":
                return True
    return False


def version_checks(source: str) -> list[int]:
    """Line numbers in `source` that compare versions: `Version(...)`/`version.parse(...)`/`parse_version(...)`,
    transformers' `is_*_version`/`*_greater_or_equal` helpers, an import of `packaging.version`, or a comparison
    with a looked-up version (`__version__`, `version_info`, `importlib.metadata.version(...)`).

    Defining `__version__ = "..."` or reading package metadata without comparing it is not a check."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            if (
                name in _VERSION_CALLS
                or (name == "parse" and owner == "version")
                or re.fullmatch(r"is_\w+_version|\w+_greater_or_equal(?:_than)?", name)
            ):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("packaging"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.startswith("packaging") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(
            _looks_at_a_version(operand) for operand in (node.left, *node.comparators)
        ):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_version_check_finder():
    """The finder below catches the usual ways of comparing versions and leaves metadata lookups alone."""
    flagged = [
        "from packaging.version import Version\nif Version(transformers.__version__) >= Version('5.18.0'): pass",
        "import packaging.version\nok = packaging.version.parse(v) > x",
        "ok = torch.__version__ >= '2.6'",
        "ok = sys.version_info < (3, 11)",
        "ok = importlib.metadata.version('trl').startswith('1.') or version('trl') == '1.16.0'",
        "ok = is_transformers_version('>=', '5.23')",
        "ok = is_torch_greater_or_equal('2.6')",
    ]
    for source in flagged:
        assert version_checks(source), source
    fine = [
        '__version__ = "0.1.0"',
        "dist = importlib.metadata.distribution('gguf')",
        "name = dist.metadata['Name']\nv = importlib.metadata.version('gguf')",
        "x = config.version == 2",
    ]
    for source in fine:
        assert not version_checks(source), source


def test_no_version_checks_outside_private_api():
    """Only alps_trl/trainers/private_api.py may look at a version (its shims handle what differs between the
    supported ones); a check anywhere else is listed with its file and line."""
    package = pathlib.Path(alps_trl.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "trainers" / "private_api.py":
            continue
        for line in version_checks(path.read_text()):
            found.append(f"{path.relative_to(REPO)}:{line}")
    assert not found, f"version checks outside alps_trl/trainers/private_api.py: {found}"


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def test_pyproject_range_is_the_supported_range_and_the_installed_versions_are_in_it():
    """pyproject.toml asks for exactly `SUPPORTED` ([floor, cap) by minor), and what is installed lies in it."""
    import importlib.metadata

    text = (REPO / "pyproject.toml").read_text()
    for package, (floor, cap) in SUPPORTED.items():
        match = re.search(rf'"{package}>=([0-9.]+),<([0-9.]+)"', text)
        assert match, f"{package} has no upper cap in pyproject.toml"
        assert match.groups() == (floor, cap), (
            f"{package}: pyproject.toml says {match.groups()}, SUPPORTED {floor, cap}"
        )
        installed = _minor(importlib.metadata.version(package))
        assert _minor(floor) <= installed < _minor(cap), f"{package} {installed} is outside [{floor}, {cap})"


def test_compat_pairs_are_the_two_ends_and_ci_runs_them():
    """.ci/compat installs the oldest and the newest supported (trl, transformers) pair; the newest is what
    .ci/constraints.txt pins for the main run; the README's table names both as tested."""
    (old_trl, old_tf), (new_trl, new_tf) = COMPAT_PAIRS
    assert _minor(old_trl) == _minor(SUPPORTED["trl"][0]) and _minor(old_tf) == _minor(SUPPORTED["transformers"][0])
    for version, package in ((new_trl, "trl"), (new_tf, "transformers")):
        major, minor = _minor(SUPPORTED[package][1])
        assert _minor(version) == (major, minor - 1), f"{package} {version} is not the newest supported minor"
    constraints = (REPO / ".ci/constraints.txt").read_text().split()
    assert f"trl=={new_trl}" in constraints and f"transformers=={new_tf}" in constraints
    assert "COMPAT_PAIRS" in (REPO / ".ci/compat").read_text()
    assert "./.ci/compat" in (REPO / ".ci/run").read_text()
    readme = (REPO / "README.md").read_text().split("\n## Supported versions\n", 1)[1].split("\n## ", 1)[0]
    for trl_version, tf_version in COMPAT_PAIRS:
        row = next((line for line in readme.splitlines() if f"| {trl_version} | {tf_version} |" in line), None)
        assert row is not None and "tested in CI" in row, f"README has no tested row for trl {trl_version}"


def test_checkpointing_names_work_in_the_installed_transformers(tmp_path):
    """The ALPS configs take the activation_checkpointing names on every supported transformers (5.22 has only the
    gradient_checkpointing ones), and the shims switch checkpointing on a model."""
    from alps_trl.testing import tiny_model
    from alps_trl.trainers.config import AlpsSFTConfig

    off = AlpsSFTConfig(str(tmp_path), activation_checkpointing=False, report_to="none", bf16=False)
    assert off.gradient_checkpointing is False and off.activation_checkpointing is False
    on = AlpsSFTConfig(str(tmp_path), activation_checkpointing=True, report_to="none", bf16=False,
                       activation_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    assert on.gradient_checkpointing and on.gradient_checkpointing_kwargs == {"use_reentrant": False}
    model = tiny_model("llama")
    assert not is_activation_checkpointing(model)
    enable_activation_checkpointing(model, {"use_reentrant": False})
    assert is_activation_checkpointing(model)
