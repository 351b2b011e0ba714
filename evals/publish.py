"""The MLflow view of a finished run directory: what a live run logs at its end, and what
`evals log RUN_DIR` logs later for a run whose MLflow store was unreachable.

The run directory is the source of truth; this module only reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.mlflow_review import headline_metrics, run_name
from evals.models.yamlspec import InputError
from evals.records import PolicySummary, SampleRecord, read_records, summarize
from evals.step_error.locate import LAYERS_FOLDER, LOCATE_FILE
from evals.step_error.screening import read_screening
from evals.tracker_protocol import Tracker

RUN_FILES = ("run.json", "records.jsonl", "summary.json", "verdict.json", "summary.md", "report.html", "junit.xml")
LOGGED_FILE = "mlflow.json"
"""Where the run is in MLflow (tracking URI, run ids), written when its MLflow run starts; `complete`
turns true once MLflow holds the whole run. A resume reopens the run it names."""


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
    tracker: Tracker,
    run_dir: Path,
    candidates: list[str],
    detectors: Sequence[str],
    records: list[SampleRecord],
    summaries: dict[str, PolicySummary],
    verdict: dict[str, Any],
) -> None:
    """Each candidate's summary metrics, table, plan and verdict tag (and, for a failed one, the layer
    its step error jumps at); then the run's files and verdict."""
    located = json.loads((run_dir / LOCATE_FILE).read_text()) if (run_dir / LOCATE_FILE).is_file() else {}
    for name in candidates:
        passed = all(r["passed"] for r in verdict["results"] if r["policy"] == name)
        summary = summaries.get(name)
        metrics = summary.flat() if summary else {}
        tags = {"verdict": "pass" if passed else "fail"}
        if name in located:
            tags["step_error_jump"] = located[name]["text"]
            if located[name].get("ratio") is not None:
                metrics["step_error_jump_ratio"] = located[name]["ratio"]
        profile = run_dir / LAYERS_FOLDER / f"{name}.json"
        tracker.finish_candidate(
            name,
            metrics,
            sample_table([r for r in records if r.policy == name], detectors),
            [run_dir / "plans" / f"{name}.json", *([profile] if profile.is_file() else [])],
            tags,
        )
    names = (*RUN_FILES, "notes.json", "timings.json", LOCATE_FILE)
    files = [run_dir / n for n in names if (run_dir / n).is_file()]
    suite = json.loads((run_dir / "run.json").read_text())["suite"]["name"]
    gated = [n for n in candidates if any(r["policy"] == n for r in verdict["results"])] or candidates
    tracker.finish_run(
        files,
        {"verdict": "pass" if verdict["passed"] else "fail", "suite": suite, "policies": ",".join(candidates)},
        failed=False,
        metrics=headline_metrics(summaries, verdict, gated),
        name=run_name(suite, verdict, gated),
    )


def logged_state(run_dir: Path) -> dict[str, Any] | None:
    """The run directory's mlflow.json, if MLflow holds the whole run (older files have no
    `complete` key and were written only then)."""
    path = run_dir / LOGGED_FILE
    if not path.is_file():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    return state if state.get("complete", True) else None


def log_run_dir(run_dir: Path, force: bool = False) -> tuple[str, str]:
    """Log a finished run directory to the MLflow store (`MLFLOW_TRACKING_URI`, else ./mlflow.db);
    returns (tracking URI, parent run id). Errors of the store are raised, not swallowed."""
    from evals.tracking import MlflowTracker

    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory")
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
    before = logged_state(run_dir)
    if before is not None and not force:
        raise InputError(
            f"{run_dir}: already in MLflow as run {before['run_id']} at {before['tracking_uri']}; "
            "pass --force to log it again"
        )
    tracking = run.get("tracking", {"params": {}, "tags": {}})
    records = list(read_records(run_dir / "records.jsonl"))
    candidates = [p["name"] for p in run["policies"]]
    detectors = sorted({d for r in records for d in r.detectors})
    tracker = MlflowTracker()
    name = run["suite"]["name"]
    tracker.start_run(name, f"{name}: logging", tracking["params"], {**tracking["tags"], "logged_later": "true"})
    tracker.state_file = run_dir / LOGGED_FILE  # written at the end, once MLflow holds the whole run
    for p in run["policies"]:
        tracker.start_candidate(p["name"], candidate_params(p["name"], p["sha256"], p["backends"], tracking["params"]))
    for record in records:
        if record.policy == candidates[0]:
            tracker.log_reference_image(record.sample_id, run_dir / record.reference_image)
        tracker.log_candidate_image(
            record.policy, record.sample_id, run_dir / record.image, run_dir / record.reference_image
        )
    summaries = summarize(records, read_screening(run_dir))
    stored = json.loads((run_dir / "summary.json").read_text()).get("policies", {})
    for name, summary in summaries.items():  # bench figures are not in the records
        summary.bench = stored.get(name, {}).get("bench", {})
    publish_results(tracker, run_dir, candidates, detectors, records, summaries, verdict)
    assert tracker.parent_id is not None
    return tracker.tracking_uri, tracker.parent_id
