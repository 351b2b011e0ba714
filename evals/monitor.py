"""Sampled quality monitoring of a production build: `evals monitor LOG --suite SUITE`.

The log (evals.monitor_log) holds what production generated. Every logged image goes through the
suite's detectors; for a deterministic sample of them the reference is generated again with the same
prompt, seed and settings, and the suite's metrics compare the logged image with it. The result is a
run directory like a suite's (records of one candidate, named `production` unless told otherwise;
summary, verdict, report, MLflow), gated by the suite's gates: metric gates see the sampled entries,
detector gates all of them. Suite keys that describe candidates or cases (policies, cases,
noise_floor, guard) are not used; bench and baseline gates are refused (they have nothing to compare).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evals.api import RunRequest, prepare
from evals.gates import Verdict, evaluate_gates
from evals.metrics import OUTPUTS
from evals.models.yamlspec import InputError
from evals.monitor_log import LogEntry, read_log, sampled
from evals.records import REFERENCE_FOLDER, PolicySummary, RecordsWriter, SampleRecord, image_path, read_records
from evals.suite_types import Case, Generation, Sample, Suite

log = logging.getLogger(__name__)


@dataclass
class MonitorRequest:
    log: Path
    """The production log (JSON Lines)."""
    suite: Path
    """The suite whose model, reference precision, metrics, detectors and gates apply."""
    name: str = "production"
    """What the logged build is called in records, report and MLflow."""
    rate: float | None = None
    """Share of entries whose reference is regenerated (deterministic by entry); None: see count."""
    count: int | None = None
    """Number of entries whose reference is regenerated; neither: every entry."""
    device: str = "auto"
    runs_dir: Path = Path("runs")
    mlflow: bool = True
    progress: bool = True


@dataclass
class MonitorOutcome:
    run_dir: Path
    summaries: dict[str, PolicySummary]
    verdict: Verdict
    sampled: int
    """Entries whose reference was regenerated and scored."""
    entries: int


def _monitor_suite(suite: Suite, entries: list[LogEntry]) -> Suite:
    """The suite with the log's entries as its cases (one seed each), so run.json, report and gates
    count the log's samples."""
    for gate in suite.gates:
        if gate.bench or gate.baseline is not None:
            raise InputError(
                f"gate {gate.describe()!r}: a monitor compares logged images with the reference; bench and "
                "baseline gates have nothing to compare here",
                source=suite.path,
            )
    known = set(suite.tags)
    for entry in entries:
        unknown = [t for t in entry.tags if t not in known]
        if unknown and any(g.tags for g in suite.gates):
            log.info(f"log line {entry.line}: tags {unknown} are no case's in {suite.path}")
    cases = tuple(Case(e.id, e.prompt, (e.seed,), e.tags) for e in entries)
    tags = tuple(sorted({t for e in entries for t in e.tags} | known))
    return dataclasses.replace(suite, cases=cases, tags=tags, policies=(), guard=None, noise_floor=None, bench=None)


def _load_image(entry: LogEntry, log_path: Path) -> np.ndarray:
    from evals.rundir import load_png

    try:
        image = load_png(entry.image)
    except (OSError, ValueError) as exc:
        why = f"image {entry.image}: not a readable image ({exc})"
        raise InputError(why, source=str(log_path), line=entry.line) from exc
    g = entry.generation
    if image.shape[:2] != (g.height, g.width):
        raise InputError(
            f"image {entry.image} is {image.shape[1]}x{image.shape[0]}; its settings say {g.width}x{g.height}",
            source=str(log_path),
            line=entry.line,
        )
    return image


