"""The import graph keeps its layers: `models/` (the SD3 pipeline, FP8 layers, policies) imports
nothing from `evals/` or `reports/`; the modules that promise not to load torch do not."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", sorted((REPO / "models").rglob("*.py")), ids=lambda p: p.name)
def test_models_import_nothing_from_evals_or_reports(path: Path) -> None:
    assert not imported_packages(path) & {"evals", "reports"}


def test_the_check_sees_an_import() -> None:
    assert imported_packages(REPO / "evals" / "api.py") >= {"evals", "models"}


TORCH_FREE = """
import sys
import models.yamlspec, evals.suite, evals.gates, evals.records, evals.cli, reports.render
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
