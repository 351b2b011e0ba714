"""The screening phase of a suite run (`SuiteRunner` inherits it): every sample's step error before
any candidate image.

Batch by batch: the reference's trajectory (from the cache, or recorded while the reference generates;
those images go to the cache by the scoring worker and are kept for the image phase), then each
candidate's transformer teacher-forced on it, one screening.jsonl line per sample, and on its first
batch its layer profile. With --fail-fast a candidate stops once a step-error or layers gate has
failed (evals.fail_fast); once every sample is screened, every such gate is settled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evals.batches import GeneratedBatch
from evals.step_error.screening import SCREENING_FILE, Screened, ScreeningWriter, read_screening, screened_batch
from evals.step_error.trajectory import step_inputs

if TYPE_CHECKING:
    from evals.candidates import Candidate
    from evals.distributed import Shard
    from evals.fail_fast import FailFast
    from evals.models.sources import LoadedModel
    from evals.scoring import BatchScorer
    from evals.step_error.in_run import StepErrorRun
    from evals.suite_types import Sample, Suite


class ScreeningPhase:
    """`_screen`, for SuiteRunner; the attributes below are the runner's."""

    suite: Suite
    model: LoadedModel
    candidates: list[Candidate]
    run_dir: Path
    shard: Shard
    progress: bool
    done: set[tuple[str, str]] | None
    fail_fast: FailFast | None
    scorer: BatchScorer
    step_error: StepErrorRun
    steps: tuple[int, ...] | None
    screening: list[Screened]
    run_notes: list[str]
    batch_seconds: dict[str, list[float]]
    _screened: dict[tuple[str, str], Screened]
    _screened_references: dict[tuple[str, ...], Future[tuple[np.ndarray, list[dict[str, Any]]]]]
    _first_steps: dict[tuple[str, tuple[str, ...]], tuple[dict[str, torch.Tensor], torch.Tensor]]
    _screen_generated: int
    _timed: Callable[[str], AbstractContextManager[None]]
    _reference_batch: Callable[..., None]

    def _screen(self, worker: ThreadPoolExecutor) -> None:
        """Every sample's step error, before any candidate image: each batch's reference trajectory
        (cache, or recorded while the reference generates; those images are kept for the image
        phase), each candidate's transformer teacher-forced on it, and on its first batch its layer
        profile. With --fail-fast, a candidate stops once a step-error or layers gate has failed."""
        from tqdm import tqdm

        shard = self.shard
        if shard.main and self.done is not None:
            self.screening.extend(read_screening(self.run_dir))  # resuming: the lines evals.resume kept
        finished = shard.broadcast({(s.policy, s.sample_id) for s in self.screening} if shard.main else None)
        batches = self.suite.batches()
        images = {tuple(s.id for s in b) for b in self.suite.image_batches()}
        samples = sum(map(len, batches))
        bar = tqdm(
            total=len(batches),
            unit="batch",
            disable=not (self.progress and shard.main),
            desc=f"{self.suite.name}: screening step error",
        )
        with ScreeningWriter(self.run_dir / SCREENING_FILE) if shard.main else nullcontext() as writer:
            for first in range(0, len(batches), shard.world):
                index = first + shard.rank
                stopped = self.fail_fast.stopped if self.fail_fast else {}
                mine: list[Screened] = []
                if index < len(batches):
                    batch = batches[index]
                    todo = [
                        c
                        for c in self.candidates
                        if c.name not in stopped and any((c.name, s.id) not in finished for s in batch)
                    ]
                    if todo:
                        keep = tuple(s.id for s in batch) in images
                        start = time.perf_counter()
                        mine = self._screen_batch(batch, todo, worker, keep, finished)
                        self.batch_seconds["screening"].append(time.perf_counter() - start)
                for lines in shard.gather(mine):
                    if writer is not None:
                        with self._timed("writing"):
                            writer.write(lines)
                        self.screening.extend(lines)
                bar.update(min(shard.world, len(batches) - first))
                if self.fail_fast is not None:
                    if shard.main:
                        self.run_notes.extend(self.fail_fast.screen(samples, complete=False))
                    self.fail_fast.adopt(shard.broadcast(self.fail_fast.stopped if shard.main else None))
        bar.close()
        self._screened = {(s.policy, s.sample_id): s for s in self.screening}
        if self.fail_fast is not None:
            if shard.main:
                self.fail_fast.layers.update(self.step_error.figures(self.candidates))
                self.run_notes.extend(self.fail_fast.screen(samples, complete=True))
            self.fail_fast.adopt(shard.broadcast(self.fail_fast.stopped if shard.main else None))

    def _screen_batch(
        self,
        batch: list[Sample],
        todo: list[Candidate],
        worker: ThreadPoolExecutor,
        keep: bool,
        finished: set[tuple[str, str]],
    ) -> list[Screened]:
        """One batch's screening lines for the candidates in `todo`; the reference images made for
        its trajectory go to the cache (by the worker) and, when `keep`, to the image phase."""
        generated = GeneratedBatch(batch, {})
        self._reference_batch(batch, generated, trajectory=True)
        traj = generated.trajectory
        assert traj is not None and self.steps is not None
        if generated.reference_raw is not None:
            self._screen_generated += len(batch)
            if keep or generated.reference_keys:  # wanted by the image phase, or by the cache
                kept = worker.submit(self.scorer.reference, generated)  # encoded and cached meanwhile
                if keep:
                    self._screened_references[tuple(s.id for s in batch)] = kept
        lines: list[Screened] = []
        for cand in todo:
            if cand.activate is not None:
                cand.activate()
            errors = self.step_error.score(cand, traj)
            if keep and errors.first is not None:  # its generation's first step, computed already
                self._first_steps[(cand.name, tuple(s.id for s in batch))] = (step_inputs(traj, 0, "cpu"), errors.first)
            lines += [
                line
                for line in screened_batch(cand.name, batch, errors, traj.steps)
                if (cand.name, line.sample_id) not in finished
            ]
            if self.shard.main:  # a failed layers gate fails for good once the profile is made
                figures = self.step_error.profile(self.model.pipeline, cand, traj)
                if self.fail_fast is not None:
                    self.fail_fast.layers.update(figures)
        return lines