def run_monitor(request: MonitorRequest) -> MonitorOutcome:
    """Check, sample, regenerate, score, gate and report; every input is checked before any work."""
    from evals.models.names import check_name
    from evals.models.sources import check_generation_fits
    from evals.suite import load_suite

    check_name(request.name, "--name")
    suite = load_suite(request.suite)
    entries = read_log(request.log, suite)
    images = {e.id: _load_image(e, request.log) for e in entries}
    suite = _monitor_suite(suite, entries)
    chosen = sampled(entries, request.rate, request.count)
    prepared = prepare(RunRequest(suite=request.suite, device=request.device, runs_dir=request.runs_dir,
                                  mlflow=request.mlflow, use_cache=False), suite)  # fmt: skip
    for generation in {e.generation for e in entries if e.id in chosen}:
        check_generation_fits(prepared.model.pipeline, generation.height, generation.width, str(request.log))
    from evals.background_tracker import open_tracker
    from evals.run_lock import lock_run_dir
    from evals.rundir import new_run_dir

    tracker = open_tracker(request.mlflow)
    run_dir = new_run_dir(request.runs_dir, suite.name)
    log.info(f"monitor: {len(entries)} logged images, {len(chosen)} sampled for the reference; run directory {run_dir}")
    with lock_run_dir(run_dir):
        try:
            _Monitor(prepared, request, suite, tracker, run_dir).run(entries, images, chosen)
            return _finish(prepared, request, suite, tracker, run_dir, len(chosen), len(entries))
        except BaseException:
            log.error(f"the monitor run broke; every finished entry is in {run_dir / 'records.jsonl'}")
            tracker.interrupted()
            raise


class _Monitor:
    def __init__(self, prepared: Any, request: MonitorRequest, suite: Suite, tracker: Any, run_dir: Path):
        self.prepared, self.request, self.suite, self.tracker, self.run_dir = prepared, request, suite, tracker, run_dir

    def _start(self) -> None:
        from evals.candidates import Candidate
        from evals.environment import environment, git_commit
        from evals.publish import LOGGED_FILE, candidate_params
        from evals.run_json import write_run_json

        prepared, suite = self.prepared, self.suite
        digest = hashlib.sha256(self.request.log.read_bytes()).hexdigest()
        # The logged build is described, not built: its images come from the log.
        build = Candidate(self.request.name, None, digest, policy_path=str(self.request.log.resolve()))
        params = {
            "suite": suite.name,
            "suite_sha256": suite.sha256,
            "model": prepared.model.source,
            "model_fingerprint": prepared.model.fingerprint,
            "reference_dtype": prepared.reference_dtype,
            "device": prepared.device,
            "policies": self.request.name,
            "samples": len(suite.cases),
            "monitor_log": str(self.request.log),
            "monitor_log_sha256": digest,
        }
        tags = {"git_commit": git_commit(), "run_dir": str(self.run_dir), "kind": "monitor"}
        env = environment(prepared.device)
        tracking = {"params": params, "tags": tags}
        write_run_json(
            self.run_dir, suite, prepared.model, [build], prepared.reference_dtype, env, prepared.unavailable, tracking
        )
        self.tracker.start_run(suite.name, f"{suite.name}: monitoring", params, tags, self.run_dir / LOGGED_FILE)
        self.tracker.start_candidate(self.request.name, candidate_params(self.request.name, digest, "", params))

    def run(self, entries: list[LogEntry], images: dict[str, np.ndarray], chosen: set[str]) -> None:
        from tqdm import tqdm

        self._start()
        size = self.suite.generation.batch_size
        # Reference batches hold entries of the same settings; their order is the log's.
        groups: dict[Generation | None, list[LogEntry]] = {}  # None: not sampled, no reference
        for entry in entries:
            groups.setdefault(entry.generation if entry.id in chosen else None, []).append(entry)
        bar = tqdm(
            total=len(entries), unit="image", disable=not self.request.progress, desc=f"monitor {self.suite.name}"
        )
        with RecordsWriter(self.run_dir / "records.jsonl") as writer:
            for generation, members in groups.items():
                for start in range(0, len(members), size):
                    batch = members[start : start + size]
                    self._batch(batch, images, generation, writer)
                    bar.update(len(batch))
        bar.close()

    def _batch(
        self, batch: list[LogEntry], images: dict[str, np.ndarray], generation: Generation | None, writer: Any
    ) -> None:
        from evals.generation import from_uint8, generate, to_uint8
        from evals.rundir import save_png
        from evals.scoring import findings_of

        device, name = self.prepared.device, self.request.name
        logged = np.stack([images[e.id] for e in batch])
        findings = findings_of(from_uint8(logged), self.suite, device)
        samples = [Sample(Case(e.id, e.prompt, (e.seed,), e.tags), e.seed) for e in batch]
        scores: dict[str, list[float]] = {}
        ref_findings: list[dict[str, Any]] = [{} for _ in batch]
        if generation is not None:  # sampled: the reference of each, and the metrics against it
            raw = generate(self.prepared.model.pipeline, samples, generation)
            ref_findings = findings_of(raw, self.suite, device)
            ref_u8 = to_uint8(raw)
            prompts = [e.prompt for e in batch]
            for metric in self.prepared.metrics.values():
                found = metric(from_uint8(logged), from_uint8(ref_u8), prompts)
                scores.update({k: v.tolist() for k, v in found.items()})
            for sample, image in zip(samples, ref_u8, strict=True):
                path = self.run_dir / image_path(REFERENCE_FOLDER, sample.id)
                save_png(path, image)
                self.tracker.log_reference_image(sample.id, path)
        for i, (entry, sample) in enumerate(zip(batch, samples, strict=True)):
            record = SampleRecord(
                policy=name,
                sample_id=sample.id,
                case_id=entry.id,
                prompt=entry.prompt,
                seed=entry.seed,
                tags=entry.tags,
                metrics={m: v[i] for m, v in scores.items()},
                detectors=findings[i],
                reference_detectors=ref_findings[i],
                image=image_path(name, sample.id),
                reference_image=image_path(REFERENCE_FOLDER, sample.id),
                seconds_per_image=math.nan if entry.seconds is None else entry.seconds,
            )
            save_png(self.run_dir / record.image, logged[i])
            writer.write(record)
            if generation is None:  # MLflow shows an image beside its reference: the sampled ones
                continue
            self.tracker.log_candidate_image(
                name, sample.id, self.run_dir / record.image, self.run_dir / record.reference_image
            )


