"""MLflow as a review tool: no run left RUNNING, a resume goes on in its own MLflow run, headline
metrics and names that say the verdict, `evals ui` that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals import mlflow_review
from evals.tracking import MlflowTracker


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_an_interrupted_run_ends_killed_and_a_resume_reopens_it(workdir: Path) -> None:
    state = workdir / "run" / "mlflow.json"
    state.parent.mkdir()
    tracker = MlflowTracker()
    tracker.start_run("suite-a", "suite-a: running", {"model": "tiny"}, {}, state)
    tracker.start_candidate("cand", {"policy": "cand"})
    saved = json.loads(state.read_text())
    assert saved["complete"] is False and saved["candidates"] == {"cand": tracker.candidate_ids["cand"]}
    tracker.interrupted()
    client = tracker.client
    assert client.get_run(tracker.parent_id).info.status == "KILLED"
    assert client.get_run(tracker.candidate_ids["cand"]).info.status == "KILLED"

    again = MlflowTracker()  # the resume: same run directory, same store
    again.start_run("suite-a", "suite-a: running", {"model": "tiny"}, {}, state)
    again.start_candidate("cand", {"policy": "cand"})
    assert (again.parent_id, again.candidate_ids) == (tracker.parent_id, tracker.candidate_ids)
    assert again.reopened and client.get_run(again.parent_id).info.status == "RUNNING"
    again.finish_run([], {"verdict": "pass"}, failed=False, metrics={"cand/psnr_mean": 30.0}, name="suite-a: PASS")
    run = client.get_run(again.parent_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "suite-a: PASS"
    assert json.loads(state.read_text())["complete"] is True
    experiment = client.get_experiment_by_name("suite-a")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # one parent, one candidate: no second run


def test_a_run_whose_process_died_is_ended_by_the_next_run(workdir: Path) -> None:
    tracker = MlflowTracker()
    tracker.start_run("suite-b", "suite-b: running", {}, {})
    client, orphan = tracker.client, tracker.parent_id
    client.set_tag(orphan, mlflow_review.PID_TAG, str(dead_pid()))  # as if kill -9 had ended its process
    alive = MlflowTracker()
    alive.start_run("suite-b", "suite-b: running", {}, {})  # this process: alive, left alone
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(alive.parent_id).info.status == "RUNNING"
    assert client.get_run(tracker.parent_id).data.tags[mlflow_review.HOST_TAG] == socket.gethostname()


def test_headline_metrics_name_each_candidate_and_count_failed_gates() -> None:
    from evals.records import PolicySummary

    summaries = {
        "a": PolicySummary(n=2, metrics={"psnr": {"mean": 31.0, "min": 30.0}}, detectors={}, reference_detectors={}),
        "b": PolicySummary(n=2, metrics={"psnr": {"mean": 12.0, "min": 9.0}}, detectors={}, reference_detectors={}),
    }
    verdict = {
        "passed": False,
        "results": [
            {"policy": "a", "passed": True, "severity": "fail"},
            {"policy": "b", "passed": False, "severity": "fail"},
            {"policy": "b", "passed": False, "severity": "fail"},
            {"policy": "a", "passed": False, "severity": "warn"},  # a warning fails nothing
        ],
    }
    metrics = mlflow_review.headline_metrics(summaries, verdict, ["a", "b"])
    assert metrics == {
        "a/psnr_mean": 31.0,
        "a/gates_failed": 0.0,
        "b/psnr_mean": 12.0,
        "b/gates_failed": 2.0,
        "candidates_failed": 1.0,
        "passed": 0.0,
    }
    assert mlflow_review.run_name("smoke", verdict, ["a", "b"]) == "smoke: FAIL b"
    assert mlflow_review.run_name("smoke", {"passed": True, "results": []}, ["a", "b"]) == "smoke: PASS (2 candidates)"


def test_the_review_url_opens_the_runs_table_in_the_saved_view() -> None:
    url = mlflow_review.experiment_url("http://127.0.0.1:5000/", "7")
    assert url == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=evals-review&workflowType=machine_learning"
    )
    view = mlflow_review.review_view(["rowwise"], ["psnr", "ssim"])
    assert view["selectedColumns"][:5] == [
        "tags.`verdict`",
        "tags.`policy`",
        "metrics.`candidates_failed`",
        "metrics.`psnr_mean`",
        "metrics.`ssim_mean`",
    ]
    assert "metrics.`rowwise/ssim_mean`" in view["selectedColumns"] and view["orderByAsc"] is False
    assert set(view["columnOrder"]) == set(view["columnWidths"])  # MLflow sizes only the ordered columns


@pytest.mark.slow
def test_evals_ui_stops_its_server_with_itself(workdir: Path) -> None:
    """SIGTERM to `evals ui` (not to its process group) leaves no MLflow process and a free port."""
    import urllib.request

    MlflowTracker(f"sqlite:///{workdir / 'ui.db'}").start_run("smoke", "smoke: running", {}, {})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'ui.db'}"}
    ui = subprocess.Popen(
        [sys.executable, "-m", "evals", "ui", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    group = None
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI did not answer within 90 s"
                assert ui.poll() is None, "evals ui exited"
                time.sleep(0.5)
        children = subprocess.run(["pgrep", "-P", str(ui.pid)], capture_output=True, text=True).stdout.split()
        group = int(children[0])  # the server leads its own process group
        ui.send_signal(signal.SIGTERM)
        _, err = ui.communicate(timeout=30)
        assert f"smoke: http://127.0.0.1:{port}/#/experiments/" in err and "viewStateShareKey=evals-review" in err
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)  # nothing of the server is left
        with socket.socket() as s:
            # SO_REUSEADDR: a connection of ours left in TIME_WAIT does not count, a listener still would
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # and its port is free
            s.listen()
    finally:
        if ui.poll() is None:
            ui.kill()
        if group is not None:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_view_keeps_earlier_runs_candidates_newest_first(workdir: Path) -> None:
    tracker = MlflowTracker()
    tracker.start_run("suite-c", "suite-c: running", {}, {})
    client, experiment = tracker.client, tracker.experiment_id
    mlflow_review.save_review_view(client, experiment, ["old-build", "rowwise"], ["psnr"])
    mlflow_review.save_review_view(client, experiment, ["new-build", "rowwise"], ["psnr"])
    view = json.loads(client.get_experiment(experiment).tags[mlflow_review.VIEW_TAG])
    prefixed = [c for c in view["selectedColumns"] if c.endswith("/psnr_mean`")]
    assert prefixed == ["metrics.`new-build/psnr_mean`", "metrics.`rowwise/psnr_mean`", "metrics.`old-build/psnr_mean`"]
