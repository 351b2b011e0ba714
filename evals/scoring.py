"""The scoring worker's part of a batch: 8-bit images, metric scores, detector findings and one
record per finished sample; generated reference images go into the cache on the way."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from evals.batches import BatchResult, GeneratedBatch
from evals.cache import ReferenceCache
from evals.detectors import detect_batch
from evals.generation import from_uint8, to_uint8
from evals.records import REFERENCE_FOLDER, SampleRecord, image_path
from evals.suite_types import Suite

log = logging.getLogger(__name__)


def findings_of(raw: torch.Tensor, suite: Suite, device: str = "cpu") -> list[dict[str, dict[str, Any]]]:
    found = detect_batch(raw.to(device).permute(0, 2, 3, 1), suite.detectors, suite.detector_thresholds)
    return [{n: f.to_dict() for n, f in item.items()} for item in found]


class BatchScorer:
    """Scores generated batches with the suite's metrics and detectors, on `device`."""

    def __init__(
        self,
        suite: Suite,
        metrics: dict[str, Any],
        device: str,
        cache: ReferenceCache | None,
        timed: Callable[[str], AbstractContextManager[None]],
    ):
        self.suite, self.metrics, self.device, self.cache = suite, metrics, device, cache
        self._timed = timed
        """Adds a block's wall time to the run's timings under a part's name."""

    def reference(self, generated: GeneratedBatch) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """8-bit reference images and their findings; generated ones go into the cache."""
        if generated.cached is not None:
            return generated.cached
        assert generated.reference_raw is not None
        raw = generated.reference_raw
        with self._timed("detectors"):
            images, findings = to_uint8(raw), findings_of(raw, self.suite, self.device)
        if generated.reference_keys:  # empty without a cache
            assert self.cache is not None
            traj = generated.trajectory if generated.trajectory_generated else None
            for i, (key, image, found) in enumerate(zip(generated.reference_keys, images, findings, strict=True)):
                if traj is not None:  # before the image: an entry counts once its JSON is written
                    dtype = str(traj.input_dtype).removeprefix("torch.")
                    self.cache.put_steps(key, traj.steps, traj.sample(i), dtype)
                self.cache.put(key, image, {"detectors": found})
        return images, findings

    def _score(self, cand: torch.Tensor, ref: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
        scores: dict[str, list[float]] = {}
        for metric in self.metrics.values():
            scores.update({name: values.tolist() for name, values in metric(cand, ref, prompts).items()})
        return scores

    def score(self, generated: GeneratedBatch) -> BatchResult:
        """Scores, findings and records of one generated batch."""
        batch, todo = generated.batch, generated.todo
        result = BatchResult(ids=[s.id for s in batch], notes=generated.notes)
        if not any(todo.values()):
            return result
        ref_u8, ref_findings = self.reference(generated)
        result.reference_generated = 0 if generated.cached is not None else len(batch)
        result.reference = list(ref_u8)
        result.reference_files = generated.cached_files
        ref_paths = [image_path(REFERENCE_FOLDER, s.id) for s in batch]
        ref = from_uint8(ref_u8)
        for cand, raw, seconds in generated.candidates:
            guarded = generated.guard.get(cand.name)
            result.candidate_generated += len(batch)
            cand_u8 = to_uint8(raw)
            with self._timed("metrics"):
                scores = self._score(from_uint8(cand_u8), ref, [s.case.prompt for s in batch])
            with self._timed("detectors"):
                findings = findings_of(raw, self.suite, self.device)
            for i, sample in enumerate(batch):
                if sample.id not in todo[cand.name]:
                    continue  # finished before an interruption; regenerated only to keep the batch
                record = SampleRecord(
                    policy=cand.name,
                    sample_id=sample.id,
                    case_id=sample.case.id,
                    prompt=sample.case.prompt,
                    seed=sample.seed,
                    tags=sample.case.tags,
                    metrics={m: v[i] for m, v in scores.items()},
                    detectors=findings[i],
                    reference_detectors=ref_findings[i],
                    image=image_path(cand.name, sample.id),
                    reference_image=ref_paths[i],
                    seconds_per_image=seconds,
                    guard=guarded[i] if guarded is not None else None,
                )
                result.samples.append((cand_u8[i], record))
        return result


def load_metrics(suite: Suite, device: str, weights: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The suite's metrics, loaded on `device` with the suite's weights files overridden by `weights`;
    and the ones whose weights are absent here, with why (gates on them fail unless optional)."""
    from evals.metrics import METRICS, load_metric
    from evals.weights import MissingWeights

    metrics: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name in (m for m in suite.metrics if METRICS[m].scores_images):  # step error: the runner's
        try:
            metrics[name] = load_metric(name, device, {**suite.weights, **weights}, suite.metric_options.get(name))
        except MissingWeights as exc:
            unavailable[name] = str(exc)
            log.warning(f"metric {name} unavailable: {exc}")
    return metrics, unavailable
