"""A batch as it moves through a run: generated on the GPU (`GeneratedBatch`), then scored and
turned into records by the scoring worker (`BatchResult`, what a torchrun shard sends to rank 0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.candidates import Candidate
from evals.records import SampleRecord
from evals.step_error.trajectory import Trajectory
from evals.suite_types import Sample


@dataclass
class BatchResult:
    """One batch's work, as a torchrun shard sends it to rank 0."""

    ids: list[str]
    """Sample ids of the batch, in order."""
    reference: list[np.ndarray] = field(default_factory=list)
    """Reference images (HWC uint8) of the batch; empty when nothing was left to do."""
    reference_files: list[Path] = field(default_factory=list)
    """Their PNG files in the reference cache, when they came from it (copied, not encoded again)."""
    samples: list[tuple[np.ndarray, SampleRecord]] = field(default_factory=list)
    """(candidate image, its record) for each unfinished sample of each candidate."""
    reference_generated: int = 0
    candidate_generated: int = 0
    notes: list[str] = field(default_factory=list)
    """Warnings raised while computing it (batch halved on out-of-memory)."""


@dataclass
class GeneratedBatch:
    """One batch's images as they left the GPU (float, unclamped), before scoring and writing."""

    batch: list[Sample]
    todo: dict[str, set[str]]
    """Candidate name -> ids of its samples still to record."""
    reference_keys: list[str] = field(default_factory=list)
    """Cache keys of the reference images (empty: no cache)."""
    reference_raw: torch.Tensor | None = None
    """Generated reference images; None when they came from the cache."""
    cached: tuple[np.ndarray, list[dict[str, Any]]] | None = None
    """(8-bit reference images, their findings) from the cache."""
    cached_files: list[Path] = field(default_factory=list)
    """The cache's PNG files of those images."""
    candidates: list[tuple[Candidate, torch.Tensor, float]] = field(default_factory=list)
    """(candidate, its raw images, seconds per image)."""
    guard: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Guarded candidate name -> what the guard did for each sample of the batch (evals.suite_guard)."""
    trajectory: Trajectory | None = None
    """The reference's trajectory at the recorded steps, when the suite scores step error."""
    trajectory_generated: bool = False
    """Whether the trajectory was recorded now (then the scoring worker caches it) or came from the cache."""
    notes: list[str] = field(default_factory=list)
