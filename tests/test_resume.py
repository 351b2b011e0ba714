"""Interrupted runs keep every finished sample, and `evals run --resume` finishes them to the same
records an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import evals.records
from evals.cli import main
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
    lock = json.loads((records.parent / ".lock").read_text())  # left by the killed process: stale
    assert lock["pid"] == process.pid
    assert main(["run", "--resume", str(records.parent), "--no-progress"]) == 0
    assert len(scored(records.parent)) == 24 and not (records.parent / ".lock").exists()

    from mlflow import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([killed["run_id"], *killed["candidates"].values()])
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert json.loads((records.parent / "mlflow.json").read_text())["complete"] is True

    assert main(["run", str(suite), *FAST, "--runs-dir", str(workdir / "whole")]) == 0
    (whole,) = (workdir / "whole").iterdir()
    assert scored(records.parent) == scored(whole)


def record_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def _delete(run_dir: Path, record: dict, key: str) -> None:
    (run_dir / record[key]).unlink()


def _truncate(run_dir: Path, record: dict, key: str) -> None:
    image = run_dir / record[key]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])


def _append(run_dir: Path, data: bytes) -> None:
    with (run_dir / "records.jsonl").open("ab") as f:
        f.write(data)


# How a run directory can be found on resume, and what a resume must still make of it.
DAMAGE = {
    "candidate image deleted": lambda d, r: _delete(d, r[3], "image"),
    "reference image deleted": lambda d, r: _delete(d, r[5], "reference_image"),
    "candidate image half-written": lambda d, r: _truncate(d, r[7], "image"),
    "NUL bytes as the last record": lambda d, r: _append(d, b"\x00" * 300),
    "torn last record": lambda d, r: _append(d, json.dumps(r[0]).encode()[:90]),
    "garbage line in the middle": lambda d, r: (d / "records.jsonl").write_bytes(
        b"\n".join(json.dumps(x).encode() for x in r[:4])
        + b"\n\xff\xfe{not json\n"
        + b"".join(json.dumps(x).encode() + b"\n" for x in r[4:])
    ),
    "records counted twice": lambda d, r: _append(d, b"".join(json.dumps(x).encode() + b"\n" for x in r[:5])),
    "record naming a file outside": lambda d, r: _append(
        d, json.dumps({**r[2], "image": "../../../outside.png"}).encode() + b"\n"
    ),
    "record of another suite": lambda d, r: _append(d, json.dumps({**r[2], "sample_id": "other-s0"}).encode() + b"\n"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_resume_repairs_and_ends_with_an_uninterrupted_runs_records(
    finished: Path, workdir: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    run_dir = workdir / finished.name
    shutil.copytree(finished, run_dir)
    for done in ("verdict.json", "summary.json", "report.html"):
        (run_dir / done).unlink(missing_ok=True)
    DAMAGE[damage](run_dir, record_lines(finished))
    assert main(["run", "--resume", str(run_dir), *FAST]) == 0
    lines = record_lines(run_dir)
    assert len(lines) == 16 and len({(r["policy"], r["sample_id"]) for r in lines}) == 16  # none twice
    assert scored(run_dir) == scored(finished)
    assert all(Image.open(run_dir / r[k]).size == (64, 64) for r in lines for k in ("image", "reference_image"))
    assert json.loads((run_dir / "verdict.json").read_text())["passed"]
    assert "dropped line" in caplog.text
    assert not (run_dir / ".lock").exists() and not (workdir / "outside.png").exists()


def test_resume_refuses_a_changed_suite_or_no_run(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = write(workdir / "suite.yaml", (TEST_SUITES / "smoke.yaml").read_text())
    assert main(["run", str(suite), *FAST]) == 0
    (run_dir,) = (workdir / "runs").iterdir()
    suite.write_text(suite.read_text().replace("value: 30", "value: 31"))
    assert main(["run", "--resume", str(run_dir), *FAST]) == 2
    assert "changed since the run started" in capsys.readouterr().err
    assert main(["run", "--resume", str(workdir), *FAST]) == 2
    assert main(["run", str(suite), "--resume", str(run_dir), *FAST]) == 2
