"""`evals review RUN_DIR`: the blind A/B review of a finished run (the page), `--summary` (its rates
now) and `--gate` (the suite's human gates judged, exit 0/1 like `evals run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError
from evals.review.outcome import has_review, judge


def add_review_command(sub: Any) -> None:
    review = sub.add_parser(
        "review",
        help="blind A/B review in the browser: people say whether they can tell a candidate's image from the "
        "reference's (votes go to RUN_DIR/reviews.jsonl)",
    )
    review.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory")
    review.add_argument("--candidate", action="append", help="review this candidate (repeatable; default: all)")
    review.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    mode = review.add_mutually_exclusive_group()
    mode.add_argument("--summary", action="store_true", help="print the rates with their 95%% intervals and update "
                      "the reports and MLflow; no page")  # fmt: skip
    mode.add_argument("--gate", action="store_true", help="judge the suite's human gates on the votes so far: exit 0 "
                      "when the run passes, 1 when a gate fails")  # fmt: skip
    review.set_defaults(func=cmd_review)


def _check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory")
    for name in ("run.json", "records.jsonl", "verdict.json"):
        if not (run_dir / name).is_file():
            raise InputError(f"{run_dir}: {name} is missing; only a finished run can be reviewed")


def cmd_review(args: argparse.Namespace) -> int:
    from evals.reports.render import review_lines

    run_dir: Path = args.run_dir
    _check_run_dir(run_dir)
    if not (args.summary or args.gate):
        from evals.review.server import serve

        if not 0 <= args.port <= 65535:
            raise InputError(f"--port {args.port}: expected 0 (a free port) to 65535")
        code = serve(run_dir, args.candidate, args.port)
        if code == 0 and has_review(run_dir):  # the votes so far, into review.json, the reports and MLflow
            try:
                judge(run_dir)
            except InputError as exc:
                print(f"the votes are kept in {run_dir}; the reports were not updated: {exc}", file=sys.stderr)
                return code
            for line in review_lines(run_dir):
                print(line.replace("**", ""))
        return code

    content, passed = judge(run_dir)
    if not content["votes"]:
        print(f"{run_dir}: no votes yet; `evals review {run_dir}` opens the page")
    for line in review_lines(run_dir):
        print(line.replace("**", ""))
    if not args.gate:
        return 0
    import json

    from evals.gates import EXIT_GATE_FAILED, EXIT_PASS

    results = [r for r in json.loads((run_dir / "verdict.json").read_text())["results"] if r.get("human_gate")]
    if not results:
        print(f'{run_dir}: its suite has no human gate (`{{human: indistinguishable_rate, op: ">=", value: 0.9}}`)')
    for r in results:
        print(f"{r['policy']}  {r['gate']}  {r['status'].upper()}  {r['reason']}".rstrip())
    print(f"verdict: {'PASSED' if passed else 'FAILED'}  ({run_dir})")
    return EXIT_PASS if passed else EXIT_GATE_FAILED
