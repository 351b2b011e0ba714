"""What a suite is once parsed: generation settings, cases and their samples, gates, and the
choices a suite file may name. Frozen dataclasses; `evals.suite` reads YAML into them. No torch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from evals.models.names import SAFE_NAME

METRIC_STATS = ("mean", "median", "min", "max", "p05", "p95")
PER_SAMPLE = "per_sample"
"""Baseline gates only: every sample against the same sample of the baseline; the worst drop is gated."""
DETECTOR_STATS = ("count", "rate", "new_count")  # new_count: flagged where the reference is not
COMPILE_CHOICES = ("auto", "none", "blocks")  # `compile:` of a suite, `evals run --compile`
BENCH_FIGURES = ("latency_ratio", "weights_ratio")  # candidate / reference, from the suite's `bench`
GUARD_FIGURES = ("retry_rate", "failed_after_retry")  # of a guarded candidate (the suite's `guard`)
HUMAN_FIGURES = ("indistinguishable_rate", "cant_tell_rate", "pick_accuracy")  # blind A/B review (evals.review)
DEFAULT_MIN_VOTES = 30  # a human gate with fewer votes fails, saying how many are missing
LAYER_FIGURES = ("max_ratio", "max_error")  # of a candidate's layer profile (step error): against its baseline's, own
GUARD_FALLBACKS = ("reference", "reseed")  # what makes a flagged image again
OPS = (">=", "<=", ">", "<", "==", "!=")
REFERENCE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Image sides must divide into whole latent patches: SD3's VAE scale (8) times its patch size (2).
SIDE_MULTIPLE = 16
CASE_ID = SAFE_NAME  # ids become file names: the one rule for names that reach a path


@dataclass(frozen=True)
class Generation:
    height: int
    """Image height in pixels (a multiple of 16)."""
    width: int
    """Image width in pixels (a multiple of 16)."""
    steps: int
    """Denoising steps."""
    guidance: float
    """Classifier-free guidance scale."""
    batch_size: int
    """Images per pipeline call; reference and candidates use the same batches."""
    max_sequence_length: int = 256
    """T5 token budget, passed to the pipeline."""


@dataclass(frozen=True)
class Case:
    id: str
    """Unique id; used in file names and MLflow image keys."""
    prompt: str
    """The text prompt."""
    seeds: tuple[int, ...]
    """One image per seed."""
    tags: tuple[str, ...] = ()
    """Free-form categories (people, text, dark...), for filtering and reports."""


@dataclass(frozen=True)
class Sample:
    case: Case
    """The case this sample belongs to."""
    seed: int
    """The generator seed of this image."""

    @property
    def id(self) -> str:
        return f"{self.case.id}-s{self.seed}"


@dataclass(frozen=True)
class GateSpec:
    stat: str
    """Aggregate compared: mean/median/min/max/p05/p95 for metrics; count, rate or new_count (flagged
    where the reference image is not) for detectors."""
    op: str
    """Comparison operator, one of >=, <=, >, <, ==, !=."""
    value: float
    """Threshold."""
    metric: str | None = None
    """Metric gated on (exactly one of metric and detector)."""
    detector: str | None = None
    """Detector gated on."""
    bench: str | None = None
    """Bench figure gated on (latency_ratio, weights_ratio; stat `value`), measured after the run."""
    guard: str | None = None
    """Guard figure gated on (retry_rate, failed_after_retry; stat `value`), of a guarded candidate."""
    layers: str | None = None
    """Layer-profile figure gated on (max_ratio: the largest ratio of any layer's own step error to the
    same layer's in the baseline policy's committed profile; stat `value`). Needs step_error."""
    optional: bool = False
    """When the metric cannot be computed here (weights absent), show the gate as not evaluated
    instead of failing it."""
    severity: str = "fail"
    """fail: a failed gate fails the run; warn: it is reported and the run still passes."""
    tags: tuple[str, ...] = ()
    """Apply the gate to the samples of cases with any of these tags only (empty: every sample)."""
    baseline: tuple[str, float] | None = None
    """Regression gate: ("max_drop", x) or ("max_rel_drop", x) against the committed (or accepted) baseline of
    the same suite and policy, instead of op/value; a drop is a change for the worse."""
    human: str | None = None
    """Blind A/B review figure gated on (indistinguishable_rate, cant_tell_rate, pick_accuracy; stat
    `value`): judged by `evals review --gate RUN_DIR` once people have voted, never by `evals run`."""
    min_votes: int = DEFAULT_MIN_VOTES
    """A human gate with fewer votes for the candidate fails."""

    @property
    def subject(self) -> str:
        return self.metric or self.detector or self.bench or self.guard or self.layers or self.human or "?"

    def describe(self) -> str:
        where = f" [tags {','.join(self.tags)}]" if self.tags else ""
        if self.baseline is not None:
            kind, limit = self.baseline
            return f"{self.subject} {self.stat} {kind.replace('_', ' ')} {limit:g} vs baseline{where}"
        return f"{self.subject} {self.stat} {self.op} {self.value:g}{where}"


@dataclass(frozen=True)
class GuardSpec:
    """The suite's `guard`: candidates whose flagged images are made again (evals.guard)."""

    candidates: tuple[str, ...] | None
    """Candidate names to guard; None: every candidate but the noise floor."""
    detectors: tuple[str, ...]
    """Detectors that flag an image (listed in the suite's `detectors`, with its thresholds)."""
    on_failure: str = "reference"
    """`reference`: the reference pipeline makes the image again (same seed first); `reseed`: the
    candidate itself, with a new seed."""
    max_tries: int = 1
    """Retries per flagged image at most."""


