"""The MLflow view of a finished run directory: what a live run logs at its end, and what
`evals log RUN_DIR` logs later for a run whose MLflow store was unreachable.

The run directory is the source of truth; this module only reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.records import PolicySummary, SampleRecord, read_records, summarize
from evals.rundir import write_json
from evals.yamlspec import InputError

RUN_FILES = ("run.json", "records.jsonl", "summary.json", "verdict.json", "summary.md", "report.html", "junit.xml")
LOGGED_FILE = "mlflow.json"
"""Written into the run directory once MLflow holds the whole run: where, and under which run id."""


def candidate_params(name: str, sha256: str, backends: str, run_params: dict[str, Any]) -> dict[str, Any]:
    return {"policy": name, "policy_sha256": sha256, "backend": backends, **run_params}


def sample_table(records: list[SampleRecord], detectors: Sequence[str]) -> dict[str, list[Any]]:
    """The per-sample table of one candidate, as MLflow's table view shows it."""
    return {
        "sample_id": [r.sample_id for r in records],
        "case_id": [r.case_id for r in records],
        "seed": [r.seed for r in records],
        "prompt": [r.prompt for r in records],
        **{m: [r.metrics.get(m) for r in records] for m in sorted({k for r in records for k in r.metrics})},
        **{f"{d}_flagged": [bool(r.detectors[d]["flagged"]) for r in records] for d in detectors},
        "image": [r.image for r in records],
        "reference_image": [r.reference_image for r in records],
    }


def publish_results(
    tracker: Any,
    run_dir: Path,
    candidates: list[str],
    detectors: Sequence[str],
    records: list[SampleRecord],
    summaries: dict[str, PolicySummary],
    verdict: dict[str, Any],
) -> None:
    """Each candidate's summary metrics, table, plan and verdict tag; then the run's files and verdict."""
    for name in candidates:
        passed = all(r["passed"] for r in verdict["results"] if r["policy"] == name)
        summary = summaries.get(name)
        tracker.finish_candidate(
            name,
            summary.flat() if summary else {},
            sample_table([r for r in records if r.policy == name], detectors),
            [run_dir / "plans" / f"{name}.json"],
            {"verdict": "pass" if passed else "fail"},
        )
    files = [run_dir / n for n in (*RUN_FILES, "notes.json", "timings.json") if (run_dir / n).is_file()]
    tracker.finish_run(files, {"verdict": "pass" if verdict["passed"] else "fail"}, failed=False)


def mark_logged(run_dir: Path, tracker: Any) -> None:
    """Record where the run went, if its tracker is MLflow and it never failed."""
    from evals.tracking import mlflow_tracker

    layer = mlflow_tracker(tracker)
    if layer is not None and layer.parent_id is not None:
        write_json(run_dir / LOGGED_FILE, {"tracking_uri": layer.tracking_uri, "run_id": layer.parent_id})


def log_run_dir(run_dir: Path, force: bool = False) -> tuple[str, str]:
    """Log a finished run directory to the MLflow store (`MLFLOW_TRACKING_URI`, else ./mlflow.db);
    returns (tracking URI, parent run id). Errors of the store are raised, not swallowed."""
    from evals.tracking import MlflowTracker

    try:
        run = json.loads((run_dir / "run.json").read_text())
        verdict = json.loads((run_dir / "verdict.json").read_text())
    except FileNotFoundError as exc:
        raise InputError(
            f"{run_dir}: {Path(exc.filename).name} is missing; only a finished run can be logged "
            f"(finish it with `evals run --resume {run_dir}`)"
        ) from exc
    except ValueError as exc:
        raise InputError(f"{run_dir}: unreadable run files ({exc})") from exc
    logged = run_dir / LOGGED_FILE
    if logged.is_file() and not force:
        before = json.loads(logged.read_text())
        raise InputError(
            f"{run_dir}: already in MLflow as run {before['run_id']} at {before['tracking_uri']}; "
            "pass --force to log it again"
        )
    tracking = run.get("tracking", {"params": {}, "tags": {}})
    records = list(read_records(run_dir / "records.jsonl"))
    candidates = [p["name"] for p in run["policies"]]
    detectors = sorted({d for r in records for d in r.detectors})
    tracker = MlflowTracker()
    tracker.start_run(
        run["suite"]["name"], run_dir.name, tracking["params"], {**tracking["tags"], "logged_later": "true"}
    )
    for p in run["policies"]:
        tracker.start_candidate(p["name"], candidate_params(p["name"], p["sha256"], p["backends"], tracking["params"]))
    for record in records:
        if record.policy == candidates[0]:
            tracker.log_reference_image(record.sample_id, run_dir / record.reference_image)
        tracker.log_candidate_image(
            record.policy, record.sample_id, run_dir / record.image, run_dir / record.reference_image
        )
    summaries = summarize(records)
    stored = json.loads((run_dir / "summary.json").read_text()).get("policies", {})
    for name, summary in summaries.items():  # bench figures are not in the records
        summary.bench = stored.get(name, {}).get("bench", {})
    publish_results(tracker, run_dir, candidates, detectors, records, summaries, verdict)
    assert tracker.parent_id is not None
    write_json(logged, {"tracking_uri": tracker.tracking_uri, "run_id": tracker.parent_id})
    return tracker.tracking_uri, tracker.parent_id
