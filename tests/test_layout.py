"""The package's folders are the design's layers, and imports point down only (../shared/DESIGN.md)."""

import ast
import pathlib

import pytest

import alps_trl

PACKAGE = pathlib.Path(alps_trl.__file__).parent

# Each folder and what it may import from the package besides itself (runtime imports; `if TYPE_CHECKING:` excluded).
ALLOWED = {
    "localization": set(),
    "restriction": {"localization"},
    "reporting": {"localization"},
    "trainers": {"localization", "restriction", "reporting"},
    "recipes": {"localization", "restriction", "reporting", "trainers"},
    "cli": {"localization", "restriction", "reporting"},
    "testing": {"localization", "restriction", "trainers"},  # test helpers, beside the layers
}


def _runtime_imports(path: pathlib.Path) -> set[str]:
    """The alps_trl subpackages a module imports at runtime: [folder names]."""
    tree = ast.parse(path.read_text())
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "alps_trl" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
    return found


def _layer_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_top_level_holds_only_the_layers():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert flat == ["testing.py"], f"modules outside the layer folders: {flat}"
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert folders == sorted(set(ALLOWED) - {"testing"})


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    if path.parent == PACKAGE and path.name == "__init__.py":
        return  # the lazy public namespace re-exports every layer
    layer = _layer_of(path)
    upward = _runtime_imports(path) - ALLOWED[layer] - {layer}
    assert not upward, f"{path.relative_to(PACKAGE)} ({layer}) imports the layers above it: {sorted(upward)}"


def test_public_names_resolve():
    for name in alps_trl.__all__:
        assert getattr(alps_trl, name) is not None