def _finish(
    prepared: Any, request: MonitorRequest, suite: Suite, tracker: Any, run_dir: Path, chosen: int, entries: int
) -> MonitorOutcome:
    """As a suite run ends: summary, verdict, reports, MLflow (evals.runner's finish, for one build)."""
    from evals.publish import publish_results
    from evals.records import summarize, summary_to_json
    from evals.reports.html import write_reports
    from evals.rundir import write_atomic, write_json

    records = list(read_records(run_dir / "records.jsonl"))
    summaries = summarize(records)
    # Step error needs the build's transformer; a monitor has only the images it made.
    gates = tuple(g for g in suite.gates if not (g.layers or (g.metric and OUTPUTS[g.metric] == "step_error")))
    verdict = evaluate_gates(summaries, gates, [request.name], prepared.unavailable, records)
    write_atomic(run_dir / "summary.json", summary_to_json(summaries) + "\n")
    write_json(run_dir / "verdict.json", verdict.to_dict())
    notes = [f"monitor of {request.log}: {chosen} of {entries} logged images compared with a regenerated "
             "reference; detectors on all of them"]  # fmt: skip
    if len(gates) < len(suite.gates):
        notes.append(f"{len(suite.gates) - len(gates)} step-error gates not applied: they need the build itself")
    write_json(run_dir / "notes.json", notes)
    write_reports(run_dir)
    publish_results(tracker, run_dir, [request.name], suite.detectors, records, summaries, verdict.to_dict())
    return MonitorOutcome(run_dir, summaries, verdict, chosen, entries)
