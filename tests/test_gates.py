from __future__ import annotations

import math

import pytest

from evals.gates import EXIT_GATE_FAILED, EXIT_PASS, evaluate_gates
from evals.records import PolicySummary
from evals.suite import GateSpec


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
