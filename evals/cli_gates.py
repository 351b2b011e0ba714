"""`evals gates suggest RUN_DIR`: gate thresholds from a trusted run, printed or written as YAML.

Reads the run directory, checks it is a finished run with a candidate to trust, and hands its records
to `evals.gate_suggest`. Bad input raises InputError (exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.gate_suggest import NOISE_FLOOR_NAME, NOT_GATED, Margin, parse_margin, render, suggest
from evals.models.yamlspec import InputError

if TYPE_CHECKING:
    from evals.records import SampleRecord

RUN_FILES = "run.json, records.jsonl, summary.json"


@dataclass(frozen=True)
class TrustedRun:
    run_dir: Path
    """The run directory."""
    run: dict[str, Any]
    """Its run.json."""
    records: list[SampleRecord]
    """Every record of records.jsonl."""
    candidates: list[str]
    """Candidate policies (the noise floor excluded), in run.json's order."""
    noise_floor: str | None
    """The noise floor's name when the run has one."""
    failed: list[str]
    """Candidates with a failed gate in verdict.json (when there is one)."""


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: missing; expected {what} (a finished run directory has {RUN_FILES})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it ({exc}); expected {what}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("policies"), list | dict):
        raise InputError(f"{path}: expected {what} with a 'policies' entry")
    return data


def load_trusted_run(run_dir: Path) -> TrustedRun:
    """Read and check a finished run directory; InputError naming the file when it is not one."""
    from evals.records import read_records

    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such directory; expected a finished run directory ({RUN_FILES})")
    run = _json(run_dir / "run.json", "the run's description (run.json)")
    if not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in run["policies"]):
        raise InputError(f"{run_dir / 'run.json'}: expected 'policies' to be a list of {{name: ...}}")
    summary = _json(run_dir / "summary.json", "the run's per-policy summary (summary.json)")
    records_path = run_dir / "records.jsonl"
    if not records_path.is_file():
        raise InputError(f"{records_path}: missing; expected one scored sample per line ({RUN_FILES})")
    try:
        records = list(read_records(records_path))
    except (OSError, ValueError, InputError) as exc:
        raise InputError(f"{records_path}: cannot read it ({exc}); expected one SampleRecord per line") from exc
    if not records:
        raise InputError(f"{records_path}: no records; expected one scored sample per line")
    counts: dict[str, int] = {}
    for r in records:
        counts[r.policy] = counts.get(r.policy, 0) + 1
    for policy, n in counts.items():
        entry = summary["policies"].get(policy) if isinstance(summary["policies"], dict) else None
        said = entry.get("n") if isinstance(entry, dict) else None
        if said != n:
            raise InputError(
                f"{run_dir / 'summary.json'}: {policy} has {said} samples there and {n} in records.jsonl; "
                "expected a finished run (finish it with `evals run --resume`)"
            )
    floors = {p["name"] for p in run["policies"] if p.get("noise_floor")} | ({NOISE_FLOOR_NAME} & set(counts))
    order = [p["name"] for p in run["policies"]] + sorted(counts)
    candidates = list(dict.fromkeys(p for p in order if p in counts and p not in floors))
    if not candidates:
        raise InputError(
            f"{records_path}: only the noise floor was scored; expected at least one candidate to derive gates from"
        )
    failed: list[str] = []
    verdict_path = run_dir / "verdict.json"
    if verdict_path.is_file():
        try:
            results = json.loads(verdict_path.read_text(encoding="utf-8")).get("results", [])
            failed = sorted({r["policy"] for r in results if r.get("status") == "fail"})
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            raise InputError(f"{verdict_path}: cannot read it ({exc}); expected the run's gate verdict") from exc
    noise_floor = next((p for p in order if p in floors and p in counts), None)
    return TrustedRun(run_dir, run, records, candidates, noise_floor, failed)


