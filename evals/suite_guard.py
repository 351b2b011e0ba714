"""Guarded candidates in a suite (its `guard` section): each batch of a guarded candidate goes
through `evals.guard.Guard.repair` before it is scored, so the records hold the images a serving
team would have shipped, and say which were made again (`SampleRecord.guard`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from evals.candidates import NOISE_FLOOR
from evals.guard import Fallback, Guard, Reseed
from evals.models.yamlspec import InputError
from evals.suite_types import Sample, Suite


def guarded_names(suite: Suite, names: list[str]) -> set[str]:
    """The candidates of this run the suite's guard covers; a name it lists that the run lacks is an
    InputError (checked before any work)."""
    spec = suite.guard
    if spec is None:
        return set()
    if spec.candidates is None:
        # The noise floor measures the reference: guarding it would hide what it is there to show.
        return {n for n in names if n != NOISE_FLOOR}
    missing = [n for n in spec.candidates if n not in names]
    if missing:
        raise InputError(
            f"guard.candidates names {', '.join(missing)}, not a candidate of this run "
            f"(candidates: {', '.join(names)})",
            source=suite.path,
        )
    return set(spec.candidates)


def suite_guard(suite: Suite, reference_pipeline: Any) -> Guard | None:
    """The suite's guard, with its detectors and thresholds; `reference` fallback: the run's reference."""
    spec = suite.guard
    if spec is None:
        return None
    on_failure = (
        Fallback(reference_pipeline, spec.max_tries) if spec.on_failure == "reference" else Reseed(spec.max_tries)
    )
    thresholds = {d: t for d, t in suite.detector_thresholds.items() if d in spec.detectors}
    return Guard(spec.detectors, on_failure, thresholds)


def guard_batch(
    guard: Guard,
    batch: list[Sample],
    raw: torch.Tensor,
    device: str,
    generate: Callable[[Any, list[Sample]], torch.Tensor],
    pipeline: Any,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """One candidate batch checked on `device` and repaired; `generate(pipe, samples)` makes images
    (the runner's, with its out-of-memory handling). Returns the images on the CPU and each sample's
    outcome as its record holds it."""

    def regenerate(source: str, indices: list[int], seeds: list[int]) -> torch.Tensor:
        on_failure = guard.on_failure
        pipe = on_failure.pipeline if source == "fallback" and isinstance(on_failure, Fallback) else pipeline
        return generate(pipe, [Sample(batch[i].case, seed) for i, seed in zip(indices, seeds, strict=True)])

    prompts = [s.case.prompt for s in batch]
    repaired, outcomes = guard.repair(raw.to(device), prompts, [s.seed for s in batch], regenerate)
    return repaired.cpu(), [o.to_dict() for o in outcomes]
