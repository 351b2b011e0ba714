"""`noise_floor`: the reference scored against itself under a harmless change, shown beside every
candidate and never gated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.cli import main
from tests.conftest import TEST_SUITES, write

FAST = ["--no-mlflow", "--no-progress", "--no-cache"]


def noise_floor_suite(workdir: Path, value: str) -> Path:
    text = (
        (TEST_SUITES / "smoke.yaml")
        .read_text()
        .replace("metrics: [psnr, ssim]", f"metrics: [psnr, ssim]\nnoise_floor: {value}")
    )
    return write(workdir / "smoke.yaml", text)


@pytest.mark.slow
def test_the_noise_floor_is_scored_shown_and_never_gated(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = noise_floor_suite(workdir, "true")
    assert main(["run", str(suite), *FAST]) == 0
    out = capsys.readouterr().out
    assert "noise floor" in out.splitlines()[0]  # a column of the gate table
    (run_dir,) = (workdir / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())["policies"]
    floor, candidate = summary["noise-floor"]["metrics"]["psnr"], summary["fp8-e4m3-rowwise"]["metrics"]["psnr"]
    assert summary["noise-floor"]["n"] == summary["fp8-e4m3-rowwise"]["n"] == 16
    assert floor["min"] > candidate["max"] + 10  # batch composition moves pixels far less than FP8 does
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert {r["policy"] for r in verdict["results"]} == {"fp8-e4m3-rowwise"}
    assert "noise floor" in (run_dir / "report.html").read_text()

    # A finished run with a noise floor resumes to the same records (nothing left to do).
    before = (run_dir / "records.jsonl").read_text()
    assert main(["run", "--resume", str(run_dir), *FAST]) == 0
    assert (run_dir / "records.jsonl").read_text() == before


def test_a_float32_noise_floor_of_a_float32_reference_is_refused(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = noise_floor_suite(workdir, "float32")
    assert main(["run", str(suite), *FAST, "--reference-dtype", "float32"]) == 2
    assert "changes nothing" in capsys.readouterr().err
    assert not (workdir / "runs").exists()