def _margin(text: str) -> tuple[str, Margin]:
    try:
        return parse_margin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _header(trusted: TrustedRun, policies: list[str]) -> list[str]:
    run = trusted.run
    suite = run.get("suite", {}).get("name", "?") if isinstance(run.get("suite"), dict) else "?"
    env = run.get("environment", {}) if isinstance(run.get("environment"), dict) else {}
    lines = [
        f"Gates suggested by `evals gates suggest` from {trusted.run_dir}",
        f"suite {suite}; device {env.get('device', '?')}, reference {run.get('reference_dtype', '?')}; "
        f"trusted: {', '.join(policies)}",
        f"noise floor: {trusted.noise_floor} (the reference against itself under a harmless change)"
        if trusted.noise_floor
        else "noise floor: none in this run (`noise_floor: true` in the suite adds one; thresholds are then "
        "checked against it)",
        "Paste the entries under your suite's `gates:` key; thresholds hold on this platform only.",
    ]
    bad = sorted(set(trusted.failed) & set(policies))
    if bad:
        lines.append(f"WARNING: {', '.join(bad)} failed gates in this run (verdict.json): is it really trusted?")
    return lines


def cmd_gates_suggest(args: argparse.Namespace) -> int:
    trusted = load_trusted_run(args.run_dir)
    policies: list[str] = list(dict.fromkeys(args.policy)) or trusted.candidates
    for policy in policies:
        if policy == trusted.noise_floor:
            raise InputError(f"--policy {policy}: the noise floor is evidence, not a candidate to derive gates from")
        if policy not in trusted.candidates:
            raise InputError(
                f"--policy {policy}: not a candidate of {args.run_dir} (it has {', '.join(trusted.candidates)})"
            )
    margins = dict(args.margin)
    present = {m for r in trusted.records if r.policy in policies for m in r.metrics}
    absent = sorted(set(margins) - (present - set(NOT_GATED)))
    if absent:
        raise InputError(
            f"--margin {', '.join(absent)}: not gated in {args.run_dir} (its gated metrics: "
            f"{', '.join(sorted(present - set(NOT_GATED)))})"
        )
    out: Path | None = args.out
    if out is not None and out.exists() and not args.force:
        raise InputError(f"{out}: already exists; --force replaces it")
    entries = suggest(trusted.records, policies, trusted.noise_floor, margins)
    text = render(entries, _header(trusted, policies))
    for entry in entries:
        for warning in entry.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if out is None:
        sys.stdout.write(text)
        return 0
    from evals.rundir import write_atomic

    write_atomic(out, text)
    print(f"written: {out} ({sum(e.gate is not None for e in entries)} gates)", file=sys.stderr)
    return 0


def add_gates_commands(sub: Any) -> None:
    gates = sub.add_parser("gates", help="gate tools: suggest thresholds from a trusted run")
    actions = gates.add_subparsers(dest="gates_command", required=True)
    suggest_cmd = actions.add_parser(
        "suggest",
        help="derive gate thresholds from a trusted run's distributions and noise floor; print them as YAML",
        description="Print (or --out) YAML `gates:` entries for the run's metrics and detectors, each with "
        "its evidence as comments: worst trusted value moved by a margin, checked against the noise floor.",
    )
    suggest_cmd.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run directory")
    suggest_cmd.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="POLICY",
        help="trust this candidate of the run (repeatable; default: every candidate but the noise floor)",
    )
    suggest_cmd.add_argument(
        "--margin",
        action="append",
        default=[],
        type=_margin,
        metavar="NAME=VALUE",
        help="margin of a metric in its unit (psnr=1.5 dB, lpips=0.02), or relative to the trusted value "
        "(lpips=10%%); repeatable. Defaults: psnr 1 dB, ssim 0.01, lpips 0.01, clip_score_delta 0.5",
    )
    suggest_cmd.add_argument("--out", type=Path, metavar="FILE", help="write the YAML here instead of stdout")
    suggest_cmd.add_argument("--force", action="store_true", help="replace an existing --out file")
    suggest_cmd.set_defaults(func=cmd_gates_suggest)
