"""MLflow trouble never costs a run: concurrent runs share one fresh sqlite store, and a tracking
server that refuses, fails (HTTP 500) or hangs costs a few seconds (EVALS_MLFLOW_TIMEOUT) and a
warning, with MLflow's own defaults (7 retries with backoff: about four minutes) in place; the
results stay in the run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evals.cli import main
from tests.conftest import REPO, TEST_SUITES

SMOKE = str(TEST_SUITES / "smoke.yaml")
MLFLOW_SLACK_S = 20
"""What MLflow trouble may add to the smoke run, with its 5-second default budget and two shared
cores (with MLflow's own defaults it added about 240 s)."""


@pytest.fixture
def mlflow_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLFLOW_HTTP_REQUEST_* and no EVALS_MLFLOW_TIMEOUT: what a user has by default. Whatever a
    run sets there (its fail-fast defaults) is undone afterwards."""
    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
        "EVALS_MLFLOW_TIMEOUT",
    ):
        monkeypatch.setenv(name, "")  # recorded: teardown puts back what was there before
        monkeypatch.delenv(name)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeServer(BaseHTTPRequestHandler):
    """Answers `/health` with `health`, and every other request with `status` (an empty JSON
    object), or, with `hang` set, never."""

    health = 500
    status = 500
    hang: threading.Event | None = None

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.hang is not None:
            self.hang.wait()
            return
        status = self.health if self.path.rstrip("/").endswith("/health") else self.status
        body = b"{}"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def fake_server(health: int = 500, status: int = 500) -> Iterator[tuple[str, type[FakeServer]]]:
    """(its URI, its handler class: set `status` or `hang` to change what it does next)."""

    class Handler(FakeServer):
        pass

    handler = Handler
    handler.health, handler.status = health, status
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        if handler.hang is not None:
            handler.hang.set()
        server.shutdown()
        server.server_close()


@contextmanager
def hanging_server() -> Iterator[str]:
    """A port that accepts connections (the kernel does, for a listening socket) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def assert_mlflow_cost_bounded(run_dir: Path, elapsed: float) -> None:
    """MLflow trouble costs a run waits only: at its end, for its tracker (timings.json's
    `finishing.mlflow`), and any wall time its own timings do not cover (start-up, generation,
    waiting for scores, finishing). Both are bounded. (The same run with --no-mlflow is no yardstick
    on shared cores: two such runs here generated in 6 and 58 s.)"""
    timings = json.loads((run_dir / "timings.json").read_text())
    uncovered = elapsed - sum(timings[k] for k in ("startup", "generation", "waiting", "finishing"))
    assert timings["finishing.mlflow"] < MLFLOW_SLACK_S and uncovered < MLFLOW_SLACK_S, (elapsed, timings)


def run_without_mlflow_view(workdir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, float, str]:
    """The smoke run, with MLflow unavailable: (its run directory, its wall time, its warnings)."""
    start = time.perf_counter()
    assert main(["run", SMOKE, "--no-progress"]) == 0
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    assert "warning: MLflow is unavailable" in captured.err and "verdict: PASSED" in captured.out
    assert "`evals log RUN_DIR` uploads them later" in captured.err
    (run_dir,) = (workdir / "runs").iterdir()
    assert len((run_dir / "records.jsonl").read_text().splitlines()) == 16
    assert json.loads((run_dir / "verdict.json").read_text())["passed"]
    assert all((run_dir / name).is_file() for name in ("report.html", "summary.json", "summary.md", "junit.xml"))
    assert not (run_dir / "mlflow.json").exists()  # never reached MLflow
    return run_dir, elapsed, captured.err


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
    assert not any("warning: MLflow" in out for out in outputs), outputs
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 3 and len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["run_dir"] for r in parents}) == 3


