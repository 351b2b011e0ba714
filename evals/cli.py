"""`evals ...` subcommands. Exit codes: 0 gates passed, 1 a gate failed, 2 bad input, 3 the run broke."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from evals.gates import EXIT_BAD_INPUT
from evals.yamlspec import InputError

EXIT_CRASHED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evals", description="Quality gate for FP8 Stable Diffusion 3.5 builds.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite: reference vs FP8 candidates, metrics, gates, MLflow")
    run.add_argument("suite", type=Path, help="suite YAML file, e.g. suites/smoke.yaml")
    run.add_argument(
        "--model", help="model source: `tiny`, or a local diffusers SD3/SD3.5 folder (default: the suite's)"
    )
    run.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="POLICY",
        help="candidate policy: a shipped name (fp8-e4m3-rowwise) or a YAML path; repeat for several "
        "(default: the suite's `policies`)",
    )
    run.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    run.add_argument(
        "--reference-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="reference precision (default: the suite's, else auto)",
    )
    run.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go (default: runs/)")
    run.add_argument(
        "--cache-dir", type=Path, help="reference cache (default: $EVALS_CACHE_DIR or ~/.cache/sd35-fp8-gate)"
    )
    run.add_argument("--no-cache", action="store_true", help="always generate reference images")
    run.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    validate = sub.add_parser("validate", help="check suites and policies without running anything")
    validate.add_argument("files", nargs="+", type=Path, help="suite or policy YAML files")
    return parser


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available here")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return name


def _ci_tags() -> dict[str, str]:
    tags = {}
    for var in ("GITHUB_RUN_ID", "GITHUB_JOB", "CI_JOB_ID", "BUILD_ID"):
        if os.environ.get(var):
            tags["ci_job"] = f"{var}={os.environ[var]}"
            break
    return tags


def cmd_run(args: argparse.Namespace) -> int:
    from evals.suite import load_suite
    from models.precision import load_policy

    # Validate every input before any work or any file is written.
    suite = load_suite(args.suite)
    policy_names = args.policy or list(suite.policies)
    if not policy_names:
        raise InputError(f"{args.suite}: no candidate policy; pass --policy or list `policies:` in the suite")
    policies = [load_policy(name) for name in policy_names]
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        raise InputError(f"two candidate policies share a name: {names}; policy names must be unique")
    device = _resolve_device(args.device)

    from evals.cache import ReferenceCache, default_cache_dir
    from evals.rundir import new_run_dir
    from evals.runner import SuiteRunner, build_candidate, git_commit
    from evals.tracking import GuardedTracker, MlflowTracker, NullTracker
    from models.sources import load_source, resolved_dtype_name
    from reports.render import gate_table_text

    # Resolved (auto -> float32/bfloat16) so the cache key and run.json say what really ran.
    reference_dtype = resolved_dtype_name(args.reference_dtype or suite.reference_dtype, device)
    model = load_source(args.model or suite.model, reference_dtype, device)
    candidates = [build_candidate(model, policy) for policy in policies]  # rule typos surface here

    cache = None if args.no_cache else ReferenceCache(args.cache_dir or default_cache_dir())
    mlflow_tracker = None if args.no_mlflow else MlflowTracker()
    tracker = NullTracker() if mlflow_tracker is None else GuardedTracker(mlflow_tracker)
    run_dir = new_run_dir(args.runs_dir, suite.name)
    print(f"run directory: {run_dir}", file=sys.stderr)
    runner = SuiteRunner(
        suite, model, candidates, run_dir, tracker, cache, device, reference_dtype, progress=not args.no_progress
    )
    params = {
        "suite": suite.name,
        "suite_sha256": suite.sha256,
        "model": model.source,
        "model_fingerprint": model.fingerprint,
        "reference_dtype": reference_dtype,
        "device": device,
        "policies": ",".join(names),
        "samples": len(suite.samples()),
        **{k: runner.env[k] for k in ("torch", "diffusers", "transformers", "device_kind")},
    }
    tags = {"git_commit": git_commit(), "run_dir": str(run_dir), **_ci_tags()}
    try:
        outcome = runner.run(params, tags)
    except BaseException:
        print(f"error: the run broke; every finished sample is in {run_dir / 'records.jsonl'}", file=sys.stderr)
        raise
    print(gate_table_text(run_dir))
    print(
        f"reference images generated: {outcome.reference_generated} (the rest from the cache), "
        f"candidate images: {outcome.candidate_generated}"
    )
    if mlflow_tracker is not None:
        print(f"MLflow: experiment {suite.name!r} at {mlflow_tracker.tracking_uri} (`mlflow ui` to browse)")
    return outcome.verdict.exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    from evals.suite import load_suite
    from evals.yamlspec import load_yaml
    from models.precision import load_policy

    for path in args.files:
        kind = "policy" if "components" in load_yaml(path, "suite or policy").data else "suite"
        if kind == "suite":
            suite = load_suite(path)
            print(
                f"{path}: suite {suite.name!r} ok: {len(suite.cases)} cases, {len(suite.samples())} samples, "
                f"{len(suite.gates)} gates"
            )
        else:
            policy = load_policy(str(path))
            print(f"{path}: policy {policy.name!r} ok: components {', '.join(policy.components)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Weights are local: no Hugging Face call may wait on a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    handlers = {"run": cmd_run, "validate": cmd_validate}
    try:
        return handlers[args.command](args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - report, keep the distinct exit code
        traceback.print_exc()
        return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
