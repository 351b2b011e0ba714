"""`--fail-fast`: stop generating a candidate as soon as one of its gates has failed for good.

A gate has failed for good when no later sample can make it pass: a count of flagged images above
its limit (counts only grow), a minimum below its floor or a maximum above its ceiling (they only
move further), one sample's drop against its baseline beyond the allowed drop, a layer profile's
ratio past its bound (the profile is made once, on the candidate's first batch). Means, medians and
percentiles can still move either way and never stop a candidate; nor does a regression gate with no
baseline (it fails, but the measured gates should say what is wrong). The verdict is the one the
whole run would give; the stopped candidate's statistics cover the samples it finished.

Screening (evals.step_error.screening) scores every sample's step error before any image: once it is
complete, every step-error gate is settled, a mean as much as a maximum, and a candidate that failed
one stops before its first image.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from evals.gates import GateResult, GateSpec, Verdict, evaluate_gates
from evals.records import PolicySummary, SampleRecord, summarize
from evals.step_error.screening import STEP_METRICS, Screened

log = logging.getLogger(__name__)

MONOTONE_FAIL = {"count": ("<=", "<"), "new_count": ("<=", "<"), "min": (">=", ">"), "max": ("<=", "<")}
"""Statistic -> the gate operators under which a failure now is a failure at the end."""


def failed_for_good(result: GateResult) -> bool:
    """Whether a blocking gate's failure on the samples so far holds for any further samples."""
    gate: GateSpec = result.gate
    if result.passed or not result.evaluated or gate.severity != "fail" or gate.bench is not None:
        return False
    if gate.layers is not None:
        return not math.isnan(result.actual)  # the layer profile is made once: its ratio is final
    if gate.baseline is not None:
        # A missing baseline fails the run too, but is known before it starts: the candidate goes on,
        # so that its measured gates, not a missing file, say what is wrong with it.
        return result.baseline is not None and gate.stat == "per_sample"
    if gate.stat in ("count", "new_count") and gate.op == "==":
        return result.actual > gate.value  # a count only grows
    return gate.op in MONOTONE_FAIL.get(gate.stat, ())


def settled_by_screening(result: GateResult) -> bool:
    """Whether a blocking step-error gate's failure is final once every sample is screened: any
    statistic is, unless what failed it is a missing baseline or profile, known before the run."""
    gate: GateSpec = result.gate
    if result.passed or not result.evaluated or gate.severity != "fail":
        return False
    if gate.layers is not None:
        return not math.isnan(result.actual)
    return gate.baseline is None or result.baseline is not None


class FailFast:
    """Watches each candidate's records as they are written; `stopped` names those whose verdict is
    settled (fail), with the gate that settled it. Thread-safe: the scoring worker adds, the
    generating thread reads."""

    def __init__(
        self,
        gates: tuple[GateSpec, ...],
        candidates: list[str],
        baselines: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
        samples: int,
    ):
        self.gates = tuple(g for g in gates if g.bench is None)
        self.layers: dict[str, dict[str, float]] = {}
        """Candidate -> its layer-profile figures, once its profile is made (the runner adds them)."""
        self.candidates = candidates
        self._baselines = baselines
        self._loaded: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.samples = samples
        self.records: list[SampleRecord] = []
        self.stopped: dict[str, str] = {}
        self.screened: list[Screened] = []
        """Every screening line (the runner's list), which step-error gates read."""
        self._lock = threading.Lock()

    def _loaded_baselines(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        if self._loaded is None and any(g.baseline is not None for g in self.gates):
            self._loaded = self._baselines()
        return self._loaded or (None, None)

    def adopt(self, stopped: dict[str, str]) -> None:
        """Another process's decisions (torchrun: rank 0 decides, every rank stops generating)."""
        with self._lock:
            self.stopped.update(stopped)

    def _judge(
        self, gates: tuple[GateSpec, ...], live: list[str], records: list[SampleRecord]
    ) -> tuple[Verdict, dict[str, PolicySummary]]:
        """(verdict, summaries) of `gates` on the live candidates' records and screening so far."""
        base, per_sample = self._loaded_baselines()
        summaries = summarize(records, [s for s in self.screened if s.policy in live])
        for name, figures in self.layers.items():
            if name in summaries:
                summaries[name].layers = figures
        return evaluate_gates(summaries, gates, live, None, records, base, per_sample, self.screened), summaries

    def _stop(self, policy: str, gate: GateSpec, note: str) -> str:
        self.stopped[policy] = gate.describe()
        log.info(f"fail-fast: {note}")
        return note

    def screen(self, samples: int, complete: bool) -> list[str]:
        """Judge the step-error and layers gates on the screening so far (`screened`); `complete`:
        every sample is screened, so every such gate is settled. Returns a note for each candidate
        this stops."""
        gates = tuple(g for g in self.gates if g.layers is not None or g.metric in STEP_METRICS)
        notes = []
        with self._lock:
            done = {s.policy for s in self.screened}
            live = [c for c in self.candidates if c not in self.stopped and c in done]
            if not live or not gates:
                return []
            verdict, summaries = self._judge(gates, live, [])
            for result in verdict.results:
                settled = failed_for_good(result) or (complete and settled_by_screening(result))
                if result.policy not in self.stopped and settled:
                    count = summaries[result.policy].screened
                    why = f"{result.gate.describe()} failed ({result.reason})"
                    note = f"{result.policy}: stopped after screening {count} of {samples} samples, before any image"
                    notes.append(self._stop(result.policy, result.gate, f"{note} (--fail-fast): {why}"))
        return notes

    def add(self, records: Sequence[SampleRecord]) -> list[str]:
        """Take a batch's records; returns a note for each candidate this stops."""
        notes = []
        with self._lock:
            self.records.extend(records)
            scored = {r.policy for r in self.records}  # a candidate with no records yet fails nothing
            live = [c for c in self.candidates if c not in self.stopped and c in scored]
            mine = [r for r in self.records if r.policy in live]
            if not mine:
                return []
            verdict, _ = self._judge(self.gates, live, mine)
            for result in verdict.results:
                if result.policy not in self.stopped and failed_for_good(result):
                    done = sum(r.policy == result.policy for r in mine)
                    why = f"{result.gate.describe()} failed for good ({result.reason})"
                    note = f"{result.policy}: stopped after {done} of {self.samples} samples (--fail-fast): {why}"
                    notes.append(self._stop(result.policy, result.gate, note))
        return notes