def test_an_unreachable_tracking_server_costs_only_the_mlflow_view(
    workdir: Path,
    mlflow_defaults: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir, elapsed, warnings = run_without_mlflow_view(workdir, capsys)
    assert f"MLflow is unavailable ({uri}: Connection refused)" in warnings
    assert_mlflow_cost_bounded(run_dir, elapsed)

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


def test_a_hanging_tracking_server_costs_the_run_its_budget_at_most(
    workdir: Path,
    mlflow_defaults: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The worst case: a server that accepts and never answers spends the whole default budget (a
    refused connection or an HTTP 500 gives up at once: the tests below; the run after that is the
    one above)."""
    with hanging_server() as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        run_dir, elapsed, warnings = run_without_mlflow_view(workdir, capsys)
    assert f"MLflow is unavailable ({uri}: no answer within 5 s (EVALS_MLFLOW_TIMEOUT))" in warnings
    assert_mlflow_cost_bounded(run_dir, elapsed)


@pytest.mark.parametrize("server", ["refuses", "answers-500", "healthy-but-its-api-answers-500"])
def test_opening_a_failing_server_gives_up_at_once(
    server: str, mlflow_defaults: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow  # noqa: F401 - imported before the clock starts

    from evals.mlflow_reach import MlflowUnavailable, open_mlflow

    with fake_server(health=200 if server.startswith("healthy") else 500) as (uri, _):
        uri = f"http://127.0.0.1:{closed_port()}" if server == "refuses" else uri
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        start = time.perf_counter()
        with pytest.raises(Exception) as raised:
            open_mlflow(5.0)
        elapsed = time.perf_counter() - start
    assert elapsed < 2, elapsed  # MLflow's own retries and backoff: about four minutes
    expected = {
        "refuses": f"{uri}: Connection refused",
        "answers-500": f"{uri}/health answered HTTP 500",
        "healthy-but-its-api-answers-500": "too many 500 error responses",  # MLflow's request, not retried
    }[server]
    assert expected in str(raised.value)
    assert raised.type is MlflowUnavailable or server.startswith("healthy")


def test_evals_mlflow_timeout_sets_the_budget(mlflow_defaults: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow  # noqa: F401 - imported before the clock starts

    from evals.background_tracker import open_mlflow_in_background
    from evals.tracker_protocol import NullTracker

    monkeypatch.setenv("EVALS_MLFLOW_TIMEOUT", "1")
    with hanging_server() as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        start = time.perf_counter()
        tracker = open_mlflow_in_background()
        tracker.wait()  # until it has opened, or given up
        elapsed = time.perf_counter() - start
    assert 0.9 < elapsed < 3, elapsed
    assert isinstance(tracker.inner, NullTracker) and tracker.baselines("smoke", ["fp8"]) is None
    # MLflow's requests for the rest of the run: one try each, within the budget (whole seconds).
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"


@pytest.mark.parametrize("trouble", ["answers-500", "hangs"])
def test_a_server_that_fails_mid_run_costs_one_request(
    trouble: str, mlflow_defaults: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened fine, then the server breaks: the next request fails within the budget (not after
    MLflow's retries), tracking stops, and the run's later calls return at once."""
    from evals.background_tracker import mlflow_tracker, open_mlflow_in_background
    from evals.tracking import MlflowTracker

    monkeypatch.setenv("EVALS_MLFLOW_TIMEOUT", "1")
    with fake_server(health=200, status=200) as (uri, handler):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracker = open_mlflow_in_background()
        tracker.wait()
        assert isinstance(tracker.inner, MlflowTracker)
        if trouble == "hangs":
            handler.hang = threading.Event()
        else:
            handler.status = 500
        start = time.perf_counter()
        tracker.start_run("smoke", "smoke: running", {"suite": "smoke"}, {})
        tracker.start_candidate("fp8", {})
        tracker.finish_candidate("fp8", {"psnr_mean": 30.0}, {}, [], {})
        tracker.finish_run([], {"verdict": "pass"}, failed=False)
        elapsed = time.perf_counter() - start
    assert elapsed < 3, elapsed
    assert tracker.failed and ("timed out" in tracker.failed if trouble == "hangs" else "500" in tracker.failed)
    assert mlflow_tracker(tracker) is None


def test_the_users_mlflow_settings_win_and_local_stores_are_left_alone(
    mlflow_defaults: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from evals import mlflow_reach

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    mlflow_reach.set_fail_fast_defaults(2.5)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")

    opened: list[object] = []

    def tracker(*args: object) -> str:
        opened.append(args)
        return "tracker"

    monkeypatch.setattr("evals.tracking.MlflowTracker", tracker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow_reach.open_mlflow(0.001) == "tracker" and opened == [()]  # as before: no probe, no clock
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


@pytest.mark.parametrize("value", ["soon", "-1", "0", "nan", "inf", "5s", "3601"])
def test_a_bad_evals_mlflow_timeout_is_an_input_error(
    value: str,
    workdir: Path,
    mlflow_defaults: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from evals.mlflow_reach import budget
    from evals.models.yamlspec import InputError

    monkeypatch.setenv("EVALS_MLFLOW_TIMEOUT", value)
    with pytest.raises(InputError, match=r"EVALS_MLFLOW_TIMEOUT.*positive number"):
        budget()
    if value == "soon":  # the whole way: exit code 2 before any work, nothing written
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
        assert main(["run", SMOKE, "--no-progress"]) == 2
        assert "EVALS_MLFLOW_TIMEOUT='soon'" in capsys.readouterr().err
        assert not (workdir / "runs").exists()


def test_the_budget_defaults_to_five_seconds(mlflow_defaults: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from evals.mlflow_reach import budget

    assert budget() == 5.0
    monkeypatch.setenv("EVALS_MLFLOW_TIMEOUT", " 2.5 ")
    assert budget() == 2.5
    monkeypatch.setenv("EVALS_MLFLOW_TIMEOUT", "3600")
    assert budget() == 3600
