"""pytest plugin (entry point `pytest11: evals`): options, markers and fixtures for quantization
regression tests. It only wires; the work is in `evals.api` and `evals.testing`, imported lazily so
that loading the plugin costs nothing in test suites that do not use it.

    def test_fp8_build_still_passes(evals_run):
        assert_gates(evals_run)

Options: --evals-suite, --evals-model, --evals-policy (repeatable), --evals-regen.
ini keys: evals_suite (default suites/smoke.yaml), evals_baselines (default tests/baselines).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

MARKERS = {
    "gpu": "needs a CUDA GPU; skipped cleanly where there is none",
    "slow": "takes more than a few seconds",
    "quant_regression": "checks an FP8 build against its reference with the evals harness",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("evals", "FP8 quantization regression checks (sd35-fp8-gate)")
    group.addoption("--evals-suite", help="suite YAML for the evals_run fixture (default: ini evals_suite)")
    group.addoption("--evals-model", help="model source (default: the suite's)")
    group.addoption(
        "--evals-policy", action="append", default=[], help="candidate policy; repeatable (default: the suite's)"
    )
    group.addoption("--evals-regen", action="store_true", help="rewrite golden metric baselines instead of comparing")
    parser.addini("evals_suite", "default suite for evals_run", default="suites/smoke.yaml")
    parser.addini("evals_baselines", "folder of golden metric baselines", default="tests/baselines")


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


def _suite_path(config: pytest.Config) -> Path:
    """The suite relative to the project's root; a shipped suite's name (or `suites/NAME.yaml` in
    a project that has no such file) is the suite installed with the package."""
    from evals.suite import suite_path

    value = config.getoption("--evals-suite") or config.getini("evals_suite")
    path = Path(value)
    local = path if path.is_absolute() else Path(config.rootpath) / path
    return local if local.exists() else suite_path(value)


@pytest.fixture(scope="session")
def evals_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Run the suite once per test session; returns an `evals.testing.EvalsResult`."""
    from evals.api import RunRequest, run_suite_file
    from evals.records import read_records
    from evals.testing import EvalsResult

    config = request.config
    outcome, suite, _ = run_suite_file(
        RunRequest(
            suite=_suite_path(config),
            model=config.getoption("--evals-model"),
            policies=list(config.getoption("--evals-policy")),
            runs_dir=tmp_path_factory.mktemp("evals-runs"),
            mlflow=False,
            progress=False,
        )
    )
    records = list(read_records(outcome.run_dir / "records.jsonl"))
    return EvalsResult(outcome.run_dir, records, outcome.summaries, outcome.verdict, suite.name)


@pytest.fixture(scope="session")
def reference_pipeline(request: pytest.FixtureRequest) -> Any:
    """The suite's reference model (`evals.models.sources.LoadedModel`: `.pipeline`, `.fingerprint`)."""
    from evals.api import resolve_device
    from evals.models.sources import load_source, resolved_dtype_name
    from evals.suite import load_suite

    suite = load_suite(_suite_path(request.config))
    device = resolve_device("auto")
    source = request.config.getoption("--evals-model") or suite.model
    return load_source(source, resolved_dtype_name(suite.reference_dtype, device), device)


@pytest.fixture(scope="session")
def candidate_pipeline(request: pytest.FixtureRequest, reference_pipeline: Any) -> Any:
    """Factory: `candidate_pipeline("fp8-e4m3-rowwise")` -> `evals.candidates.Candidate` (`.pipeline`, `.plan`)."""
    from evals.candidates import build_candidate
    from evals.models.precision import load_policy
    from evals.suite import load_suite

    generation = load_suite(_suite_path(request.config)).generation

    def build(policy: str) -> Any:
        return build_candidate(reference_pipeline, load_policy(policy), generation)

    return build


@pytest.fixture
def evals_baseline(request: pytest.FixtureRequest) -> Any:
    """`evals_baseline(result)` compares with `<evals_baselines>/<suite>-<policies>.json` (see
    `evals.testing.assert_matches_baseline`); --evals-regen rewrites it."""
    from evals.testing import EvalsResult, assert_matches_baseline

    folder = Path(request.config.rootpath) / request.config.getini("evals_baselines")

    def check(result: EvalsResult, name: str | None = None) -> None:
        stem = name or f"{result.suite_name}-{'+'.join(sorted(result.summaries))}"
        assert_matches_baseline(result, folder / f"{stem}.json", regen=request.config.getoption("--evals-regen"))

    return check
