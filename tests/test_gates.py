from __future__ import annotations

import math

import pytest

from evals.gates import EXIT_GATE_FAILED, EXIT_PASS, evaluate_gates
from evals.records import PolicySummary
from evals.suite_types import GateSpec


def summary(psnr_mean: float, black: float = 0.0) -> PolicySummary:
    return PolicySummary(
        n=4,
        metrics={"psnr": {"mean": psnr_mean, "min": psnr_mean - 2}},
        detectors={"black_frame": {"count": black, "rate": black / 4}},
    )


PSNR = GateSpec(stat="mean", op=">=", value=30.0, metric="psnr")
BLACK = GateSpec(stat="count", op="==", value=0.0, detector="black_frame")


def test_passing_candidate() -> None:
    verdict = evaluate_gates({"fp8": summary(35.0)}, (PSNR, BLACK), ["fp8"])
    assert verdict.passed and verdict.exit_code == EXIT_PASS
    assert [r.actual for r in verdict.results] == [35.0, 0.0]


def test_failing_gate_is_named_with_its_value() -> None:
    verdict = evaluate_gates({"fp8": summary(25.0, black=1)}, (PSNR, BLACK), ["fp8"])
    assert not verdict.passed and verdict.exit_code == EXIT_GATE_FAILED
    assert [r.gate.subject for r in verdict.failed] == ["psnr", "black_frame"]
    assert "psnr mean = 25, needs >= 30" in verdict.failed[0].reason


def test_each_policy_is_gated_on_its_own() -> None:
    verdict = evaluate_gates({"good": summary(40.0), "bad": summary(20.0)}, (PSNR,), ["good", "bad"])
    assert [(r.policy, r.passed) for r in verdict.results] == [("good", True), ("bad", False)]


def test_nan_never_passes() -> None:
    for op in (">=", "<=", "!="):
        gate = GateSpec(stat="mean", op=op, value=30.0, metric="psnr")
        result = evaluate_gates({"p": summary(math.nan)}, (gate,), ["p"]).results[0]
        assert not result.passed and "NaN" in result.reason


def test_missing_policy_or_stat_fails() -> None:
    assert not evaluate_gates({}, (PSNR,), ["p"]).passed
    p95 = GateSpec(stat="p95", op="<=", value=1.0, metric="psnr")
    assert not evaluate_gates({"p": summary(40.0)}, (p95,), ["p"]).passed


@pytest.mark.parametrize(
    ("op", "actual", "expected"),
    [
        (">=", 30, True),
        (">=", 29.9, False),
        (">", 30, False),
        ("<=", 30, True),
        ("<", 30, False),
        ("==", 30, True),
        ("!=", 30, False),
        ("!=", 31, True),
    ],
)
def test_operators(op: str, actual: float, expected: bool) -> None:
    gate = GateSpec(stat="mean", op=op, value=30.0, metric="psnr")
    assert evaluate_gates({"p": summary(actual)}, (gate,), ["p"]).passed is expected


def test_infinite_psnr_passes_a_lower_bound() -> None:
    assert evaluate_gates({"p": summary(math.inf)}, (PSNR,), ["p"]).passed


def test_a_failed_warn_gate_is_reported_and_does_not_fail_the_run() -> None:
    warn = GateSpec(stat="mean", op=">=", value=50.0, metric="psnr", severity="warn")
    verdict = evaluate_gates({"fp8": summary(35.0)}, (PSNR, warn), ["fp8"])
    assert verdict.passed and verdict.exit_code == EXIT_PASS
    assert [r.status for r in verdict.results] == ["pass", "warn"]
    assert verdict.warnings == (verdict.results[1],) and not verdict.failed


def tagged_records():
    from dataclasses import replace

    from tests.test_records import record

    dark = [replace(record("fp8", f"night-s{i}", 20.0 + i), tags=("dark",)) for i in range(2)]
    bright = [replace(record("fp8", f"beach-s{i}", 45.0), tags=("landscapes",)) for i in range(2)]
    return dark + bright


