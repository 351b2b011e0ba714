"""`evals locate RUN_DIR`: name where each candidate of a finished run departs from the reference.

A run that scored step error kept each candidate's layer profile (`layers/<name>.json`); for one that
did not (an older run, a suite without step error), the models are rebuilt as `--resume` would
rebuild them and profiled on the suite's first batch at its middle step. Each candidate's profile is
compared with its baseline policy's committed profile (evals.step_error.locate); the findings go to
locate.json and the reports are rendered again.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError


def _profiles_from_models(run_dir: Path, names: list[str], device: str) -> None:
    """Rebuild the run's reference and candidates and write the missing layer profiles."""
    import torch

    from evals.api import RunRequest, build_candidates, prepare
    from evals.generation import generate
    from evals.models.precision import load_policy
    from evals.resume import _request_for, read_run_info
    from evals.rundir import write_json
    from evals.step_error.locate import LAYERS_FOLDER
    from evals.step_error.profile import profile
    from evals.step_error.steps import recorded_steps
    from evals.step_error.trajectory import recording
    from evals.suite import load_suite

    run = read_run_info(run_dir)
    request = _request_for(run, run_dir, RunRequest(suite=Path(run.suite.path), device=device, mlflow=False))
    suite = load_suite(request.suite)
    prepared = prepare(request, suite)
    candidates = build_candidates(prepared, [load_policy(p) for p in request.policies], request.candidate_checkpoints)
    gen = suite.generation
    steps = recorded_steps(suite.metric_options.get("step_error", {}).get("steps"), gen.steps)
    batch = suite.batches()[0]
    reference = prepared.model.pipeline
    with recording(reference.transformer, steps, gen.guidance, len(batch)) as out, torch.inference_mode():
        generate(reference, batch, gen)
    traj, middle = out[0], len(steps) // 2
    for cand in candidates:
        if cand.name in names:
            errors = profile(reference.transformer, cand.pipeline.transformer, traj, middle)
            path = run_dir / LAYERS_FOLDER / f"{cand.name}.json"
            path.parent.mkdir(exist_ok=True)
            write_json(path, {"step": traj.steps[middle], "samples": len(traj), "errors": errors})


def cmd_locate(args: argparse.Namespace) -> int:
    from evals.reports.html import write_reports
    from evals.rundir import check_no_links, write_json
    from evals.step_error.locate import LOCATE_FILE, departures, read_profile
    from evals.suite import load_suite

    run_dir: Path = args.run_dir
    if not (run_dir / "run.json").is_file():
        raise InputError(f"{run_dir}: not a run directory (no run.json)")
    check_no_links(run_dir)
    run: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    gated = [p["name"] for p in run["policies"] if not p.get("noise_floor")]
    chosen = args.candidate or gated
    unknown = sorted(set(chosen) - set(gated))
    if unknown:
        raise InputError(f"--candidate {', '.join(unknown)}: not a candidate of {run_dir} (it has {', '.join(gated)})")
    missing = [n for n in chosen if read_profile(run_dir, n) is None]
    if missing:
        print(f"profiling {', '.join(missing)} (no layer profile in the run): rebuilding the models...", flush=True)
        _profiles_from_models(run_dir, missing, args.device or run["environment"]["device"])
    suite = load_suite(Path(run["suite"]["path"]))
    baseline_of = {p["name"]: p.get("baseline_of") or p["name"] for p in run["policies"] if p["name"] in chosen}
    named = departures(run_dir, suite, run["environment"]["device"], run["reference_dtype"], baseline_of)
    path = run_dir / LOCATE_FILE
    found: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    for name in chosen:
        if name not in named:
            print(f"{name}: nothing to compare (no profile, or none shares a part with its baseline's)")
            continue
        found[name] = named[name].to_dict()
        print(f"{name}: {named[name].describe()}")
    write_json(path, found)
    write_reports(run_dir)
    return 0


def add_locate_command(sub: Any) -> None:
    locate = sub.add_parser(
        "locate", help="name the layer where each candidate of a finished run departs from its baseline (step error)"
    )
    locate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    locate.add_argument("--candidate", action="append", default=[], help="only this candidate (repeatable)")
    locate.add_argument("--device", help="where to rebuild the models when a profile is missing (default: the run's)")
    locate.set_defaults(func=cmd_locate)
