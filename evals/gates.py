"""Gates: a pure function from summaries and gate specs to a Verdict. No torch, no I/O."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from evals.metrics import OUTPUTS, higher_is_better
from evals.records import PolicySummary, SampleRecord, summarize
from evals.step_error.screening import STEP_METRICS, Screened
from evals.suite_types import PER_SAMPLE, GateSpec

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
    """False for an optional gate whose metric could not be computed here, or an optional baseline
    gate with no baseline."""
    baseline: float | None = None
    """The accepted baseline's value, for a regression gate."""
    tolerance: float | None = None
    """A regression gate's tolerance as applied: the suite's, or JITTER_MARGIN times the jitter measured
    with the baseline when that is larger (a tolerance never sits inside the measured jitter)."""
    jitter: float | None = None
    """The jitter between machines measured with the baseline for the gated figure (None: unmeasured)."""

    @property
    def status(self) -> str:
        if not self.evaluated:
            return "not evaluated"
        if self.passed:
            return "pass"
        return "warn" if self.gate.severity == "warn" else "fail"

    @property
    def blocking(self) -> bool:
        """Whether this result fails the run: a failed gate of severity fail."""
        return not self.passed and self.gate.severity == "fail"

    def to_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "gate": self.gate.describe(),
            "subject": self.gate.subject,
            "stat": self.gate.stat,
            "op": self.gate.op,
            "threshold": self.gate.value if self.tolerance is None else self.tolerance,
            "suite_threshold": self.gate.value,
            "jitter": self.jitter,
            "actual": self.actual,
            "passed": self.passed,
            "status": self.status,
            "optional": self.gate.optional,
            "severity": self.gate.severity,
            "tags": list(self.gate.tags),
            "baseline": self.baseline,
            "baseline_gate": self.gate.baseline is not None,
            "baseline_limit": self.gate.baseline[0] if self.gate.baseline else None,
            "human_gate": self.gate.human is not None,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Verdict:
    results: tuple[GateResult, ...]
    """One result per (candidate, gate)."""

    @property
    def passed(self) -> bool:
        """No gate of severity fail failed (warnings do not fail a run)."""
        return not any(r.blocking for r in self.results)

    @property
    def failed(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.results if r.blocking)

    @property
    def warnings(self) -> tuple[GateResult, ...]:
        return tuple(r for r in self.results if not r.passed and not r.blocking)

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed else EXIT_GATE_FAILED

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "results": [r.to_dict() for r in self.results]}


NO_BASELINE = (
    "no baseline for this policy on this platform: `evals baseline update RUN_DIR` writes one for the "
    "repository (or `evals accept RUN_ID` marks one in MLflow)"
)


JITTER_MARGIN = 2.0
"""A baseline gate's tolerance is at least this many times the jitter measured between arithmetic
variants (`evals baseline update`): the variants are a sample of the machines a verdict must hold on,
and a machine outside them may move a figure further."""
JITTER_KEY = "jitter:"
"""Prefix of the measured jitter in a baseline's flat metrics: `jitter:psnr_mean`, and
`jitter:per_sample:psnr` for the largest move of any one sample."""


def _tolerance(gate: GateSpec, jitter: float | None, base: float) -> float:
    """The tolerance a regression gate applies: the suite's, widened to JITTER_MARGIN times the
    measured jitter (relative to the baseline's value for max_rel_drop) where that is larger."""
    assert gate.baseline is not None
    if jitter is None or math.isnan(jitter):
        return gate.baseline[1]
    if gate.baseline[0] == "max_rel_drop":
        jitter = jitter / abs(base) if base else math.inf
    return max(gate.baseline[1], JITTER_MARGIN * jitter)


NO_PROFILE = (
    "no layer profile to compare with: the run profiles a candidate's layers once it scores step error, and the "
    "baseline policy's committed baseline for this platform must hold one (`evals baseline update RUN_DIR`)"
)


def _drop(gate: GateSpec, actual: float, base: float) -> float:
    """How much worse `actual` is than `base` (negative when better), absolute or relative."""
    if gate.metric:
        worse = base - actual if higher_is_better(gate.metric) else actual - base
    else:
        worse = actual - base  # more flagged or retried images, or a higher latency or weights ratio, is worse
    if gate.baseline and gate.baseline[0] == "max_rel_drop":
        return worse / abs(base) if base else (math.inf if worse > 0 else 0.0)
    return worse


