"""Review commands: `evals accept`, `evals compare`, `evals report`, `evals ui`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError


def _mlflow_run_id(run: str) -> str:
    """A run directory (through its mlflow.json) or an MLflow run id."""
    path = Path(run)
    if path.is_dir():
        from evals.publish import logged_state

        state = logged_state(path)
        if state is None:
            raise InputError(f"{run}: this run is not (completely) in MLflow; `evals log {run}` first")
        return str(state["run_id"])
    if not run.isalnum():
        raise InputError(f"{run!r}: expected a run directory or an MLflow run id (32 hex characters)")
    return run


def cmd_accept(args: argparse.Namespace) -> int:
    from evals.tracking import MlflowTracker

    run_id = _mlflow_run_id(args.run)
    tracker = MlflowTracker()
    try:
        accepted = tracker.accept(run_id, force=args.force)
    except Exception as exc:
        raise InputError(f"cannot accept {args.run}: {exc} (--force accepts it anyway)") from exc
    for policy, candidate_id, replaced in accepted:
        print(f"baseline of {policy}: run {candidate_id}" + (f" (replaces run {replaced})" if replaced else ""))
    return 0


def _policy_metrics(run: str) -> dict[str, dict[str, float]]:
    """Policy -> flat summary metrics, from a run directory or from MLflow."""
    path = Path(run)
    if path.is_dir():
        from evals.records import read_records, summarize
        from evals.step_error.screening import read_screening

        records_file = path / "records.jsonl"
        if not records_file.is_file():
            raise InputError(f"{run}: no records.jsonl; not a run directory")
        return {p: s.flat() for p, s in summarize(read_records(records_file), read_screening(path)).items()}
    from evals.tracking import MlflowTracker

    client = MlflowTracker().client
    run_id = _mlflow_run_id(run)
    try:
        parent = client.get_run(run_id)
    except Exception as exc:
        raise InputError(f"{run}: no such MLflow run ({exc})") from exc
    if "policy" in parent.data.tags:
        return {parent.data.tags["policy"]: dict(parent.data.metrics)}
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    return {c.data.tags.get("policy", c.info.run_name): dict(c.data.metrics) for c in children}


def differences(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Every (policy, metric) whose value differs between run A and run B, for the policies both
    runs have; a policy in one run only is one row (`only_in`), not a row per metric."""
    out: list[dict[str, Any]] = []
    for policy in sorted(set(a) | set(b)):
        if policy not in a or policy not in b:
            out.append({"policy": policy, "only_in": "A" if policy in a else "B"})
            continue
        left, right = a[policy], b[policy]
        for name in sorted(set(left) | set(right)):
            x, y = left.get(name, math.nan), right.get(name, math.nan)
            if x == y or (math.isnan(x) and math.isnan(y)):
                continue
            out.append({"policy": policy, "metric": name, "a": x, "b": y, "b_minus_a": y - x})
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from evals.reports.render import text_table

    rows = differences(_policy_metrics(args.run_a), _policy_metrics(args.run_b))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    only = [r for r in rows if "only_in" in r]
    changed = [r for r in rows if "only_in" not in r]
    if not rows:
        print("no differences")
    if changed:
        table = [
            [r["policy"], r["metric"], f"{r['a']:.6g}", f"{r['b']:.6g}", f"{r['b_minus_a']:+.4g}"] for r in changed
        ]
        print(text_table(table, ["policy", "metric", "A", "B", "B - A"]))
    elif only:
        print("no differences in the policies both runs have")
    for r in only:
        print(f"{r['policy']}: only in run {r['only_in']} ({args.run_a if r['only_in'] == 'A' else args.run_b})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evals.reports.html import write_reports

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory")
    for name in ("run.json", "records.jsonl", "summary.json", "verdict.json"):
        if not (run_dir / name).is_file():
            raise InputError(f"{run_dir}: {name} is missing; only a finished run has a report")
    from evals.rundir import check_no_links

    check_no_links(run_dir)  # the report is written into it
    from evals.review.outcome import has_review, judge

    if has_review(run_dir):  # the votes so far: review.json, the human gates, MLflow (reports too)
        judge(run_dir)
    for path in write_reports(run_dir):
        print(f"written: {path}")
    return 0


def review_command() -> str:
    """A command that opens the MLflow review from the shell the user is in: `nox -s ui` inside a
    nox session (its virtualenv is not on the user's PATH), else `evals ui` when that is this
    installation's command, else its full path."""
    import os
    import shutil

    if os.environ.get("NOX_CURRENT_SESSION"):
        return "nox -s ui"
    ours = Path(sys.executable).parent / "evals"
    found = shutil.which("evals")
    if found and ours.is_file() and Path(found).resolve() == ours.resolve():
        return "evals ui"
    return f"{ours} ui" if ours.is_file() else f"{sys.executable} -m evals ui"


def _experiment_urls(server: str) -> list[str]:
    """`name: URL` of every suite experiment in the store, opened on its runs in the review view."""
    from evals.mlflow_review import experiment_url
    from evals.tracking import MlflowTracker, store_exists

    if not store_exists():
        return []
    client = MlflowTracker().client
    return [
        f"  {e.name}: {experiment_url(server, e.experiment_id)}"
        for e in client.search_experiments()
        if e.name != "Default"
    ]


def _die_with_parent() -> None:
    """In the server's process: stop when `evals ui` dies, even by kill -9 (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI as a child process group that ends with this command (Ctrl-C, SIGTERM, or its
    death), never left holding the port."""
    import os
    import subprocess

    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    server = f"http://127.0.0.1:{args.port}"
    command = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(args.port)]
    command += ["--backend-store-uri", uri]
    print(f"MLflow UI for {uri} at {server} (Ctrl-C stops it)", file=sys.stderr)
    urls = _experiment_urls(server)
    if urls:
        print("suites, opened on their runs with the verdict and headline metrics as columns:", file=sys.stderr)
        print("\n".join(urls), file=sys.stderr)
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        return child.wait()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM through evals.cli's handler
        return 0
    finally:
        _stop_group(child)


def _stop_group(child: Any, grace: float = 5.0) -> None:
    """SIGTERM to the server's process group (the server, its web workers, its job consumers), then
    wait until every one has gone; SIGKILL what is left after `grace` seconds."""
    import os
    import signal
    import time

    try:
        os.killpg(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(0.2)
            child.poll()  # reap the server: a zombie would keep the group alive
            os.killpg(child.pid, 0)  # raises once the group is empty
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def add_review_commands(sub: Any) -> None:
    accept = sub.add_parser("accept", help="make a run the baseline of its suite for each of its policies (MLflow)")
    accept.add_argument("run", metavar="RUN", help="a run directory, or an MLflow run id (parent or candidate)")
    accept.add_argument("--force", action="store_true", help="accept candidates that failed their gates")
    accept.set_defaults(func=cmd_accept)
    compare = sub.add_parser("compare", help="metric differences between two runs")
    compare.add_argument("run_a", metavar="RUN_A", help="run directory or MLflow run id")
    compare.add_argument("run_b", metavar="RUN_B", help="run directory or MLflow run id")
    compare.add_argument("--json", action="store_true", help="machine-readable output")
    compare.set_defaults(func=cmd_compare)
    report = sub.add_parser("report", help="re-render a run's HTML, Markdown and JUnit reports from its directory")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.set_defaults(func=cmd_report)
    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the store runs are logged to")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.set_defaults(func=cmd_ui)
