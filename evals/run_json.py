"""What a run directory says about its run, written when the run starts: run.json (suite, model,
candidates, environment, what MLflow was given) and each candidate's layer plan and calibration."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evals.environment import git_commit
from evals.rundir import write_json

if TYPE_CHECKING:
    from evals.candidates import Candidate
    from evals.models.sources import LoadedModel
    from evals.suite_types import Suite


def write_run_json(
    run_dir: Path,
    suite: Suite,
    model: LoadedModel,
    candidates: list[Candidate],
    reference_dtype: str,
    env: dict[str, Any],
    unavailable: dict[str, str],
    tracking: dict[str, Any],
) -> None:
    write_json(
        run_dir / "run.json",
        {
            "suite": {
                "name": suite.name,
                "path": str(Path(suite.path).resolve()),
                "sha256": suite.sha256,
            },
            "model": {"source": _absolute_if_path(model.source), "fingerprint": model.fingerprint},
            "reference_dtype": reference_dtype,
            "generation": asdict(suite.generation),
            "policies": [
                {
                    "name": c.name,
                    "sha256": c.policy_sha256,
                    "backends": c.backends,
                    "checkpoint": c.checkpoint and _absolute_if_path(c.checkpoint),
                    "policy_path": c.policy_path and _absolute_if_path(c.policy_path),
                    "noise_floor": c.noise_floor,
                    "baseline_of": c.baseline_policy,
                }
                for c in candidates
            ],
            "environment": env,
            "git_commit": git_commit(),
            "samples": len(suite.samples()),
            # Which samples get candidate images: all, or the subset `images: {sample: N}` chose.
            "images": {
                "requested": suite.images,
                "samples": [s.id for b in suite.image_batches() for s in b],
            },
            "screened": "step_error" in suite.metrics,  # every sample's step error scored before images
            "unavailable_metrics": unavailable,
            "tracking": tracking,  # what MLflow was given, so that `evals log` can give it again
        },
    )
    for c in candidates:
        write_json(run_dir / "plans" / f"{c.name}.json", [layer.to_dict() for layer in c.plan])
        if c.calibration is not None:  # the static scales, beside the policy's output
            write_json(run_dir / "calibration" / f"{c.name}.json", c.calibration)


def _absolute_if_path(text: str) -> str:
    """A file or folder as an absolute path (a resume may start from another directory); other
    sources (`tiny`, `random:sd35-large`, a Hub id) as they are."""
    path = Path(text)
    return str(path.resolve()) if path.exists() else text
