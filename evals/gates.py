"""Gates: a pure function from summaries and gate specs to a Verdict. No torch, no I/O."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from evals.metrics import OUTPUTS
from evals.records import PolicySummary
from evals.suite import GateSpec

EXIT_PASS = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CRASHED = 3  # the run broke; finished samples are in records.jsonl

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class GateResult:
    policy: str
    """Candidate the gate was applied to."""
    gate: GateSpec
    """The gate."""
    actual: float
    """The candidate's value of the gated statistic (NaN when missing or broken)."""
    passed: bool
    """Whether the gate held (an optional gate that could not be evaluated counts as held)."""
    reason: str
    """Why it failed or was not evaluated, or empty."""
    evaluated: bool = True
    """False for an optional gate whose metric could not be computed here."""

    @property
    def status(self) -> str:
        return "not evaluated" if not self.evaluated else ("pass" if self.passed else "fail")

    def to_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "gate": self.gate.describe(),
            "subject": self.gate.subject,
            "stat": self.gate.stat,
            "op": self.gate.op,
            "threshold": self.gate.value,
            "actual": self.actual,
            "passed": self.passed,
            "status": self.status,
            "optional": self.gate.optional,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Verdict:
    results: tuple[GateResult, ...]
    """One result per (candidate, gate)."""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed else EXIT_GATE_FAILED

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "results": [r.to_dict() for r in self.results]}


def evaluate_gate(
    policy: str, summary: PolicySummary | None, gate: GateSpec, unavailable: Mapping[str, str] | None = None
) -> GateResult:
    missing = (unavailable or {}).get(OUTPUTS.get(gate.metric or "", ""), "") if gate.metric else ""
    if missing:
        if gate.optional:
            return GateResult(policy, gate, math.nan, True, f"not evaluated: {missing}", evaluated=False)
        return GateResult(policy, gate, math.nan, False, f"unavailable: {missing}")
    if summary is None:
        return GateResult(policy, gate, math.nan, False, "no samples were scored")
    kind = "metric" if gate.metric else "detector"
    actual = summary.value(kind, gate.subject, gate.stat)
    if math.isnan(actual):
        return GateResult(policy, gate, actual, False, f"{gate.subject} {gate.stat} is NaN (broken or missing)")
    passed = _OPS[gate.op](actual, gate.value)
    reason = "" if passed else f"{gate.subject} {gate.stat} = {actual:.4g}, needs {gate.op} {gate.value:g}"
    return GateResult(policy, gate, actual, passed, reason)


def evaluate_gates(
    summaries: Mapping[str, PolicySummary],
    gates: tuple[GateSpec, ...],
    policies: list[str],
    unavailable: Mapping[str, str] | None = None,
) -> Verdict:
    """Apply every gate to every candidate policy. A policy with no summary fails every gate; a gate
    on a metric listed in `unavailable` (name -> why) fails, or is not evaluated when optional."""
    return Verdict(tuple(evaluate_gate(p, summaries.get(p), g, unavailable) for p in policies for g in gates))
