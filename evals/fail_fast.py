"""`--fail-fast`: stop generating a candidate as soon as one of its gates has failed for good.

A gate has failed for good when no later sample can make it pass: a count of flagged images above
its limit (counts only grow), a minimum below its floor or a maximum above its ceiling (they only
move further), one sample's drop against its baseline beyond the allowed drop, a layer profile's
ratio past its bound (the profile is made once, on the candidate's first batch). Means, medians and
percentiles can still move either way and never stop a candidate; nor does a regression gate with no
baseline (it fails, but the measured gates should say what is wrong). The verdict is the one the
whole run would give; the stopped candidate's statistics cover the samples it finished.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from evals.gates import GateResult, GateSpec, evaluate_gates
from evals.records import SampleRecord, summarize

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
        self._lock = threading.Lock()

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
            if self._loaded is None and any(g.baseline is not None for g in self.gates):
                self._loaded = self._baselines()
            base, per_sample = self._loaded or (None, None)
            summaries = summarize(mine)
            for name, figures in self.layers.items():
                if name in summaries:
                    summaries[name].layers = figures
            verdict = evaluate_gates(summaries, self.gates, live, None, mine, base, per_sample)
            for result in verdict.results:
                if result.policy not in self.stopped and failed_for_good(result):
                    done = sum(r.policy == result.policy for r in mine)
                    self.stopped[result.policy] = result.gate.describe()
                    notes.append(
                        f"{result.policy}: stopped after {done} of {self.samples} samples (--fail-fast): "
                        f"{result.gate.describe()} failed for good ({result.reason})"
                    )
        for note in notes:
            log.info(f"fail-fast: {note}")
        return notes