@dataclass(frozen=True)
class Suite:
    name: str
    """Suite name; the MLflow experiment name."""
    path: str
    """File the suite was loaded from."""
    sha256: str
    """Hash of the suite's parsed content, logged with every run."""
    model: str
    """Default model source (`tiny`, or a path); `--model` overrides."""
    reference_dtype: str
    """Reference precision: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."""
    generation: Generation
    """Generation settings shared by every sample."""
    cases: tuple[Case, ...]
    """Prompts and seeds."""
    metrics: tuple[str, ...]
    """Metric names (see `evals.metrics.METRICS`)."""
    detectors: tuple[str, ...]
    """Failure detector names (see `evals.detectors.DETECTORS`)."""
    gates: tuple[GateSpec, ...]
    """Pass/fail thresholds, evaluated per candidate."""
    policies: tuple[str, ...] = ()
    """Default candidate policies (names or paths); `--policy` overrides."""
    detector_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Detector name -> threshold overrides (see each detector's keyword arguments)."""
    weights: dict[str, str] = field(default_factory=dict)
    """Metric name -> weights file (relative paths are relative to the suite file)."""
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Metric name -> options, e.g. `{lpips: {net: vgg}}`."""
    description: str = ""
    """What the suite is for."""
    baselines: str | None = None
    """Folder of committed baselines, relative to the suite file (default `baselines/<name>/` beside it)."""
    bench: dict[str, Any] | None = None
    """After the run, time each candidate's transformer step against the reference's (`evals bench`
    settings: resolution, batch, warmup, iters, compile, cuda_graph) for bench gates; None: no bench."""
    compile: str = "auto"
    """`blocks`: the candidates' transformer blocks are compiled for generation (the fast FP8 path:
    activation quantization fused by inductor); `none`: eager; `auto`: blocks on a GPU, else none.
    The reference always runs as loaded."""
    noise_floor: str | None = None
    """Also score the reference against itself under a harmless change: `batch` (one image per call
    instead of the suite's batches) or `float32` (the reference recomputed in float32); None: off."""
    tags: tuple[str, ...] = field(default=())
    """Union of case tags, for reports."""
    guard: GuardSpec | None = None
    """Guarded candidates (`guard` gates); None: no guard."""
    images: int | None = None
    """Candidate images for about this many samples only (`images: {sample: N}`); None: every sample."""

    def samples(self) -> list[Sample]:
        return [Sample(case, seed) for case in self.cases for seed in case.seeds]

    def batches(self) -> list[list[Sample]]:
        """Samples in fixed batches: reference and every candidate see exactly these batches."""
        samples = self.samples()
        size = self.generation.batch_size
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    def image_batches(self) -> list[list[Sample]]:
        """The batches whose candidate images are generated: every batch, or with `images` whole
        batches until at least that many samples, taken in turn from each first tag of their cases
        (each tag's batches in the order of a hash of their sample ids: the same on every run and
        machine, and unrelated to the order cases are written in), returned in suite order."""
        batches = self.batches()
        if self.images is None or self.images >= sum(map(len, batches)):
            return batches
        groups: dict[str, list[int]] = {}
        for i, batch in enumerate(batches):
            tags = batch[0].case.tags
            groups.setdefault(tags[0] if tags else "", []).append(i)
        for members in groups.values():
            members.sort(key=lambda i: hashlib.sha256("|".join(s.id for s in batches[i]).encode()).hexdigest())
        chosen: list[int] = []
        count = 0
        while count < self.images:
            for members in groups.values():
                if members and count < self.images:
                    chosen.append(members.pop(0))
                    count += len(batches[chosen[-1]])
        return [batches[i] for i in sorted(chosen)]
