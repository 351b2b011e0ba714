"""`evals monitor LOG --suite SUITE`: sampled quality monitoring of a production build (evals.monitor).
Exit codes as `evals run`: 0 gates passed, 1 a gate failed, 2 bad input (a bad log line names its
file and line), 3 the run broke."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a share above 0, at most 1 (e.g. 0.05)")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of entries, 1 or more")
    return int(text)


def cmd_monitor(args: argparse.Namespace) -> int:
    from evals.monitor import MonitorRequest, run_monitor
    from evals.reports.render import gate_table_text

    if args.suite is None:
        raise InputError("evals monitor: --suite SUITE names the model, metrics, detectors and gates to apply")
    request = MonitorRequest(
        log=args.log,
        suite=args.suite,
        name=args.name,
        rate=args.sample_rate,
        count=args.sample_count,
        device=args.device,
        runs_dir=args.runs_dir,
        mlflow=not args.no_mlflow,
        progress=not args.no_progress,
    )
    outcome = run_monitor(request)
    print(gate_table_text(outcome.run_dir))
    print(
        f"monitored {outcome.entries} logged images, {outcome.sampled} compared with the reference: {outcome.run_dir}"
    )
    code: int = outcome.verdict.exit_code
    return code


def add_monitor_command(sub: Any) -> None:
    monitor = sub.add_parser(
        "monitor", help="sampled quality monitoring: a production log's images against a regenerated reference"
    )
    monitor.set_defaults(func=cmd_monitor)
    monitor.add_argument("log", type=Path, help="JSON Lines log of production generations (docs/production.md)")
    monitor.add_argument("--suite", type=Path, help="suite whose model, metrics, detectors and gates apply")
    sample = monitor.add_mutually_exclusive_group()
    sample.add_argument("--sample-rate", type=_rate, help="share of entries whose reference is regenerated")
    sample.add_argument("--sample-count", type=_count, help="number of entries whose reference is regenerated")
    monitor.add_argument("--name", default="production", help="what the logged build is called (default production)")
    monitor.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    monitor.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the run directory goes")
    monitor.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    monitor.add_argument("--no-progress", action="store_true", help="no progress bar")
