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
    assert not (run_dir / "mlflow.json").exists()  # never reached MLflow

    # Later, with a store that works: `evals log` gives MLflow the whole run, once.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'later.db'}")
    assert main(["log", str(run_dir)]) == 0
    logged = json.loads((run_dir / "mlflow.json").read_text())
    from mlflow import MlflowClient

    client = MlflowClient(logged["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_id == logged["run_id"] and parent.data.tags["verdict"] == "pass"
    assert parent.data.params["suite"] == "smoke" and parent.data.tags["logged_later"] == "true"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert child.data.metrics["psnr_mean"] == pytest.approx(
        summary["policies"]["fp8-e4m3-rowwise"]["metrics"]["psnr"]["mean"]
    )
    assert len(client.list_artifacts(child.info.run_id, "images")) >= 16
    assert len(client.list_artifacts(parent.info.run_id, "images")) >= 16
    assert "samples.json" in {a.path for a in client.list_artifacts(child.info.run_id)}

    capsys.readouterr()
    assert main(["log", str(run_dir)]) == 2  # a second upload would duplicate the run
    assert "already in MLflow as run" in capsys.readouterr().err
    assert main(["log", str(run_dir), "--force"]) == 0
    assert len(client.search_runs([client.get_experiment_by_name("smoke").experiment_id])) == 4


def test_log_refuses_an_unfinished_run(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = workdir / "runs" / "20260101T000000Z-smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{}")
    assert main(["log", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "verdict.json is missing" in err and "--resume" in err
