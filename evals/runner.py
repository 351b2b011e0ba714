"""The one loop: batches -> reference (cache) -> candidates -> scores -> records -> verdict.

Reference and every candidate see the same batches with the same seeds. Each finished sample is
appended to records.jsonl at once; MLflow gets a copy as the run goes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.batches import BatchResult, GeneratedBatch
from evals.cache import ReferenceCache, reference_key
from evals.candidates import Candidate
from evals.compiling import explain_failure
from evals.distributed import Shard
from evals.environment import environment
from evals.fail_fast import FailFast
from evals.generation import generate
from evals.graphed import graph_transformer, ungraph
from evals.models.sources import LoadedModel
from evals.publish import LOGGED_FILE, candidate_params
from evals.records import (
    REFERENCE_FOLDER,
    RecordsWriter,
    image_path,
    read_records,
)
from evals.run_finish import FinishingPhase, RunOutcome
from evals.run_json import write_run_json
from evals.run_screening import ScreeningPhase
from evals.rundir import copy_png, save_png, write_json
from evals.scoring import BatchScorer
from evals.step_error.in_run import StepErrorRun
from evals.step_error.screening import Screened
from evals.step_error.trajectory import Trajectory, answered_first, recording
from evals.suite_guard import guard_batch, guarded_names, suite_guard
from evals.suite_types import Sample, Suite
from evals.tracker_protocol import Tracker

log = logging.getLogger(__name__)


def _cuda_index(device: str) -> int | None:
    """The CUDA device `device` names (plain `cuda`: the current one); None off CUDA."""
    if not device.startswith("cuda"):
        return None
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


class SuiteRunner(ScreeningPhase, FinishingPhase):
    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Add the block's wall time to `self.seconds[part]` (GPU work is synchronous at its end:
        images and scores come back to the CPU). Generation and the scoring worker both add."""
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._seconds_lock:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def __init__(
        self,
        suite: Suite,
        model: LoadedModel,
        candidates: list[Candidate],
        run_dir: Path,
        tracker: Tracker,
        cache: ReferenceCache | None,
        device: str,
        reference_dtype: str,
        metrics: dict[str, Any],
        unavailable: dict[str, str],
        progress: bool = True,
        done: set[tuple[str, str]] | None = None,
        shard: Shard | None = None,
        started: float | None = None,
        startup: dict[str, float] | None = None,
        fail_fast: bool = False,
        cuda_graphs: bool = True,
    ):
        self.shard = shard or Shard()
        self.cuda_graphs = cuda_graphs and device.startswith("cuda")
        self.suite = suite
        self.model = model
        self.candidates = candidates
        self.run_dir = run_dir
        self.tracker = tracker
        self.cache = cache
        self.device = device
        self.reference_dtype = reference_dtype
        self.progress = progress
        self.env = environment(device)
        self.metrics = metrics
        self.unavailable = unavailable  # metric -> why (weights absent): gates on it fail unless optional
        self.reference_generated = 0
        self.reference_cached = 0
        self._screen_generated = 0  # reference images this process made for screening
        self._references_seen: set[tuple[str, ...]] = set()  # batches counted in reference_cached
        self.candidate_generated = 0
        # Where this process's time went: the start-up steps measured before, then generation, metrics, ...
        self.seconds: dict[str, float] = dict(startup or {})
        self.started = time.perf_counter() if started is None else started  # where `startup` counts from
        # The scoring worker's GPU kernels go to a stream of their own: they need not wait for generation's.
        self._scoring_stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
        self._seconds_lock = threading.Lock()
        self.images_per_call: int | None = None  # set below the batch size after a CUDA out-of-memory
        self.notes: list[str] = []  # what this process had to change (halved batches)
        self.run_notes: list[str] = []  # rank 0: the notes of every process, for the report
        self.done = done  # (policy, sample id) already in records.jsonl: resuming; None for a new run
        self._baselines_found: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.scorer = BatchScorer(suite, self.metrics, device, cache, self._timed)
        self.guard = suite_guard(suite, model.pipeline)
        self.step_error = StepErrorRun(suite, run_dir, device, reference_dtype, self._timed)
        self.steps = self.step_error.steps  # recorded steps, when the suite scores step error
        self.screening: list[Screened] = []  # rank 0: every screening line of the run, earlier ones too
        self._screened: dict[tuple[str, str], Screened] = {}  # the same by (candidate, sample id)
        # (candidate, batch ids) -> (inputs, output) of its first step, computed by screening
        self._first_steps: dict[tuple[str, tuple[str, ...]], tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
        self.batch_seconds: dict[str, list[float]] = {"screening": [], "images": []}
        """Each batch's wall time in each phase (batch_timings.json): the steady state, for projections."""
        # Reference images made while screening, kept for the image phase: batch ids -> future of
        # (8-bit images, findings); the scoring worker encodes and caches them meanwhile.
        self._screened_references: dict[tuple[str, ...], Future[tuple[np.ndarray, list[dict[str, Any]]]]] = {}
        self.guarded = guarded_names(suite, [c.name for c in candidates])
        self.fail_fast: FailFast | None = None
        if fail_fast:
            gated = [c.name for c in candidates if c.noise_floor is None]
            images = sum(map(len, suite.image_batches()))  # the samples a candidate may make images of
            self.fail_fast = FailFast(suite.gates, gated, self._baselines, images)
            self.fail_fast.screened = self.screening  # the same list: it grows as screening goes

    def _reference_batch(self, batch: list[Sample], generated: GeneratedBatch, trajectory: bool = False) -> None:
        """The batch's reference images: kept from screening, from the cache when every one is there
        (and, with `trajectory`, its trajectory too), else generated (recording the trajectory)."""
        kept = self._screened_references.pop(tuple(s.id for s in batch), None)
        if kept is not None:
            generated.cached = kept.result()
            generated.cached_files = [self.cache.png_path(k) for k in self._keys(batch)] if self.cache else []
            return
        keys = self._keys(batch)
        hits = [self.cache.get(k) for k in keys] if self.cache else [None] * len(batch)
        hit = all(h is not None for h in hits)
        steps = self.step_error.cached(self.cache, keys) if trajectory and self.cache and hit else None
        if hit and (steps is not None or not trajectory):
            ids = tuple(s.id for s in batch)
            if ids not in self._references_seen:  # screening and the image phase may both read it
                self._references_seen.add(ids)
                self.reference_cached += len(batch)
            generated.cached = np.stack([h[0] for h in hits if h]), [h[1]["detectors"] for h in hits if h]
            generated.cached_files = [self.cache.png_path(k) for k in keys] if self.cache else []
            generated.trajectory = steps
            return
        generated.reference_keys = keys if self.cache else []
        trajectories: list[Trajectory] | None = [] if trajectory else None
        generated.reference_raw = self._generate(self.model.pipeline, batch, trajectories=trajectories)
        if trajectories:
            generated.trajectory, generated.trajectory_generated = Trajectory.cat(trajectories), True

    def _keys(self, batch: list[Sample]) -> list[str]:
        return [
            reference_key(
                fingerprint=self.model.fingerprint,
                dtype=self.reference_dtype,
                generation=self.suite.generation,
                sample=s,
                batch=batch,
                environment=self.env,
                detectors={"names": self.suite.detectors, "thresholds": self.suite.detector_thresholds},
            )
            for s in batch
        ]

    def _generate(
        self,
        pipe: Any,
        batch: list[Sample],
        images_per_call: int | None = None,
        trajectories: list[Trajectory] | None = None,
        steps: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """`generate`, halving the number of images per call on CUDA out-of-memory (and keeping the
        smaller size for the rest of the run, reference and candidates alike). With `trajectories`,
        the trajectory of each pipeline call at `steps` (default: the recorded ones) is appended to it."""
        gen = self.suite.generation
        steps = steps or self.steps
        while True:
            size = min(images_per_call or self.images_per_call or len(batch), len(batch))
            try:
                with self._timed("generation"):
                    parts = []
                    for i in range(0, len(batch), size):
                        part = batch[i : i + size]
                        if trajectories is None or steps is None:
                            parts.append(generate(pipe, part, gen))
                            continue
                        with recording(pipe.transformer, steps, gen.guidance, len(part)) as recorded:
                            parts.append(generate(pipe, part, gen))
                        trajectories.extend(recorded)
                    return torch.cat(parts)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                if trajectories is not None:
                    trajectories.clear()
                self.images_per_call = size // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                note = f"CUDA out of memory generating {size} images at once: halved to {size // 2} and retried"
                log.warning(note)
                self.notes.append(note)

    def run(self, tracker_params: dict[str, Any], tracker_tags: dict[str, str]) -> RunOutcome | None:
        """Run every unfinished sample; on a torchrun shard other than rank 0, compute only and
        return None (rank 0 writes everything).

        A suite that scores step error screens every sample first (`_screen`), then generates images.
        The GPU generates batch k+1 while one worker thread scores, checks and writes batch k (in
        order: a record never points at a missing image); at most one batch waits for it.
        """
        self.seconds["startup"] = time.perf_counter() - self.started  # imports, models, candidates
        shard = self.shard
        records_path = self.run_dir / "records.jsonl"
        if shard.main:
            if self.done is None:
                tracking = {"params": tracker_params, "tags": tracker_tags}
                write_run_json(
                    self.run_dir,
                    self.suite,
                    self.model,
                    self.candidates,
                    self.reference_dtype,
                    self.env,
                    self.unavailable,
                    tracking,
                )
            self.tracker.start_run(
                self.suite.name, f"{self.suite.name}: running", tracker_params, tracker_tags, self.run_dir / LOGGED_FILE
            )
            for c in self.candidates:
                self.tracker.start_candidate(
                    c.name, candidate_params(c.name, c.policy_sha256, c.backends, tracker_params)
                )
            if self.done:
                self.tracker.log_earlier_images(self._earlier_images(records_path))
        # A new thread's current CUDA device is cuda:0; NCCL's object collectives (the shard's
        # gather) stage through the current device, which must be the one this rank's group uses.
        cuda_index = _cuda_index(self.device)
        on_device = None if cuda_index is None else partial(torch.cuda.set_device, cuda_index)
        graphed = self._graphed()
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring", initializer=on_device) as worker:
                if self.steps is not None:
                    self._screen(worker)
                self._images(worker, records_path)
        finally:
            for transformer in graphed:  # the bench and any later use launch them as loaded
                ungraph(transformer)
        counted = shard.gather((self._screen_generated, self.reference_cached))  # every process's
        if not shard.main:
            return None
        self.reference_generated += sum(made for made, _ in counted)
        self.reference_cached = sum(read for _, read in counted)
        with self._timed("finishing"):
            outcome = self._finish(records_path)
        self._write_timings()  # again, with `finishing` (MLflow's copy was logged before it ended)
        return outcome

    def _graphed(self) -> list[Any]:
        """Replay the transformers' steps from CUDA graphs (evals.graphed), except a candidate that
        swaps its layers before each batch (a sensitivity sweep), and any other that shares its
        transformer: a graph keeps the layers it saw."""
        if not self.cuda_graphs:
            return []
        swapping = {id(c.pipeline.transformer) for c in self.candidates if c.activate is not None}
        named = [
            (self.model.pipeline.transformer, "reference"),
            *((c.pipeline.transformer, c.name) for c in self.candidates),
        ]
        chosen = {id(t): (t, name) for t, name in reversed(named) if id(t) not in swapping}  # first name wins
        return [t for t, name in chosen.values() if graph_transformer(t, name) is not None]

    def _images(self, worker: ThreadPoolExecutor, records_path: Path) -> None:
        """Candidate images of the suite's image batches, scored and written batch by batch."""
        from tqdm import tqdm

        shard = self.shard
        batches = self.suite.image_batches()
        bar = tqdm(
            total=len(batches) * (1 + len(self.candidates)),
            unit="image set",
            disable=not (self.progress and shard.main),
            desc=f"{self.suite.name}" + (f" ({shard.world} processes)" if shard.active else ""),
        )
        with RecordsWriter(records_path) if shard.main else nullcontext() as writer:
            pending: Future[None] | None = None
            try:
                for first in range(0, len(batches), shard.world):
                    index = first + shard.rank
                    start = time.perf_counter()
                    generated = self._generate_batch(batches[index], bar) if index < len(batches) else None
                    self.batch_seconds["images"].append(time.perf_counter() - start)
                    if pending is not None:
                        with self._timed("waiting"):
                            pending.result()  # the worker's errors surface here
                    pending = worker.submit(self._score_and_store, generated, writer, bar)
            except BaseException:  # an error or Ctrl-C: the batch being written is finished first
                if pending is not None:
                    wait([pending])
                raise
            if pending is not None:
                with self._timed("waiting"):
                    pending.result()
        bar.close()

    def _earlier_images(self, records_path: Path) -> list[tuple[str, str, Path, Path]]:
        """(candidate, sample id, image, reference) of every record finished before a resume."""
        return [
            (r.policy, r.sample_id, self.run_dir / r.image, self.run_dir / r.reference_image)
            for r in read_records(records_path)
        ]

    def _write_timings(self) -> None:
        write_json(self.run_dir / "timings.json", {k: round(v, 3) for k, v in self.seconds.items()})
        rounded = {k: [round(v, 3) for v in values] for k, values in self.batch_seconds.items()}
        write_json(self.run_dir / "batch_timings.json", rounded)

    def _score_and_store(self, generated: GeneratedBatch | None, writer: RecordsWriter | None, bar: Any) -> None:
        """The worker's part of a batch: scores and findings, then (rank 0) files, records, MLflow."""
        stream = self._scoring_stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            mine = self.scorer.score(generated) if generated is not None else None
        for result in self.shard.gather(mine):
            if result is not None and writer is not None:
                with self._timed("writing"):
                    self._store(result, writer)
                if self.shard.active:  # under torchrun the bar moves as results arrive here
                    bar.update(1 + len(self.candidates))

    def _generate_batch(self, batch: list[Sample], bar: Any) -> GeneratedBatch:
        """Reference (or cache) and candidate images of one batch; nothing scored, nothing written.
        The bar moves by one per image set (reference, each candidate) in a single process, so a
        run with many candidates does not sit at 0% through its first batch."""

        def advance() -> None:
            if not self.shard.active:
                bar.update(1)

        done = self.done or set()
        stopped = self.fail_fast.stopped if self.fail_fast else {}
        todo = {
            c.name: {s.id for s in batch if (c.name, s.id) not in done} if c.name not in stopped else set()
            for c in self.candidates
        }
        generated = GeneratedBatch(batch, todo)
        if not any(todo.values()):
            if not self.shard.active:
                bar.update(1 + len(self.candidates))
            return generated
        noted = len(self.notes)
        self._reference_batch(batch, generated)
        advance()
        for cand in self.candidates:
            if cand.name in stopped:  # settled while the batch before was being scored
                todo[cand.name] = set()
            if not todo[cand.name]:
                advance()
                continue
            if cand.activate is not None:
                cand.activate()
            start = time.perf_counter()
            first = self._first_steps.pop((cand.name, tuple(s.id for s in batch)), None)
            try:
                with answered_first(cand.pipeline.transformer, *first) if first else nullcontext():
                    raw = self._generate(cand.pipeline, batch, cand.images_per_call)
            except Exception as exc:
                explained = explain_failure(exc)
                if explained is not exc:
                    raise explained from exc
                if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise RuntimeError(
                        f"compiling {cand.name}'s transformer blocks failed ({type(exc).__name__}: "
                        f"{str(exc)[:300]}); `evals run --compile none` runs them eagerly"
                    ) from exc
                raise
            if self.guard is not None and cand.name in self.guarded:  # its retries count in its time
                raw, generated.guard[cand.name] = guard_batch(
                    self.guard, batch, raw, self.device, self._generate, cand.pipeline
                )
            generated.candidates.append((cand, raw, (time.perf_counter() - start) / len(batch)))
            advance()
        generated.notes = self.notes[noted:]
        return generated

    def _store(self, result: BatchResult, writer: RecordsWriter) -> None:
        """Images, then records (a record never points at a missing image), then MLflow."""
        self.reference_generated += result.reference_generated
        self.candidate_generated += result.candidate_generated
        self.run_notes.extend(result.notes)
        cached: list[Path | None] = [*result.reference_files] or [None] * len(result.reference)
        for sample_id, image, source in zip(result.ids, result.reference, cached, strict=False):
            path = self.run_dir / image_path(REFERENCE_FOLDER, sample_id)
            if source is None:
                save_png(path, image)
            else:
                try:
                    copy_png(source, path)  # this very image, already encoded by the cache
                except OSError:  # the entry went away meanwhile
                    save_png(path, image)
            self.tracker.log_reference_image(sample_id, path)
        for image, record in result.samples:
            line = self._screened.get((record.policy, record.sample_id))
            if line is not None:  # the sample's step error, from screening
                record = replace(record, metrics=record.metrics | line.metrics, steps=line.steps)
            path = self.run_dir / record.image
            save_png(path, image)
            writer.write(record)
            self.tracker.log_candidate_image(
                record.policy, record.sample_id, path, self.run_dir / record.reference_image
            )
        if self.fail_fast is not None:
            self.run_notes.extend(self.fail_fast.add([record for _, record in result.samples]))
