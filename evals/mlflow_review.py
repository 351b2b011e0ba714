"""What makes an MLflow experiment a review page: the experiment kind, run names and headline
metrics that say the verdict, a saved view of the runs table, and no run left RUNNING by a process
that is gone. Everything here takes an `MlflowClient`; evals/tracking.py calls it.

MLflow 3's UI opens an experiment on its GenAI pages unless the experiment's `mlflow.experimentKind`
tag says otherwise (and, with the UI's workflow switch, unless the URL asks for `machine_learning`).
Its runs table restores a column selection from an experiment tag `mlflow.sharedViewState.<key>`
when the URL names the key (`viewStateShareKey`): the table opens with the verdict and each
candidate's headline metrics instead of MLflow's source/model/dataset columns.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterable, Mapping
from typing import Any

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
VIEW_KEY = "evals-review"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
HOST_TAG, PID_TAG = "evals.host", "evals.pid"
HEADLINE_STATS = ("mean",)
"""Each metric's statistics a parent run carries per candidate (`rowwise/psnr_mean`)."""


def experiment_id(client: Any, name: str) -> str:
    """The suite's experiment, created as a model-development experiment (runs first, not traces);
    an experiment made by an older version gets the kind tag too."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return str(client.create_experiment(name, tags=EXPERIMENT_TAGS))
    for key, value in EXPERIMENT_TAGS.items():
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return str(found.experiment_id)


def owner_tags() -> dict[str, str]:
    """Which process holds a run open: a later run on this host ends it if that process is gone."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def end_abandoned_runs(client: Any, experiment: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose owner on this host has died (kill -9,
    a lost machine): MLflow would show it running forever. Returns their run ids."""
    host = socket.gethostname()
    running = client.search_runs(
        [experiment], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    ended = []
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def headline_metrics(summaries: Mapping[str, Any], verdict: Mapping[str, Any], candidates: Iterable[str]) -> dict:
    """The parent run's metrics: `<candidate>/<metric>_mean` and `<candidate>/gates_failed` for every
    candidate, `candidates_failed` and `passed` (1 or 0) for the run: the runs table then compares
    builds without opening the nested runs."""
    out: dict[str, float] = {}
    failed = 0
    for name in candidates:
        summary = summaries.get(name)
        if summary is not None:
            for metric, stats in summary.metrics.items():
                for stat in HEADLINE_STATS:
                    value = stats.get(stat)
                    if value is not None and not math.isnan(value):
                        out[f"{name}/{metric}_{stat}"] = round(float(value), 4)  # a table cell, not a record
        blocking = gates_failed(verdict, name)
        out[f"{name}/gates_failed"] = float(blocking)
        failed += blocking > 0
    out["candidates_failed"] = float(failed)
    out["passed"] = 1.0 if verdict.get("passed") else 0.0
    return out


def gates_failed(verdict: Mapping[str, Any], candidate: str) -> int:
    """The candidate's gates that failed the run (warnings do not)."""
    return sum(
        1
        for r in verdict.get("results", [])
        if r["policy"] == candidate and not r["passed"] and r.get("severity", "fail") == "fail"
    )


def run_name(suite: str, verdict: Mapping[str, Any], candidates: list[str]) -> str:
    """`smoke: PASS (4 candidates)` or `smoke: FAIL rowwise, weight-only`."""
    failing = [c for c in candidates if gates_failed(verdict, c)]
    if verdict.get("passed"):
        return f"{suite}: PASS ({len(candidates)} candidate{'s' if len(candidates) != 1 else ''})"
    return f"{suite}: FAIL {', '.join(failing)}" if failing else f"{suite}: FAIL"


def candidate_run_name(candidate: str, passed: bool) -> str:
    return f"{candidate}: {'pass' if passed else 'FAIL'}"


def column(kind: str, key: str) -> str:
    """A runs-table column id as MLflow's UI writes it (`metrics.\\`psnr_mean\\``)."""
    return f"{kind}.`{key}`"


def review_view(candidates: list[str], metrics: list[str]) -> dict[str, Any]:
    """The runs table's view: newest first; verdict, suite and model; each candidate's headline
    metrics and failed gates (on parent rows), and the same metrics unprefixed (on candidate rows)."""
    columns = [column("tags", "verdict"), column("tags", "policy"), column("metrics", "candidates_failed")]
    columns += [column("metrics", f"{m}_mean") for m in metrics]  # the candidate rows' own figures
    for name in candidates:
        columns += [column("metrics", f"{name}/{m}_mean") for m in metrics]
        columns.append(column("metrics", f"{name}/gates_failed"))
    columns += [column("params", "model"), column("tags", "run_dir")]
    # Wide enough for the header (`fp8-e4m3-rowwise/psnr_mean`): MLflow cuts every header to 150 px.
    # MLflow applies widths to the columns `columnOrder` names.
    widths = {c: max(110, 7 * len(c.split("`")[1]) + 40) for c in columns}
    widths[column("attributes", "Run Name")] = 300
    return {
        "selectedColumns": columns,
        "columnOrder": list(widths),
        "columnWidths": widths,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }


CANDIDATES_TAG = "evals.candidates"
MAX_VIEW_CANDIDATES = 12


def save_review_view(client: Any, experiment: str, candidates: list[str], metrics: list[str]) -> None:
    """The experiment's review view, over this run's candidates and then those of earlier runs (the
    most recent first, at most MAX_VIEW_CANDIDATES)."""
    tags = client.get_experiment(experiment).tags
    try:
        earlier = [str(c) for c in json.loads(tags.get(CANDIDATES_TAG, "[]"))]
    except ValueError:
        earlier = []
    shown = list(dict.fromkeys([*candidates, *earlier]))[:MAX_VIEW_CANDIDATES]
    client.set_experiment_tag(experiment, CANDIDATES_TAG, json.dumps(shown))
    client.set_experiment_tag(experiment, VIEW_TAG, json.dumps(review_view(shown, metrics)))


def experiment_url(server: str, experiment: str) -> str:
    """The experiment's runs table in the UI at `server`, in the saved review view."""
    query = f"viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
    return f"{server.rstrip('/')}/#/experiments/{experiment}/runs?{query}"
