"""What a review's votes say, written into the run directory: review.json (every candidate's rates
with their intervals, per reviewer and overall, and the samples told apart most), the suite's human
gates judged into verdict.json, the reports rendered again, and the figures logged to the run's MLflow
runs when MLflow holds it. Used by `evals review --summary/--gate` and `evals report`. No torch."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError
from evals.review.rates import flat, review_figures, to_dict
from evals.review.votes import REVIEWS_FILE, read_votes
from evals.rundir import write_json

log = logging.getLogger(__name__)

REVIEW_FILE = "review.json"


def _run_json(run_dir: Path) -> dict[str, Any]:
    try:
        run: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
        return run
    except (OSError, ValueError) as exc:
        raise InputError(f"{run_dir}: not a finished run directory (run.json: {exc})") from exc


def gated_candidates(run: dict[str, Any]) -> list[str]:
    return [p["name"] for p in run["policies"] if not p.get("noise_floor")]


def human_gates(run_dir: Path, run: dict[str, Any]) -> list[Any]:
    """The human gates of the run's suite, as the run was made with it (the file must not have
    changed since: its gates are what the run is judged by)."""
    from evals.suite import load_suite

    path = run["suite"]["path"]
    if not Path(path).is_file():
        raise InputError(f"{run_dir}: its suite {path} no longer exists; the human gates are read from it")
    suite = load_suite(path)
    if suite.sha256 != run["suite"]["sha256"]:
        raise InputError(f"{run_dir}: {path} changed since the run; its human gates cannot be judged against it")
    return [g for g in suite.gates if g.human is not None]


def judge(run_dir: Path) -> tuple[dict[str, Any], bool]:
    """Write review.json, judge the human gates into verdict.json, render the reports again and log
    the figures to MLflow; returns (review.json's content, the run's verdict passed)."""
    from evals.gates import evaluate_gate
    from evals.reports.html import write_reports

    run = _run_json(run_dir)
    votes = read_votes(run_dir)
    reviews = review_figures(votes)
    content = {"votes": len(votes), "candidates": {name: to_dict(r) for name, r in reviews.items()}}
    write_json(run_dir / REVIEW_FILE, content)
    figures = {name: flat(r) for name, r in reviews.items()}
    verdict = json.loads((run_dir / "verdict.json").read_text())
    results = [r for r in verdict["results"] if not r.get("human_gate")]
    for gate in human_gates(run_dir, run):
        for name in gated_candidates(run):
            results.append(evaluate_gate(name, None, gate, human=figures.get(name, {})).to_dict())
    passed = not any(r["status"] == "fail" for r in results)
    write_json(run_dir / "verdict.json", {"passed": passed, "results": results})
    write_reports(run_dir)
    _log_to_mlflow(run_dir, figures)
    return content, passed


def _log_to_mlflow(run_dir: Path, figures: dict[str, dict[str, float]]) -> None:
    """The figures on each candidate's MLflow run, when MLflow holds the run; else a note."""
    from evals.publish import logged_state

    state = logged_state(run_dir)
    if state is None:
        log.info(f"{run_dir} is not in MLflow: the review's figures are in {REVIEW_FILE} (`evals log` logs the run)")
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=state["tracking_uri"])
    now = int(time.time() * 1000)
    for name, values in figures.items():
        run_id = state.get("candidates", {}).get(name)
        if run_id:
            metrics = [Metric(k, v, now, 0) for k, v in values.items() if not math.isnan(v)]
            client.log_batch(run_id, metrics=metrics)
            client.set_tag(run_id, "human_review_votes", str(int(values.get("human_votes", 0))))


def has_review(run_dir: Path) -> bool:
    return (run_dir / REVIEWS_FILE).is_file()
