"""The records file is an interface: SampleRecord per line, versioned; RunSummary aggregates them.

Imports no torch. Non-finite floats (PSNR of identical images is +inf; a broken image gives NaN)
are kept as they are: JSON here is Python's, which writes them as Infinity/NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.models.names import check_name
from evals.models.yamlspec import InputError
from evals.rundir import SyncedLines
from evals.step_error.screening import STEP_METRICS, Screened, check_steps, read_screening
from evals.step_error.screening import by_policy as screened_by_policy
from evals.suite_types import METRIC_STATS

SCHEMA_VERSION = 1
GUARD_OUTCOMES = ("passed", "repaired", "failed")
REFERENCE_FOLDER = "ref"
"""images/ref/ holds the reference images; no candidate may be named so."""


def image_path(policy: str, sample_id: str) -> str:
    """Where a candidate's (or, for REFERENCE_FOLDER, the reference's) image of a sample is, relative
    to the run directory: the one layout, so that a record can be checked against it."""
    return f"images/{policy}/{sample_id}.png"


@dataclass(frozen=True)
class SampleRecord:
    policy: str
    """Candidate policy name."""
    sample_id: str
    """`<case id>-s<seed>`; unique within a suite."""
    case_id: str
    """Case the sample comes from."""
    prompt: str
    """Prompt used."""
    seed: int
    """Generator seed."""
    tags: tuple[str, ...]
    """Case tags."""
    metrics: dict[str, float]
    """Metric name -> value (candidate against reference)."""
    detectors: dict[str, dict[str, Any]]
    """Detector name -> {flagged, score, reason} on the candidate image."""
    reference_detectors: dict[str, dict[str, Any]]
    """Detector name -> {flagged, score, reason} on the reference image."""
    image: str
    """Candidate image, relative to the run directory."""
    reference_image: str
    """Reference image, relative to the run directory."""
    seconds_per_image: float
    """Candidate generation time, batch time divided by batch size (a guarded candidate's includes its retries)."""
    schema_version: int = SCHEMA_VERSION
    """Version of this schema."""
    guard: dict[str, Any] | None = None
    """What the guard did for the image of a guarded candidate (`evals.guard.ImageOutcome`: tries,
    outcome passed/repaired/failed, seed and source of the image kept, flagged: why the first was);
    None when the candidate is not guarded. Added within version 1: older records simply lack it."""
    steps: dict[str, list[float]] | None = None
    """Step error at each recorded step (evals.step_error): {step: [indices], error: [relative L2],
    cosine: [...]}; None when the suite does not score step error. Added within version 1."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleRecord:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"records schema {data.get('schema_version')!r}, this version reads {SCHEMA_VERSION}")
        data = dict(data, tags=tuple(data["tags"]))
        record = cls(**data)
        # A record names files the report and MLflow read: it may name only this run's own images.
        check_name(record.policy, "policy")
        check_name(record.sample_id, "sample_id")
        if record.guard is not None:
            tries, outcome = record.guard.get("tries"), record.guard.get("outcome")
            if type(tries) is not int or tries < 0 or outcome not in GUARD_OUTCOMES:
                raise ValueError(f"guard {record.guard!r}: expected tries >= 0 and outcome one of {GUARD_OUTCOMES}")
        if record.steps is not None:
            check_steps(record.steps)
        for key, expected in (
            ("image", image_path(record.policy, record.sample_id)),
            ("reference_image", image_path(REFERENCE_FOLDER, record.sample_id)),
        ):
            if getattr(record, key) != expected:
                raise ValueError(f"{key} {getattr(record, key)!r}: expected {expected!r}")
        return record


class RecordsWriter(SyncedLines):
    """Append-only records.jsonl: each record is synced as soon as it is written, so a crash keeps
    every finished sample."""

    def write(self, record: SampleRecord) -> None:
        self.write_lines([record.to_json()])


def read_records(path: Path) -> Iterator[SampleRecord]:
    """The records of a records.jsonl; a line that is not a record of this version is an InputError
    naming the file and line (run directories can come from elsewhere)."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield SampleRecord.from_dict(json.loads(raw.decode("utf-8")))
            except (ValueError, TypeError, KeyError, InputError, RecursionError) as exc:
                raise InputError(f"bad record: {exc}", source=str(path), line=line_no) from exc


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (NumPy's default), safe with infinities."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    a, b = sorted_values[lo], sorted_values[hi]
    if lo == hi or a == b:
        return a
    return a + (b - a) * (pos - lo)


def metric_stats(values: list[float]) -> dict[str, float]:
    """Every metric statistic a gate can use. Any NaN makes every statistic NaN: a broken sample
    must not be averaged away."""
    if not values or any(math.isnan(v) for v in values):
        return {stat: math.nan for stat in METRIC_STATS}
    s = sorted(values)
    return {
        "mean": sum(s) / len(s),
        "median": percentile(s, 0.5),
        "min": s[0],
        "max": s[-1],
        "p05": percentile(s, 0.05),
        "p95": percentile(s, 0.95),
    }


def detector_stats(flags: list[bool], reference_flags: list[bool | None] | None = None) -> dict[str, float]:
    """count and rate of `flags`; with `reference_flags` (None where a sample has no reference image,
    as in a monitor's unsampled entries) new_count: flagged where the reference is not."""
    count = sum(flags)
    stats = {"count": float(count), "rate": count / len(flags) if flags else math.nan}
    if reference_flags is not None:  # failures the candidate brought, not ones the prompt gives anyway
        pairs = zip(flags, reference_flags, strict=True)
        stats["new_count"] = float(sum(f and r is False for f, r in pairs))
    return stats


def guard_stats(records: list[SampleRecord]) -> dict[str, float]:
    """retry_rate, failed_after_retry and repaired of the guarded records (empty: none is guarded)."""
    guarded = [r.guard for r in records if r.guard is not None]
    if not guarded:
        return {}
    return {
        "retry_rate": sum(g["tries"] > 0 for g in guarded) / len(guarded),
        "failed_after_retry": float(sum(g["outcome"] == "failed" for g in guarded)),
        "repaired": float(sum(g["outcome"] == "repaired" for g in guarded)),
    }


def _reference_flag(record: SampleRecord, detector: str) -> bool | None:
    found = record.reference_detectors.get(detector)
    return None if found is None else bool(found["flagged"])


@dataclass
class PolicySummary:
    n: int
    """Samples scored."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Metric -> stat -> value."""
    detectors: dict[str, dict[str, float]] = field(default_factory=dict)
    """Detector -> count/rate on candidate images."""
    reference_detectors: dict[str, dict[str, float]] = field(default_factory=dict)
    """Detector -> count/rate on reference images."""
    seconds_per_image: float = math.nan
    """Mean candidate generation time per image."""
    bench: dict[str, float] = field(default_factory=dict)
    """Bench figures after the run (latency_ratio, weights_ratio, step_ms, ...), when the suite benches."""
    guard: dict[str, float] = field(default_factory=dict)
    """A guarded candidate's retry_rate, failed_after_retry (images still flagged after every retry)
    and repaired (count); empty when it is not guarded."""
    layers: dict[str, float] = field(default_factory=dict)
    """The candidate's layer profile against its baseline's (max_ratio), when the suite scores step
    error and the baseline has a profile; empty otherwise."""
    screened: int = 0
    """Samples whose step error was screened (evals.step_error.screening): step_error and
    step_cosine cover these, the other metrics the `n` samples with images."""

    def value(self, kind: str, subject: str, stat: str) -> float:
        if kind == "bench":
            return self.bench.get(subject, math.nan)
        if kind == "guard":
            return self.guard.get(subject, math.nan)
        if kind == "layers":
            return self.layers.get(subject, math.nan)
        table = self.metrics if kind == "metric" else self.detectors
        return table.get(subject, {}).get(stat, math.nan)

    def flat(self) -> dict[str, float]:
        """`psnr_mean`, `black_frame_count`, ...: the names logged to MLflow."""
        out = {f"{m}_{s}": v for m, stats in self.metrics.items() for s, v in stats.items()}
        out.update({f"{d}_{s}": v for d, stats in self.detectors.items() for s, v in stats.items()})
        out.update({f"reference_{d}_{s}": v for d, stats in self.reference_detectors.items() for s, v in stats.items()})
        out.update(self.bench)
        out.update(self.guard)
        out.update({f"layers_{k}": v for k, v in self.layers.items()})
        out["seconds_per_image"] = self.seconds_per_image
        out["samples"] = float(self.n)
        if self.screened:
            out["screened_samples"] = float(self.screened)
        return out


def summarize(records: Iterable[SampleRecord], screened: Iterable[Screened] = ()) -> dict[str, PolicySummary]:
    """Aggregate records per policy (pure: the same records always give the same summary). With
    `screened`, step_error and step_cosine come from the screening, which covers every sample of the
    suite; a candidate stopped after screening has a summary of those alone (n = 0)."""
    by_policy: dict[str, list[SampleRecord]] = {}
    for record in records:
        by_policy.setdefault(record.policy, []).append(record)
    summaries: dict[str, PolicySummary] = {}
    for policy, recs in by_policy.items():
        metric_names = sorted({m for r in recs for m in r.metrics})
        detector_names = sorted({d for r in recs for d in r.detectors})
        summaries[policy] = PolicySummary(
            n=len(recs),
            metrics={m: metric_stats([r.metrics[m] for r in recs if m in r.metrics]) for m in metric_names},
            detectors={
                d: detector_stats(
                    [bool(r.detectors[d]["flagged"]) for r in recs], [_reference_flag(r, d) for r in recs]
                )
                for d in detector_names
            },
            reference_detectors={
                d: detector_stats([f for r in recs if (f := _reference_flag(r, d)) is not None]) for d in detector_names
            },
            seconds_per_image=sum(r.seconds_per_image for r in recs) / len(recs),
            guard=guard_stats(recs),
        )
    for policy, items in screened_by_policy(screened).items():
        summary = summaries.setdefault(policy, PolicySummary(n=0))
        summary.screened = len(items)
        summary.metrics.update({m: metric_stats([i.metrics[m] for i in items]) for m in STEP_METRICS})
        summary.metrics = dict(sorted(summary.metrics.items()))
    return summaries


def summary_to_json(summaries: dict[str, PolicySummary]) -> str:
    return json.dumps(
        {"schema_version": SCHEMA_VERSION, "policies": {p: asdict(s) for p, s in summaries.items()}},
        indent=2,
        sort_keys=True,
    )


def sample_values(run_dir: Path) -> Iterator[tuple[str, str, str, float]]:
    """(policy, metric, sample id, value) of every sample a run's records or screening scored, the
    screening's step error last (it covers every sample; records only those with images)."""
    path = run_dir / "records.jsonl"
    for record in read_records(path) if path.is_file() else ():
        for metric, value in record.metrics.items():
            yield record.policy, metric, record.sample_id, value
    for line in read_screening(run_dir):
        for metric, value in line.metrics.items():
            yield line.policy, metric, line.sample_id, value
