"""The import structure a newcomer relies on (docs/ARCHITECTURE.md, "Dependence is one
way"): folders depend one way, modules import in no circle (a lazy import inside a
function counts: it only hides the circle), and test files share helpers through
conftest.py / builders.py / commands.py / model_cases.py, never through another test file."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "datamodules", "lightning_modules")
# folder -> the project folders it may import
MAY_IMPORT = {"flows": {"flows"}, "datamodules": {"datamodules", "flows"},
              "lightning_modules": {"lightning_modules", "flows", "datamodules"}}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file. ``import a.b.c`` also runs
    the packages a and a.b; those count unless they hold ``path`` (a package is already
    running when one of its own modules is imported). A package named outright
    (``from a import X``) always counts: X is read from it."""
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
            submodules = []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named = [node.module]
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for imported in named + submodules:
            parts = imported.split(".")
            prefixes = {".".join(parts[:i]) for i in range(1, len(parts))} - ancestors
            found.update((prefixes | {imported}) & known)
    return found - {name}


def project_graph(root: Path = REPO, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}
    return {name: imported_modules(path, name, set(files)) for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module, or a module importing itself
    through its package (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_in_a_circle():
    assert circles(project_graph()) == []


def test_the_circle_check_finds_a_circle_through_a_package(tmp_path):
    """A module importing a sibling package's module whose package imports it back."""
    (tmp_path / "flows" / "layers").mkdir(parents=True)
    (tmp_path / "flows" / "__init__.py").write_text("")
    (tmp_path / "flows" / "layers" / "__init__.py").write_text("from flows.layers.step import Step\n")
    (tmp_path / "flows" / "layers" / "step.py").write_text("from flows.nets import Net\n")
    (tmp_path / "flows" / "nets.py").write_text("def make():\n    from flows.layers.norm import Norm\n")
    (tmp_path / "flows" / "layers" / "norm.py").write_text("")
    groups = circles(project_graph(tmp_path, ("flows",)))
    assert groups == [["flows.layers", "flows.layers.step", "flows.nets"]]


@pytest.mark.parametrize("folder", PACKAGES)
def test_folders_depend_one_way(folder):
    graph = project_graph()
    wrong = sorted(f"{name} -> {target}" for name, targets in graph.items() if name.split(".")[0] == folder
                   for target in targets if target.split(".")[0] not in MAY_IMPORT[folder])
    assert wrong == []


def test_no_test_file_imports_another_test_file():
    """Shared helpers live in conftest.py, builders.py, commands.py and model_cases.py; a
    test file used as a library runs its module-level set-up wherever it is imported."""
    wrong = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests.test_"):
                wrong.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Import):
                wrong += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("tests.test_")]
    assert wrong == []
