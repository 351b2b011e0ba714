"""The end of a suite run (`SuiteRunner` inherits it): summaries (step error from screening), the
suite's bench, gates against baselines, the broken layer named, reports and MLflow."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.gates import Verdict, evaluate_gates
from evals.publish import publish_results
from evals.records import PolicySummary, read_records, summarize, summary_to_json
from evals.rundir import write_atomic, write_json
from evals.step_error.locate import locate_failures

if TYPE_CHECKING:
    from evals.candidates import Candidate
    from evals.models.sources import LoadedModel
    from evals.step_error.in_run import StepErrorRun
    from evals.step_error.screening import Screened
    from evals.suite_types import Suite
    from evals.tracker_protocol import Tracker

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_dir: Path
    summaries: dict[str, PolicySummary]
    verdict: Verdict
    reference_generated: int
    """Reference images generated in this run (0 when all came from the cache)."""
    reference_cached: int
    """Reference images (and trajectories) this run read from the cache."""
    candidate_generated: int


class FinishingPhase:
    """`_finish`, for SuiteRunner; the attributes below are the runner's."""

    suite: Suite
    model: LoadedModel
    candidates: list[Candidate]
    run_dir: Path
    tracker: Tracker
    device: str
    reference_dtype: str
    unavailable: dict[str, str]
    steps: tuple[int, ...] | None
    step_error: StepErrorRun
    screening: list[Screened]
    run_notes: list[str]
    reference_generated: int
    reference_cached: int
    candidate_generated: int
    _baselines_found: tuple[dict[str, Any], dict[str, Any]] | None
    _timed: Callable[[str], AbstractContextManager[None]]
    _write_timings: Callable[[], None]

    def _bench(self, summaries: dict[str, PolicySummary]) -> None:
        """The suite's bench: step latency and weights of each candidate's transformer against the
        reference's, into its summary (for bench gates) and bench.json."""
        from evals.bench import bench_suite_candidates

        assert self.suite.bench is not None
        log.info("bench: timing the transformers (suite `bench`)...")
        candidates = {c.name: c.pipeline for c in self.candidates if c.noise_floor is None}
        gen = self.suite.generation  # whole images at the suite's steps and prompt length
        settings = {"steps": gen.steps, "max_sequence_length": gen.max_sequence_length, **self.suite.bench}
        with self._timed("bench"):
            figures, results = bench_suite_candidates(self.model.pipeline, candidates, settings, self.device)
        for name, values in figures.items():
            if name in summaries:
                summaries[name].bench = values
        write_json(self.run_dir / "bench.json", {"settings": settings, "results": [asdict(r) for r in results]})

    @property
    def _has_baseline_gates(self) -> bool:
        return any(g.baseline is not None for g in self.suite.gates)

    def _baselines(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
        """`baselines.find_baselines` for the gated candidates, looked up once (fail-fast asks
        before the end)."""
        if self._baselines_found is None:
            from evals.baselines import find_baselines

            gated = [c for c in self.candidates if c.noise_floor is None]
            self._baselines_found = find_baselines(self.suite, gated, self.device, self.reference_dtype, self.tracker)
        return self._baselines_found

    def _finish(self, records_path: Path) -> RunOutcome:
        with self._timed("finishing.summary"):
            records = list(read_records(records_path))
            summaries = summarize(records, self.screening)
        if self.suite.bench is not None:
            self._bench(summaries)
        with self._timed("finishing.summary"):
            names = [c.name for c in self.candidates if c.noise_floor is None]  # the noise floor is never gated
            if self.steps is not None:
                for name, values in self.step_error.figures(self.candidates).items():
                    if name in summaries:
                        summaries[name].layers = values
            baselines, samples = self._baselines() if self._has_baseline_gates else (None, None)
            verdict = evaluate_gates(
                summaries, self.suite.gates, names, self.unavailable, records, baselines, samples, self.screening
            )
            write_atomic(self.run_dir / "summary.json", summary_to_json(summaries) + "\n")
            write_json(self.run_dir / "verdict.json", verdict.to_dict())
        with self._timed("finishing.locate"):
            locate_failures(self.run_dir, self.suite, self.candidates, verdict, self.device, self.reference_dtype)
            if self.run_notes:
                write_json(self.run_dir / "notes.json", self.run_notes)
        with self._timed("finishing.reports"):
            from evals.reports.html import write_reports

            write_reports(self.run_dir)
        self._write_timings()
        with self._timed("finishing.mlflow"):
            publish_results(
                self.tracker,
                self.run_dir,
                [c.name for c in self.candidates],
                self.suite.detectors,
                records,
                summaries,
                verdict.to_dict(),
            )
        return RunOutcome(
            self.run_dir, summaries, verdict, self.reference_generated, self.reference_cached, self.candidate_generated
        )
