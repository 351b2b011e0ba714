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
from tests.conftest import REPO, TEST_SUITES


@pytest.mark.slow
def test_concurrent_runs_all_land_in_one_new_sqlite_store(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # The store is what they share: one seed and one step each keep the images out of the way; three
    # processes on two cores already race for its creation and migration.
    light = (TEST_SUITES / "smoke.yaml").read_text().replace("seeds: [0, 1]", "seeds: [0]")
    suite = tmp_path / "smoke.yaml"
    suite.write_text(light.replace("steps: 4", "steps: 1"))
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "evals", "run", str(suite), "--no-progress"],
            cwd=tmp_path,
            env={**env, "EVALS_CACHE_DIR": str(tmp_path / f"cache{i}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert not any("warning: MLflow" in out for out in outputs)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 3 and len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["run_dir"] for r in parents}) == 3


def test_an_unreachable_tracking_server_costs_only_the_mlflow_view(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), "--no-progress"]) == 0
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


class SlowImages:
    """A tracker whose image logging takes a while; it records what ran when, and how many at once."""

    def __init__(self) -> None:
        import threading

        self.events: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def start_run(self, *args: object) -> None:
        self.events.append("start_run")

    def start_candidate(self, policy: str, params: object) -> None:
        self.events.append(f"start {policy}")

    def log_candidate_image(self, policy: str, sample_id: str, path: object, reference: object) -> None:
        import time

        assert f"start {policy}" in self.events  # its run exists before an image goes to it
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.05)
        with self._lock:
            self.running -= 1
            self.events.append(f"image {sample_id}")

    def finish_candidate(self, policy: str, *args: object) -> None:
        self.events.append(f"finish {policy}")


def test_background_tracking_logs_images_side_by_side_and_finishes_after_them() -> None:
    from evals.background_tracker import BackgroundTracker

    inner = SlowImages()
    tracker = BackgroundTracker(lambda: inner)
    tracker.start_run("suite", "run", {}, {})
    tracker.start_candidate("fp8", {})
    for i in range(8):
        tracker.log_candidate_image("fp8", f"s{i}", None, None)
    tracker.finish_candidate("fp8", {}, {}, [], {})  # waits for everything queued, images included
    assert inner.events[-1] == "finish fp8"
    assert sorted(e for e in inner.events if e.startswith("image")) == [f"image s{i}" for i in range(8)]
    assert inner.most_at_once > 1
