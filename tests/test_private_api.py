"""The private APIs listed in alps_trl.trainers.private_api exist in the installed packages with the signatures
alps_trl relies on: an upgrade that moves one fails here, with its name, not somewhere inside a training run."""

import importlib
import inspect
import pathlib
import re

import pytest

import alps_trl
from alps_trl.trainers.private_api import PRIVATE_API


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


def test_transformers_and_trl_are_capped_below_their_next_minor():
    text = (pathlib.Path(alps_trl.__file__).parent.parent / "pyproject.toml").read_text()
    for package in ("transformers", "trl"):
        match = re.search(rf'"{package}>=([0-9.]+),<([0-9.]+)"', text)
        assert match, f"{package} has no upper cap in pyproject.toml"
        floor, cap = (tuple(int(x) for x in v.split(".")) for v in match.groups())
        assert cap[:2] == (floor[0], floor[1] + 1), f"{package}: cap {cap} is not the next minor of {floor}"
