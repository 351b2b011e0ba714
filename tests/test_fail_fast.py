"""`--fail-fast`: a candidate stops once a gate of it can no longer pass, the verdict unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evals.cli import main
from evals.fail_fast import failed_for_good
from evals.gates import GateResult
from evals.suite_types import GateSpec
from tests.conftest import TEST_SUITES, write

SMOKE = (TEST_SUITES / "smoke.yaml").read_text()
FAST = ["--no-progress", "--no-mlflow", "--fail-fast"]


def result(stat: str, op: str, value: float, actual: float, **gate: object) -> GateResult:
    spec = GateSpec(stat, op, value, metric="psnr", **gate)  # type: ignore[arg-type]
    passed = {">=": actual >= value, ">": actual > value, "<=": actual <= value, "<": actual < value}.get(
        op, actual == value
    )
    return GateResult("cand", spec, actual, passed, "" if passed else "failed")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (result("min", ">=", 15, 9.0), True),  # a minimum only falls
        (result("max", "<=", 0.5, 0.7), True),  # a maximum only rises
        (result("count", "<=", 2, 3), True),  # a count only grows
        (result("count", "==", 0, 1), True),
        (result("count", "==", 3, 1), False),  # below 3 now, may reach it
        (result("min", "<=", 15, 20), False),  # a minimum may still fall below
        (result("mean", ">=", 30, 25), False),  # a mean moves either way
        (result("p05", ">=", 20, 10), False),
        (result("min", ">=", 15, 20), False),  # passing
        (result("min", ">=", 15, 9.0, severity="warn"), False),  # a warning stops nothing
    ],
)
def test_which_failures_are_for_good(case: GateResult, expected: bool) -> None:
    assert failed_for_good(case) is expected


def test_baseline_gates_stop_on_a_sample_drop_only() -> None:
    per_sample = GateSpec("per_sample", "<=", 1.0, metric="psnr", baseline=("max_drop", 1.0))
    mean = GateSpec("mean", "<=", 0.3, metric="psnr", baseline=("max_drop", 0.3))
    assert failed_for_good(GateResult("c", per_sample, 2.5, False, "drop", baseline=30.0))
    assert not failed_for_good(GateResult("c", mean, 2.5, False, "drop", baseline=30.0))
    assert not failed_for_good(GateResult("c", per_sample, math.nan, False, "no baseline", baseline=None))
    assert not failed_for_good(GateResult("c", mean, math.nan, True, "not evaluated", evaluated=False))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def test_a_layers_gate_settles_once_the_profile_is_made() -> None:
    """The layer profile is made once, on a candidate's first batch: a ratio past the bound then is the
    ratio at the end; no profile yet (NaN) settles nothing."""
    layers = GateSpec(stat="value", op="<=", value=1.5, layers="max_ratio")
    assert failed_for_good(GateResult("c", layers, 3.2, False, "ratio"))
    assert not failed_for_good(GateResult("c", layers, math.nan, False, "no profile"))
    assert not failed_for_good(GateResult("c", layers, 1.1, True, ""))


def test_a_candidate_stops_after_the_batch_that_settles_it(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # psnr min >= 40: the light suite's rowwise build has samples near 23 dB, in its first batch.
    suite = write(
        workdir / "strict.yaml", SMOKE.replace('stat: min, op: ">=", value: 15', 'stat: min, op: ">=", value: 40')
    )
    assert main(["run", str(suite), *FAST, "--policy", "fp8-e4m3-rowwise", "--policy", "bf16"]) == 1
    err = capsys.readouterr().err
    assert "fail-fast: fp8-e4m3-rowwise: stopped after" in err and "psnr min >= 40 failed for good" in err
    (run_dir,) = (workdir / "runs").iterdir()
    done = records(run_dir)
    rowwise = [r for r in done if r["policy"] == "fp8-e4m3-rowwise"]
    # Settled by its first batch (4 images); the batch generated meanwhile may be written too.
    assert 4 <= len(rowwise) <= 8
    bf16 = sum(r["policy"] == "bf16" for r in done)
    assert bf16 == 16 or "fail-fast: bf16: stopped after" in err  # each candidate decides for itself
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert any(r["policy"] == "fp8-e4m3-rowwise" and r["stat"] == "min" and not r["passed"] for r in verdict["results"])
    notes = json.loads((run_dir / "notes.json").read_text())
    assert any("fp8-e4m3-rowwise: stopped after" in n for n in notes)


def test_a_failing_mean_never_stops_a_candidate(workdir: Path) -> None:
    suite = write(
        workdir / "mean.yaml", SMOKE.replace('stat: mean, op: ">=", value: 30', 'stat: mean, op: ">=", value: 40')
    )
    assert main(["run", str(suite), *FAST]) == 1
    (run_dir,) = (workdir / "runs").iterdir()
    assert len(records(run_dir)) == 16  # every sample: a mean may still rise
