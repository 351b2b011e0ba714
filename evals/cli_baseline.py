"""`evals baseline update RUN_DIR`: write a passing run's summaries as the suite's committed baselines."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read it ({exc}); is this a finished run directory?") from exc


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4g}"


def cmd_baseline_update(args: argparse.Namespace) -> int:
    from evals import baselines
    from evals.gates import NO_PROFILE
    from evals.records import PolicySummary, sample_values
    from evals.step_error.locate import read_profile
    from evals.suite import load_suite

    run_dir: Path = args.run_dir
    run = _read_json(run_dir / "run.json")
    summary = _read_json(run_dir / "summary.json")
    verdict = _read_json(run_dir / "verdict.json")
    suite = load_suite(Path(run["suite"]["path"]))
    if suite.sha256 != run["suite"]["sha256"] and not args.force:
        raise InputError(f"{run['suite']['path']} changed since {run_dir} ran: run it again (or --force)")
    gated = [p["name"] for p in run["policies"] if not p.get("noise_floor")]
    chosen = args.policy or gated
    unknown = sorted(set(chosen) - set(gated))
    if unknown:
        raise InputError(f"--policy {', '.join(unknown)}: not a candidate of {run_dir} (it has {', '.join(gated)})")

    # A baseline gate that failed for want of a baseline is what this command mends; any other failure,
    # a regression against an existing baseline included, is a build nobody should accept by default.
    def blocks(r: dict[str, Any]) -> bool:
        wants_baseline = (bool(r.get("baseline_gate")) and r["baseline"] is None) or r.get("reason") == NO_PROFILE
        return r["status"] == "fail" and r["policy"] in chosen and not wants_baseline

    failed = sorted({r["policy"] for r in verdict["results"] if blocks(r)})
    if failed and not args.force:
        raise InputError(
            f"{run_dir}: {', '.join(failed)} failed gates in this run; a baseline must be a build you accept "
            "(fix it, or --force if you mean it)"
        )
    platform = baselines.platform_key(run["environment"]["device"], run["reference_dtype"])
    folder = baselines.baselines_folder(suite.path, suite.name, suite.baselines)
    flat = {name: PolicySummary(**summary["policies"][name]).flat() for name in chosen}
    samples: dict[str, dict[str, dict[str, float]]] = {name: {} for name in chosen}
    try:
        for policy, metric, sample_id, value in sample_values(run_dir):
            if policy in samples:
                samples[policy].setdefault(metric, {})[sample_id] = value
    except (OSError, ValueError, KeyError, InputError) as exc:
        raise InputError(f"{run_dir}: cannot read its records or screening ({exc})") from exc
    provenance = {
        "run": run_dir.name,
        "git_commit": str(run.get("git_commit") or ""),
        "torch": str(run["environment"].get("torch", "")),
        "model": run["model"]["fingerprint"],
    }
    extra: dict[str, dict[str, Any]] = {name: {} for name in chosen}
    for name in chosen:
        profile = read_profile(run_dir, name)
        if profile is not None:
            extra[name]["layers"] = profile
    for name, measured in _jitter(args, run, run_dir, chosen).items():
        extra[name]["jitter"] = measured
    for change in baselines.update(folder, suite.name, platform, flat, samples, provenance, chosen, extra):
        print(f"{change.path} [{platform}]: {'replaced' if change.previous else 'new'}")
        for key in baselines.HEADLINE:
            if key in change.current:
                before = (change.previous or {}).get(key)
                print(f"  {key}: {_fmt(before)} -> {_fmt(change.current[key])}")
    print("review the change and commit it: the suite's baseline gates compare with these files")
    return 0


def _jitter(args: argparse.Namespace, run: dict[str, Any], run_dir: Path, chosen: list[str]) -> dict[str, Any]:
    """Each policy's jitter between arithmetic variants (evals.jitter): from the runs given with
    --jitter-run, else measured now by running the suite again under each variant of the platform."""
    import tempfile

    from evals import jitter

    if args.no_jitter:
        print("jitter not measured (--no-jitter): baseline gates will apply the suite's tolerances as written")
        return {}
    given: dict[str, Path] = {}
    for text in args.jitter_run:
        name, _, folder = text.rpartition("=")
        path = Path(folder)
        if not (path / "summary.json").is_file():
            raise InputError(f"--jitter-run {text}: not a finished run directory (no summary.json)")
        given[name or str(path)] = path  # two machines' runs may share a folder name
    if given:
        return jitter.measure(run_dir, given, chosen)
    measured: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="evals-jitter-") as tmp:
        for variant in jitter.variants_for(run["environment"]["device"]):
            print(f"measuring jitter: the run again under {variant.name} ({variant.doc})...", flush=True)
            try:
                measured[variant.name] = jitter.run_variant(run, run_dir, variant, Path(tmp))
            except RuntimeError as exc:
                raise InputError(str(exc)) from exc
        found = jitter.measure(run_dir, measured, chosen)
    for name, values in found.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(values["metrics"].items()) if k.endswith("_mean"))
        print(f"  {name}: jitter of the means: {shown}")
    return found


def add_baseline_commands(sub: Any) -> None:
    baseline = sub.add_parser("baseline", help="the suite baselines committed in the repository")
    actions = baseline.add_subparsers(dest="baseline_command", required=True)
    update = actions.add_parser(
        "update", help="write a passing run's summaries as its suite's baselines (one file per policy and platform)"
    )
    update.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    update.add_argument("--policy", action="append", default=[], help="only this candidate (repeatable)")
    update.add_argument("--force", action="store_true", help="accept failed candidates or a changed suite")
    update.add_argument(
        "--jitter-run",
        action="append",
        default=[],
        metavar="[NAME=]RUN_DIR",
        help="a finished run of the same suite and candidates under other arithmetic (another machine, TF32, an "
        "eager candidate), named NAME in the baseline: measure jitter against it instead of running the variants "
        "here (repeatable)",
    )
    update.add_argument(
        "--no-jitter",
        action="store_true",
        help="do not measure jitter between arithmetic variants (baseline gates then apply the suite's tolerances)",
    )
    update.set_defaults(func=cmd_baseline_update)
