"""Shared fixtures. Hub access is switched off before any Hugging Face library is imported.
GPU tests are skipped on CPU-only machines by the evals pytest plugin (evals/pytest_plugin.py)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "suites"
TEST_SUITES = REPO / "tests" / "suites"
"""The tests' light suites: `smoke.yaml` there is a few-second copy of the CI gate for engine tests."""


@pytest.fixture(scope="session")
def tiny_model():
    """The built-in tiny reference pipeline on the CPU (built once; tests must not modify it)."""
    from evals.models.sources import load_source

    return load_source("tiny", "float32", "cpu")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory: MLflow's default store and runs/ land here, the cache beside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("EVALS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished light smoke run (16 records), started with relative suite and policy paths from a
    folder of its own, without MLflow. Tests copy it before changing anything; a resume of a copy
    starts from another working directory."""
    from evals.cli import main

    home = tmp_path_factory.mktemp("finished")
    write(home / "suite.yaml", (TEST_SUITES / "smoke.yaml").read_text())
    write(home / "policy.yaml", (REPO / "models" / "policies" / "fp8-e4m3-rowwise.yaml").read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)
        patch.setenv("EVALS_CACHE_DIR", str(home / "cache"))
        assert main(["run", "suite.yaml", "--policy", "policy.yaml", "--no-mlflow", "--no-progress"]) == 0
    (run_dir,) = (home / "runs").iterdir()
    return run_dir
