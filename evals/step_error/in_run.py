"""Step error inside a suite run: what the runner asks of it, batch by batch and at the end.

The reference's trajectory comes from the cache or is recorded while the reference generates; each
candidate is scored teacher-forced on it (the runner's screening, before any candidate image) and,
on its first batch, profiled layer by layer; at the end each profile is compared with its baseline's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evals.rundir import write_json
from evals.step_error.locate import LAYERS_FOLDER, layer_figures
from evals.step_error.steps import recorded_steps
from evals.step_error.trajectory import StepErrors, Trajectory, teacher_forced

if TYPE_CHECKING:
    from evals.cache import ReferenceCache
    from evals.candidates import Candidate
    from evals.suite_types import Suite


class StepErrorRun:
    """A run's step-error work; `steps` is None when the suite does not score step error."""

    def __init__(
        self,
        suite: Suite,
        run_dir: Path,
        device: str,
        reference_dtype: str,
        timed: Callable[[str], AbstractContextManager[None]],
    ):
        self.suite, self.run_dir, self.device, self.reference_dtype = suite, run_dir, device, reference_dtype
        self._timed = timed
        self.steps: tuple[int, ...] | None = None
        if "step_error" in suite.metrics:
            options = suite.metric_options.get("step_error", {})
            self.steps = recorded_steps(options.get("steps"), suite.generation.steps)
        self.profiled: set[str] = set()

    def cached(self, cache: ReferenceCache, keys: list[str]) -> Trajectory | None:
        """The batch's trajectory from the reference cache, or None unless every sample's is there."""
        assert self.steps is not None
        found = [cache.get_steps(k, self.steps) for k in keys]
        if any(f is None for f in found):
            return None
        dtype = getattr(torch, found[0][1]) if found[0] else torch.float32
        return Trajectory.from_samples([f[0] for f in found if f], self.steps, self.suite.generation.guidance, dtype)

    def score(self, cand: Candidate, traj: Trajectory) -> StepErrors:
        with self._timed("step_error"):
            return teacher_forced(cand.pipeline.transformer, traj)

    def profile(self, reference: Any, cand: Candidate, traj: Trajectory) -> dict[str, dict[str, float]]:
        """The candidate's layer profile at the middle recorded step of the first batch it generates,
        kept in layers/<name>.json; returns its layer figures against its baseline (empty when it
        had one already, or its baseline has none)."""
        from evals.step_error.profile import profile

        path = self.run_dir / LAYERS_FOLDER / f"{cand.name}.json"
        if cand.name in self.profiled or path.is_file():
            return {}
        self.profiled.add(cand.name)
        step = len(traj.steps) // 2
        with self._timed("locate"):
            errors = profile(reference.transformer, cand.pipeline.transformer, traj, step)
        path.parent.mkdir(exist_ok=True)
        write_json(path, {"step": traj.steps[step], "samples": len(traj), "errors": errors})
        return self.figures([cand])

    def figures(self, candidates: list[Candidate]) -> dict[str, dict[str, float]]:
        """Candidate -> its layer figures against its baseline policy's profile."""
        return layer_figures(self.run_dir, self.suite, candidates, self.device, self.reference_dtype)
