"""The import graph keeps its layers: `evals.models` (the SD3 pipeline, FP8 layers, policies) imports
nothing else from `evals`; `evals.reports` renders run directories without torch or `evals.models`;
there is one import package; the modules that promise not to load torch do not."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO


def imported_modules(path: Path) -> set[str]:
    """Modules a file imports, at module level or inside functions (`from a.b import c` gives `a.b`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def project_imports(path: Path) -> set[str]:
    """The `evals.*` modules a file imports, outside its own subpackage (`evals.models` for a module
    of evals/models, `evals.reports` for one of evals/reports)."""
    own = ".".join(path.relative_to(REPO).parts[:2])
    return {m for m in imported_modules(path) if m.split(".")[0] == "evals" and not m.startswith(own)}


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / "evals" / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules_of("models"), ids=lambda p: p.name)
def test_models_import_nothing_else_from_evals(path: Path) -> None:
    assert project_imports(path) == set()


@pytest.mark.parametrize("path", modules_of("reports"), ids=lambda p: p.name)
def test_reports_import_neither_torch_nor_models(path: Path) -> None:
    imported = imported_modules(path)
    assert not {m for m in imported if m.split(".")[0] == "torch" or m.startswith("evals.models")}


def test_the_checks_see_an_import() -> None:
    assert project_imports(REPO / "evals" / "api.py") >= {"evals.models.sources", "evals.runner"}
    assert project_imports(REPO / "evals" / "models" / "precision.py") == set()
    assert "evals.rundir" in project_imports(REPO / "evals" / "reports" / "render.py")


def test_one_import_package() -> None:
    """`models/` and `reports/` at the top hold data and templates, no Python: an installed `models`
    or `reports` of another distribution is never shadowed, and this one installs only `evals`."""
    for folder in ("models", "reports", "suites"):
        assert not list((REPO / folder).glob("*.py")), folder
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["evals*"]


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in it except under `if TYPE_CHECKING:`
    (annotations only, nothing runs)."""
    paths = {}
    for path in (REPO / "evals").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        found = set()
        for target in targets:
            while target and target not in paths:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path around each cycle a depth-first walk meets."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif state[nxt] == 0:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            walk(node, [node])
    return found


def test_no_module_imports_itself_round_about() -> None:
    graph = module_graph()
    assert "evals.runner" in graph and "evals.generation" in graph["evals.runner"]
    assert cycles(graph) == []
    graph["evals.generation"].add("evals.runner")  # the check can fail: a planted cycle is found
    planted = cycles(graph)
    assert planted and all(c[0] == c[-1] for c in planted)
    assert any({"evals.generation", "evals.runner"} <= set(c) for c in planted)


TORCH_FREE = """
import sys
import evals.models.yamlspec, evals.suite, evals.gates, evals.records, evals.cli, evals.reports.html
from evals.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
code = main(["validate", "smoke", "fp8-e4m3-rowwise", "--model", "none"])
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH" if loaded else "NO TORCH", code)
"""


def test_help_validate_and_the_data_modules_load_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.strip().splitlines()[-1] == "NO TORCH 0", done.stdout[-2000:] + done.stderr[-2000:]
