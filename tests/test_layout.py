"""The package's folders are its layers (localization < restriction < reporting < trainers < cli/recipes), and
imports point down only; nothing in the repository edits sys.path to find its own modules."""

import ast
import pathlib
import re

import pytest

import alps_trl

PACKAGE = pathlib.Path(alps_trl.__file__).parent
REPO = pathlib.Path(__file__).resolve().parents[1]

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


# sys.path changed in code: sys.path.insert/append/extend/remove/pop/clear, sys.path[...] = ..., sys.path = ...,
# sys.path += ...; or `path` imported from sys. This file, which spells the patterns out, is left out of the search.
SYS_PATH_EDIT = re.compile(
    r"\bsys\.path\s*(\.\s*(insert|append|extend|remove|pop|clear)\b|\[|\+=|=[^=])|from sys import path"
)


def test_no_sys_path_edits():
    """Scripts run as modules (`python -m benchmarks.cost.training`) or import through installed packages; tests load
    script files with importlib. No code finds its siblings by editing sys.path."""
    offenders = []
    for folder in ("alps_trl", "benchmarks", "recipes", "tests", "docs"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if SYS_PATH_EDIT.search(line) and path.resolve() != pathlib.Path(__file__).resolve():
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "sys.path edits:\n" + "\n".join(offenders)


# Documents that are not part of the repository; what the code relies on from them is in docs/. (The brackets keep
# a plain grep for these names from finding this line; this file is also left out of the search.)
OUTSIDE_DOCUMENTS = re.compile(r"DESIGN\.md|ALPS_[M]ETHOD|PLATFORM_[N]OTES|share[d]/|of the desig[n]\b")


def test_no_reference_to_documents_outside_the_repository():
    offenders = []
    files = [REPO / "README.md"] + [
        path
        for folder in ("alps_trl", "benchmarks", "recipes", "tests", "docs", "launch")
        for path in sorted((REPO / folder).rglob("*"))
        if path.suffix in (".py", ".md", ".yaml", ".sh", ".sbatch") and "results" not in path.relative_to(REPO).parts
    ]
    for path in files:
        if path.resolve() == pathlib.Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE_DOCUMENTS.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "references to documents outside the repository:\n" + "\n".join(offenders)
