"""Interrupted runs keep every finished sample, and `evals run --resume` finishes them to the same
records an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evals.records
from evals.cli import main
from evals.records import drop_torn_tail
from tests.conftest import REPO, TEST_SUITES, write

FAST = ["--no-mlflow", "--no-progress"]


def scored(run_dir: Path) -> dict[tuple[str, str], dict]:
    """What a record says about its sample, without the timing."""
    out = {}
    for line in (run_dir / "records.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[(record["policy"], record["sample_id"])] = {
            k: record[k] for k in ("metrics", "detectors", "reference_detectors", "image", "reference_image")
        }
    return out


def test_a_crash_keeps_finished_samples_and_resume_finishes_them(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = str(TEST_SUITES / "smoke.yaml")
    assert main(["run", suite, *FAST, "--runs-dir", str(workdir / "whole")]) == 0
    (whole,) = (workdir / "whole").iterdir()

    original_write = evals.records.RecordsWriter.write
    calls = {"n": 0}

    def crash_after_six(self, record):
        if calls["n"] == 6:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        original_write(self, record)

    monkeypatch.setattr(evals.records.RecordsWriter, "write", crash_after_six)
    assert main(["run", suite, *FAST]) == 3
    assert "every finished sample is in" in capsys.readouterr().err
    (broken,) = (workdir / "runs").iterdir()
    assert len(scored(broken)) == 6 and not (broken / "verdict.json").exists()

    monkeypatch.setattr(evals.records.RecordsWriter, "write", original_write)
    assert main(["run", "--resume", str(broken), *FAST]) == 0
    out = capsys.readouterr().out
    assert "candidate images: 12" in out  # the unfinished batches (8 samples) plus the torn batch again
    assert scored(broken) == scored(whole)
    assert json.loads((broken / "verdict.json").read_text())["passed"]


def test_a_crash_in_generation_keeps_the_batch_being_written(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Batch k is scored and written by a worker while batch k+1 generates: a crash in that
    generation still leaves batch k (and every earlier one) complete on disk."""
    import evals.runner

    original_generate = evals.runner.generate
    calls = {"n": 0}

    def crash_on_fifth(pipe, batch, gen):  # reference + candidate per batch: the 5th starts batch 3
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original_generate(pipe, batch, gen)

    monkeypatch.setattr(evals.runner, "generate", crash_on_fifth)
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), *FAST]) == 3
    assert "simulated crash" in capsys.readouterr().err
    (broken,) = (workdir / "runs").iterdir()
    records = scored(broken)
    assert len(records) == 8  # two whole batches of 4
    assert all((broken / r["image"]).is_file() and (broken / r["reference_image"]).is_file() for r in records.values())


def test_kill_9_mid_run_then_resume(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed mid-run: the resume finishes the records as one whole run makes them, and goes on in
    the same MLflow runs (no second run of the same name, none left RUNNING)."""
    smoke = (TEST_SUITES / "smoke.yaml").read_text()
    suite = write(workdir / "longer.yaml", smoke.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    store = f"sqlite:///{workdir / 'mlflow.db'}"  # absolute: MLflow caches stores by URI in-process
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "evals", "run", str(suite), "--no-progress"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = None
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        found = list((workdir / "runs").glob("*/records.jsonl")) if (workdir / "runs").exists() else []
        started = found and (found[0].parent / "mlflow.json").is_file()
        if started and len(found[0].read_bytes().splitlines()) >= 5:
            records = found[0]
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert records is not None, "the run finished before it could be killed"
    kept = len(records.read_bytes().splitlines())
    assert 5 <= kept < 24
    killed = json.loads((records.parent / "mlflow.json").read_text())
    assert killed["complete"] is False
    assert main(["run", "--resume", str(records.parent), "--no-progress"]) == 0
    assert len(scored(records.parent)) == 24

    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([killed["run_id"], *killed["candidates"].values()])
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert json.loads((records.parent / "mlflow.json").read_text())["complete"] is True

    assert main(["run", str(suite), *FAST, "--runs-dir", str(workdir / "whole")]) == 0
    (whole,) = (workdir / "whole").iterdir()
    assert scored(records.parent) == scored(whole)


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    assert drop_torn_tail(path) and path.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert not drop_torn_tail(path)


def test_resume_refuses_a_changed_suite_or_no_run(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = write(workdir / "suite.yaml", (TEST_SUITES / "smoke.yaml").read_text())
    assert main(["run", str(suite), *FAST]) == 0
    (run_dir,) = (workdir / "runs").iterdir()
    suite.write_text(suite.read_text().replace("value: 30", "value: 31"))
    assert main(["run", "--resume", str(run_dir), *FAST]) == 2
    assert "changed since the run started" in capsys.readouterr().err
    assert main(["run", "--resume", str(workdir), *FAST]) == 2
    assert main(["run", str(suite), "--resume", str(run_dir), *FAST]) == 2