def evaluate_gate(
    policy: str,
    summary: PolicySummary | None,
    gate: GateSpec,
    unavailable: Mapping[str, str] | None = None,
    baseline: Mapping[str, float] | None = None,
    records: Sequence[SampleRecord | Screened] = (),
    baseline_samples: Mapping[str, Mapping[str, float]] | None = None,
    human: Mapping[str, float] | None = None,
) -> GateResult:
    """One gate on one candidate. `baseline`: the flat metrics of the policy's accepted baseline run
    (None: there is none), for regression gates; `baseline_samples`: its per-sample values (metric ->
    sample id -> value), with the candidate's `records`, for `per_sample` gates."""
    missing = (unavailable or {}).get(OUTPUTS.get(gate.metric or "", ""), "") if gate.metric else ""
    if missing:
        if gate.optional:
            return GateResult(policy, gate, math.nan, True, f"not evaluated: {missing}", evaluated=False)
        return GateResult(policy, gate, math.nan, False, f"unavailable: {missing}")
    if gate.human is not None:  # judged from votes, not from the run's summary
        return _human_gate(policy, gate, human)
    if summary is None:
        why = "no samples with these tags" if gate.tags else "no samples were scored"
        return GateResult(policy, gate, math.nan, False, why)
    if summary.n == 0 and gate.metric not in STEP_METRICS and not (gate.layers or gate.bench):
        # Not judged, and still blocking: only a failed step-error gate stops a candidate there.
        why = "not evaluated: no images (the candidate stopped after screening)"
        return GateResult(policy, gate, math.nan, False, why, evaluated=False)
    if gate.baseline is not None and gate.stat == PER_SAMPLE:
        jitter = (baseline or {}).get(f"{JITTER_KEY}{PER_SAMPLE}:{gate.subject}")
        return _per_sample_gate(policy, gate, records, baseline_samples, jitter)
    if gate.guard and not summary.guard:
        return GateResult(policy, gate, math.nan, True, f"not evaluated: {policy} is not guarded", evaluated=False)
    if gate.layers and gate.layers not in summary.layers:
        return GateResult(policy, gate, math.nan, False, NO_PROFILE)
    kind = "metric" if gate.metric else "bench" if gate.bench else "guard" if gate.guard else "detector"
    kind = "layers" if gate.layers else kind
    actual = summary.value(kind, gate.subject, gate.stat)
    if math.isnan(actual):
        return GateResult(policy, gate, actual, False, f"{gate.subject} {gate.stat} is NaN (broken or missing)")
    if gate.baseline is not None:
        key = gate.subject if gate.bench or gate.guard else f"{gate.subject}_{gate.stat}"
        base = (baseline or {}).get(key)
        if base is None:
            # A regression gate that silently does not run is the worst failure a gate can have: it
            # fails, unless the suite opted into skipping it (`optional: true`), which is shown.
            why = NO_BASELINE if baseline is None else f"the baseline has no {key}; update it"
            if gate.optional:
                return GateResult(policy, gate, actual, True, f"not evaluated: {why}", evaluated=False)
            return GateResult(policy, gate, actual, False, why)
        drop = _drop(gate, actual, base)
        jitter = (baseline or {}).get(f"{JITTER_KEY}{key}")
        tolerance = _tolerance(gate, jitter, base)
        passed = drop <= tolerance
        reason = "" if passed else f"{gate.subject} {gate.stat} = {actual:.4g} vs baseline {base:.4g}: drop {drop:.4g}"
        return GateResult(policy, gate, actual, passed, reason, baseline=base, tolerance=tolerance, jitter=jitter)
    threshold, jitter = gate.value, None
    if gate.layers == "max_ratio" and gate.op in ("<=", "<"):
        # A ratio to the baseline's profile: 1 plus its jitter is where a sound build may read.
        jitter = (baseline or {}).get(f"{JITTER_KEY}layers_{gate.layers}")
        threshold = max(gate.value, 1.0 + JITTER_MARGIN * jitter) if jitter is not None else gate.value
    passed = _OPS[gate.op](actual, threshold)
    reason = "" if passed else f"{gate.subject} {gate.stat} = {actual:.4g}, needs {gate.op} {threshold:g}"
    if jitter is None:
        return GateResult(policy, gate, actual, passed, reason)
    return GateResult(policy, gate, actual, passed, reason, tolerance=threshold, jitter=jitter)


NO_REVIEW = "not evaluated: a human gate is judged by `evals review --gate RUN_DIR` once people have voted"