def test_a_tagged_gate_sees_only_its_cases() -> None:
    from evals.records import summarize

    records = tagged_records()
    dark = GateSpec(stat="mean", op=">=", value=30.0, metric="psnr", tags=("dark",))
    bright = GateSpec(stat="min", op=">=", value=40.0, metric="psnr", tags=("landscapes", "people"))
    verdict = evaluate_gates(summarize(records), (PSNR, dark, bright), ["fp8"], records=records)
    assert [r.actual for r in verdict.results] == [32.75, 20.5, 45.0]  # all four, the two dark, the two bright
    assert [r.status for r in verdict.results] == ["pass", "fail", "pass"]


def test_a_tag_no_sample_of_the_candidate_has_fails() -> None:
    records = tagged_records()
    gate = GateSpec(stat="mean", op=">=", value=30.0, metric="psnr", tags=("people",))
    (result,) = evaluate_gates({"fp8": summary(35.0)}, (gate,), ["fp8"], records=records).results
    assert not result.passed and "no samples with these tags" in result.reason


@pytest.mark.parametrize(
    ("gate", "actual", "baseline", "passed"),
    [
        (GateSpec("mean", "<=", 0.5, metric="psnr", baseline=("max_drop", 0.5)), 40.0, 40.4, True),
        (GateSpec("mean", "<=", 0.5, metric="psnr", baseline=("max_drop", 0.5)), 40.0, 40.6, False),
        (GateSpec("mean", "<=", 0.5, metric="psnr", baseline=("max_drop", 0.5)), 45.0, 40.0, True),  # better
        (GateSpec("mean", "<=", 0.01, metric="psnr", baseline=("max_rel_drop", 0.01)), 39.7, 40.0, True),
        (GateSpec("mean", "<=", 0.01, metric="psnr", baseline=("max_rel_drop", 0.01)), 39.5, 40.0, False),
        (GateSpec("mean", "<=", 0.02, metric="lpips", baseline=("max_drop", 0.02)), 0.13, 0.10, False),  # lower=better
        (GateSpec("mean", "<=", 0.02, metric="lpips", baseline=("max_drop", 0.02)), 0.05, 0.10, True),
        (GateSpec("count", "<=", 0, detector="black_frame", baseline=("max_drop", 0)), 1.0, 0.0, False),
    ],
)
def test_baseline_gates_measure_the_drop_in_the_metrics_direction(
    gate: GateSpec, actual: float, baseline: float, passed: bool
) -> None:
    kind = "metrics" if gate.metric else "detectors"
    s = PolicySummary(n=4, **{kind: {gate.subject: {gate.stat: actual}}})
    (result,) = evaluate_gates(
        {"fp8": s}, (gate,), ["fp8"], baselines={"fp8": {f"{gate.subject}_{gate.stat}": baseline}}
    ).results
    assert result.passed is passed and result.baseline == baseline


def test_a_baseline_gate_without_a_baseline_fails_and_says_how_to_get_one() -> None:
    """A regression gate must never pass silently because nothing was there to compare with."""
    gate = GateSpec("mean", "<=", 0.5, metric="psnr", baseline=("max_drop", 0.5))
    for baselines in ({}, None):
        verdict = evaluate_gates({"fp8": summary(35.0)}, (gate,), ["fp8"], baselines=baselines)
        (result,) = verdict.results
        assert result.status == "fail" and not verdict.passed
        assert "evals baseline update" in result.reason and "evals accept" in result.reason


def test_an_optional_baseline_gate_without_a_baseline_is_shown_as_not_evaluated() -> None:
    gate = GateSpec("mean", "<=", 0.5, metric="psnr", baseline=("max_drop", 0.5), optional=True)
    verdict = evaluate_gates({"fp8": summary(35.0)}, (gate,), ["fp8"], baselines={})
    assert verdict.passed and verdict.results[0].status == "not evaluated"
    assert "evals baseline update" in verdict.results[0].reason


def test_a_baseline_without_the_gated_statistic_fails() -> None:
    gate = GateSpec("min", "<=", 0.5, metric="psnr", baseline=("max_drop", 0.5))
    verdict = evaluate_gates({"fp8": summary(35.0)}, (gate,), ["fp8"], baselines={"fp8": {"psnr_mean": 35.0}})
    assert not verdict.passed and "no psnr_min" in verdict.results[0].reason
