"""MLflow trouble never costs a run: concurrent runs share one fresh sqlite store, and an unreachable
tracking server leaves the results in the run directory with a warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals.cli import main
from tests.conftest import REPO, SUITES


@pytest.mark.slow
def test_four_concurrent_runs_all_land_in_one_new_sqlite_store(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "evals", "run", str(SUITES / "smoke.yaml"), "--no-progress"],
            cwd=tmp_path,
            env={**env, "EVALS_CACHE_DIR": str(tmp_path / f"cache{i}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], outputs
    assert not any("warning: MLflow" in out for out in outputs)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 4 and len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["run_dir"] for r in parents}) == 4


def test_an_unreachable_tracking_server_costs_only_the_mlflow_view(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    assert main(["run", str(SUITES / "smoke.yaml"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning: MLflow is unavailable" in captured.err and "verdict: PASSED" in captured.out
    (run_dir,) = (workdir / "runs").iterdir()
    assert len((run_dir / "records.jsonl").read_text().splitlines()) == 16
    assert json.loads((run_dir / "verdict.json").read_text())["passed"]