def _human_gate(policy: str, gate: GateSpec, figures: Mapping[str, float] | None) -> GateResult:
    """A blind A/B review figure (evals.review.rates.flat) against its threshold; too few votes fail.
    Without `figures` (an `evals run`, before anyone voted) the gate is shown as not evaluated."""
    if figures is None:
        return GateResult(policy, gate, math.nan, True, NO_REVIEW, evaluated=False)
    votes = int(figures.get("human_votes", 0))
    actual = figures.get(f"human_{gate.human}", math.nan)
    if votes < gate.min_votes:
        why = f"{votes} votes for {policy}, {gate.min_votes} needed: {gate.min_votes - votes} more (`evals review`)"
        return GateResult(policy, gate, actual, False, why)
    if math.isnan(actual):
        return GateResult(
            policy, gate, actual, False, f"{gate.human} is undefined (no left/right picks among the votes)"
        )
    passed = _OPS[gate.op](actual, gate.value)
    reason = "" if passed else f"{gate.human} = {actual:.3g} over {votes} votes, needs {gate.op} {gate.value:g}"
    return GateResult(policy, gate, actual, passed, reason)


def _per_sample_gate(
    policy: str,
    gate: GateSpec,
    records: Sequence[SampleRecord | Screened],
    baseline_samples: Mapping[str, Mapping[str, float]] | None,
    jitter: float | None = None,
) -> GateResult:
    """Each sample's value against the same sample's in the baseline; the worst drop is gated, within
    at least twice the largest move of any one sample measured between arithmetic variants (`jitter`):
    on another machine a sound build's single samples move by up to 15 dB of PSNR."""
    mine = {r.sample_id: r.metrics.get(gate.subject, math.nan) for r in records if r.policy == policy}
    base = (baseline_samples or {}).get(gate.subject)
    if not base:
        why = NO_BASELINE if baseline_samples is None else f"the baseline has no per-sample {gate.subject}; update it"
        if gate.optional:
            return GateResult(policy, gate, math.nan, True, f"not evaluated: {why}", evaluated=False)
        return GateResult(policy, gate, math.nan, False, why)
    missing = sorted(set(mine) - set(base))
    if missing:
        why = f"the baseline has no {gate.subject} for {', '.join(missing[:3])}: the suite changed; update it"
        return GateResult(policy, gate, math.nan, False, why)
    if not mine:
        return GateResult(policy, gate, math.nan, False, "no samples were scored")
    drops = {sid: _drop(gate, value, base[sid]) for sid, value in mine.items()}
    worst = max(drops, key=lambda sid: math.inf if math.isnan(drops[sid]) else drops[sid])
    actual = drops[worst]
    tolerance = _tolerance(gate, jitter, base[worst])
    passed = not math.isnan(actual) and actual <= tolerance
    reason = "" if passed else (
        f"{gate.subject} of {worst} = {mine[worst]:.4g} vs baseline {base[worst]:.4g}: drop {actual:.4g}"
    )  # fmt: skip
    return GateResult(policy, gate, actual, passed, reason, baseline=base[worst], tolerance=tolerance, jitter=jitter)


def evaluate_gates(
    summaries: Mapping[str, PolicySummary],
    gates: tuple[GateSpec, ...],
    policies: list[str],
    unavailable: Mapping[str, str] | None = None,
    records: Sequence[SampleRecord] = (),
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    baseline_samples: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
    screened: Sequence[Screened] = (),
    human: Mapping[str, Mapping[str, float]] | None = None,
) -> Verdict:
    """Apply every gate to every candidate policy. A policy with no summary fails every gate; a gate
    on a metric listed in `unavailable` (name -> why) fails, or is not evaluated when optional.
    Gates with tags are applied to a summary of the `records` of those cases; regression gates
    compare with `baselines` (policy -> flat metrics of its accepted baseline run) and `per_sample`
    gates with `baseline_samples` (policy -> metric -> sample id -> value). `screened`: every
    sample's step error (evals.step_error.screening), which step-error gates read instead of the
    records (those cover only the samples with images). `human`: policy -> its blind A/B review
    figures (evals.review.rates.flat), for human gates; None: not judged here (`evals run`)."""
    results = []
    for policy in policies:
        for gate in gates:
            summary = summaries.get(policy)
            if gate.tags:
                chosen = [r for r in records if r.policy == policy and set(r.tags) & set(gate.tags)]
                tagged = [s for s in screened if s.policy == policy and set(s.tags) & set(gate.tags)]
                summary = summarize(chosen, tagged).get(policy)
            base = (baselines or {}).get(policy)
            samples = (baseline_samples or {}).get(policy)
            scored: Sequence[SampleRecord | Screened] = records
            if gate.metric in STEP_METRICS and screened:
                scored = screened
            figures = None if human is None else human.get(policy, {})
            results.append(evaluate_gate(policy, summary, gate, unavailable, base, scored, samples, figures))
    return Verdict(tuple(results))
