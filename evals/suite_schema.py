"""The suite file, described once: these models validate a suite's YAML (its keys, types, bounds and
choices) and publish its JSON Schema (`evals schema suite`), which editors use to complete and check
suite files. What depends on more than one key (a gate's metric listed in `metrics`, tags that exist,
duplicate ids) is checked by `evals.suite`. Imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import Field, create_model

from evals.detectors import DETECTORS, detector_params
from evals.metrics import METRICS, OUTPUTS
from evals.models.yamlspec import MAX_SEED, StrictModel
from evals.suite_types import (
    BENCH_FIGURES,
    CASE_ID,
    COMPILE_CHOICES,
    DEFAULT_MIN_VOTES,
    DETECTOR_STATS,
    GUARD_FALLBACKS,
    GUARD_FIGURES,
    HUMAN_FIGURES,
    LAYER_FIGURES,
    METRIC_STATS,
    OPS,
    PER_SAMPLE,
    REFERENCE_DTYPES,
    SIDE_MULTIPLE,
)

if TYPE_CHECKING:
    MetricName: TypeAlias = str
    DetectorName: TypeAlias = str
    GatedMetric: TypeAlias = str
    Stat: TypeAlias = str
    Op: TypeAlias = str
    ReferenceDtype: TypeAlias = str
    CompileChoice: TypeAlias = str
    BenchFigure: TypeAlias = str
    GuardFigure: TypeAlias = str
    GuardFallback: TypeAlias = str
    LayerFigure: TypeAlias = str
    HumanFigure: TypeAlias = str
else:  # the registries decide the names a suite may use
    MetricName = Literal[tuple(METRICS)]
    DetectorName = Literal[tuple(DETECTORS)]
    GatedMetric = Literal[tuple(OUTPUTS)]
    Stat = Literal[tuple(dict.fromkeys((*METRIC_STATS, PER_SAMPLE, *DETECTOR_STATS, "value")))]
    Op = Literal[OPS]
    ReferenceDtype = Literal[REFERENCE_DTYPES]
    CompileChoice = Literal[COMPILE_CHOICES]
    BenchFigure = Literal[BENCH_FIGURES]
    GuardFigure = Literal[GUARD_FIGURES]
    GuardFallback = Literal[GUARD_FALLBACKS]
    LayerFigure = Literal[LAYER_FIGURES]
    HumanFigure = Literal[HUMAN_FIGURES]

# Upper bounds no real suite comes near; past them a value is a typo that would crash or hang a run.
MAX_SIDE = 8192  # pixels a side (SD3.5 is trained at about 1 megapixel, 1024 a side)
MAX_STEPS = 1000  # denoising steps (the SD3.5 suites use 28)
MAX_GUIDANCE = 100.0  # classifier-free guidance (SD3.5 uses 3.5 to 7)
MAX_BATCH = 1024  # images per pipeline call, and the bench's transformer batch
MAX_SEQUENCE_LENGTH = 512  # T5 tokens: the SD3 pipelines refuse more
MAX_BENCH_WARMUP = 100  # untimed bench calls (default 3)
MAX_BENCH_ITERS = 1000  # timed bench steps (default 10)
MAX_IMAGE_SAMPLES = 1_000_000  # `images: {sample: N}`; the suite's own sample count is checked on load
MAX_VOTES = 1_000_000  # a human gate's min_votes
MAX_GUARD_TRIES = 10  # retries of one flagged image: past a few, the build is broken, not unlucky
# Each detector threshold's range. Luma, amplitudes and shares are on the 0..1 scale; z is a
# consistency score (defaults 6.5); a period is in pixels. tests/test_schemas.py checks every
# threshold of every registered detector has one.
THRESHOLD_BOUNDS: dict[str, tuple[float, float]] = {
    "max_mean": (0, 1),
    "max_p99": (0, 1),
    "max_share": (0, 1),
    "min_range": (0, 1),
    "min_amplitude": (0, 1),
    "min_z": (0, 1000),
    "max_period": (2, MAX_SIDE),
}

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
SEEDS = "0 to 2**64-1"


class Generation(StrictModel):
    """Generation settings shared by every sample."""

    height: int = Field(
        ge=SIDE_MULTIPLE,
        le=MAX_SIDE,
        multiple_of=SIDE_MULTIPLE,
        description=f"image height in pixels, a multiple of {SIDE_MULTIPLE}, at most {MAX_SIDE}",
    )
    width: int = Field(
        ge=SIDE_MULTIPLE,
        le=MAX_SIDE,
        multiple_of=SIDE_MULTIPLE,
        description=f"image width in pixels, a multiple of {SIDE_MULTIPLE}, at most {MAX_SIDE}",
    )
    steps: int = Field(ge=1, le=MAX_STEPS, description=f"denoising steps, 1 to {MAX_STEPS}")
    guidance: float = Field(ge=0, le=MAX_GUIDANCE, description=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g}")
    batch_size: int = Field(
        ge=1,
        le=MAX_BATCH,
        description=f"images per pipeline call, 1 to {MAX_BATCH}; reference and candidates share batches",
    )
    max_sequence_length: int = Field(
        256, ge=1, le=MAX_SEQUENCE_LENGTH, description=f"T5 token budget, 1 to {MAX_SEQUENCE_LENGTH}"
    )


class Case(StrictModel):
    """A prompt, rendered once per seed."""

    id: str = Field(pattern=CASE_ID.pattern, description="lower-case letters, digits, '_', '.', '-': it names files")
    prompt: str = Field(description="the prompt")
    seeds: list[Seed] | None = Field(None, min_length=1, description=f"seeds ({SEEDS}); left out: the suite's `seeds`")
    tags: list[str] = Field(default_factory=list, description="tags that gates can select")


class BaselineLimit(StrictModel):
    """The drop allowed against the accepted baseline: exactly one of the two."""

    max_drop: float | None = Field(None, ge=0, description="absolute drop (dB for PSNR), a finite number >= 0")
    max_rel_drop: float | None = Field(
        None, ge=0, description="drop as a fraction of the baseline's value, a finite number >= 0"
    )


class Gate(StrictModel):
    """One of metric, detector, bench, guard, layers or human; a threshold (`op`, `value`) or a `baseline` limit."""

    metric: GatedMetric | None = Field(None, description="a metric output, e.g. psnr, ssim, lpips, clip_score_delta")
    detector: DetectorName | None = Field(None, description="a detector listed in `detectors`")
    bench: BenchFigure | None = Field(None, description="a figure of the suite's `bench` section")
    guard: GuardFigure | None = Field(
        None, description="a guarded candidate's retry_rate (share of images made again) or failed_after_retry (count)"
    )
    layers: LayerFigure | None = Field(
        None,
        description="max_ratio: the largest ratio of a layer's own step error to the baseline profile's; "
        "max_error: the largest own step error of any layer or block, no baseline needed (needs step_error)",
    )
    human: HumanFigure | None = Field(
        None,
        description="a blind A/B review figure (evals review): indistinguishable_rate (can't tell, or a wrong "
        "pick), cant_tell_rate, pick_accuracy; judged by `evals review --gate`",
    )
    min_votes: int | None = Field(
        None, ge=1, le=MAX_VOTES, description=f"human gates: fewer votes fail the gate (default {DEFAULT_MIN_VOTES})"
    )
    stat: Stat | None = Field(
        None, description="metrics: mean, median, min, max, p05, p95 (per_sample with a baseline); detectors: "
        "count, rate, new_count"
    )  # fmt: skip
    op: Op | None = Field(None, description="comparison with `value`")
    value: float | None = Field(None, description="the threshold, a finite number")
    optional: bool = Field(False, description="skip (shown) when the metric or baseline is unavailable here")
    severity: Literal["fail", "warn"] = Field("fail", description="warn: reported, does not fail the run")
    tags: list[str] = Field(default_factory=list, description="only the samples of cases with these tags")
    baseline: BaselineLimit | None = Field(None, description="compare with the committed baseline of the policy")


class Reference(StrictModel):
    dtype: ReferenceDtype = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")


class Bench(StrictModel):
    """Time the transformer step of reference and candidates (`bench` gates)."""

    resolution: int | None = Field(
        None,
        ge=SIDE_MULTIPLE,
        le=MAX_SIDE,
        multiple_of=SIDE_MULTIPLE,
        description=f"image side in pixels, a multiple of {SIDE_MULTIPLE}, at most {MAX_SIDE} (default 1024)",
    )
    batch: int | None = Field(
        None, ge=1, le=MAX_BATCH, description=f"batch the transformer sees per step, 1 to {MAX_BATCH} (default 2)"
    )
    warmup: int | None = Field(
        None,
        ge=0,
        le=MAX_BENCH_WARMUP,
        description=f"untimed calls after the first, 0 to {MAX_BENCH_WARMUP} (default 3)",
    )
    iters: int | None = Field(
        None, ge=1, le=MAX_BENCH_ITERS, description=f"timed transformer steps, 1 to {MAX_BENCH_ITERS} (default 10)"
    )
    compile: Literal["blocks", "none"] | None = None
    cuda_graph: bool | None = None


class Guard(StrictModel):
    """Run candidates through the guard (evals.guard): an image a detector flags is made again."""

    candidates: list[str] | None = Field(
        None, min_length=1, description="candidate names to guard (default: every candidate)"
    )
    detectors: list[DetectorName] | None = Field(
        None, min_length=1, description="detectors that flag an image, listed in `detectors` (default: all of those)"
    )
    on_failure: GuardFallback = Field(
        "reference", description="reference: the reference makes it again (same seed first); reseed: the candidate, "
        "with a new seed"
    )  # fmt: skip
    max_tries: int = Field(1, ge=1, le=MAX_GUARD_TRIES, description=f"retries per image, 1 to {MAX_GUARD_TRIES}")


def _threshold_field(default: Any, bounds: tuple[float, float] | None) -> tuple[Any, Any]:
    kind = int if isinstance(default, int) else float
    if bounds is None:  # a new detector's threshold before THRESHOLD_BOUNDS names it: finite only
        return kind | None, Field(None, description=f"default {default}")
    low, high = bounds
    description = f"default {default}; {low:g} to {high:g}"
    return kind | None, Field(None, ge=kind(low), le=kind(high), description=description)


def _thresholds_model() -> Any:
    """`detector_thresholds`: each detector's own threshold keys, their defaults and ranges in the
    descriptions. A threshold whose default is an integer takes integers."""
    fields: dict[str, Any] = {}
    for name in DETECTORS:
        params = detector_params(name)
        if params:
            keys: dict[str, Any] = {k: _threshold_field(v, THRESHOLD_BOUNDS.get(k)) for k, v in params.items()}
            fields[name] = (create_model(f"{name}_thresholds", __base__=StrictModel, **keys) | None, None)
    return create_model("DetectorThresholds", __base__=StrictModel, **fields)


DetectorThresholds = _thresholds_model()


class Weights(StrictModel):
    """Local weight files of the metrics that need them (relative to the suite file)."""

    lpips: str | None = None
    clip_score: str | None = None


class LpipsOptions(StrictModel):
    net: Literal["alex", "vgg", "squeeze"] | None = Field(None, description="LPIPS trunk")


class StepErrorOptions(StrictModel):
    steps: (
        Literal["all"]
        | Annotated[int, Field(ge=1, le=MAX_STEPS)]
        | list[Annotated[int, Field(ge=0, le=MAX_STEPS)]]
        | None
    ) = Field(None, description="recorded steps: all, a number evenly spaced (default 4) or a list of step indices")


class MetricOptions(StrictModel):
    lpips: LpipsOptions | None = None
    step_error: StepErrorOptions | None = None


class Images(StrictModel):
    """Candidate images for part of the suite only (quick pre-merge checks): step error still screens
    every sample; image metrics, detectors and their gates judge the samples with images."""

    sample: int = Field(
        ge=1,
        le=MAX_IMAGE_SAMPLES,
        description="samples to generate images of: whole batches, spread over the cases' first tags, "
        "chosen the same way on every run",
    )


class SuiteFile(StrictModel):
    """A suite: fixed prompts and seeds, the metrics and detectors that score them, and the gates."""

    name: str = Field(pattern=CASE_ID.pattern, description="names run folders and the MLflow experiment")
    description: str = ""
    model: str = Field("tiny", description="default model source: tiny, random:sd35-large, a folder or file")
    reference: Reference = Reference()
    policies: list[str] = Field(default_factory=list, description="candidates: shipped policy names or files")
    generation: Generation
    seeds: list[Seed] | None = Field(None, min_length=1, description=f"seeds ({SEEDS}) of cases that give none")
    cases: list[Case] = Field(min_length=1)
    metrics: list[MetricName]
    detectors: list[DetectorName] = Field(default_factory=list)
    detector_thresholds: DetectorThresholds = DetectorThresholds()  # type: ignore[valid-type]
    weights: Weights = Weights()
    metric_options: MetricOptions = MetricOptions()
    noise_floor: Literal[True, False, "batch", "float32"] = Field(
        False, description="also run a candidate that changes only batch composition (true, batch) or float32"
    )
    bench: Bench | None = None
    guard: Guard | None = None
    images: Images | None = None
    compile: CompileChoice = "auto"
    baselines: str | None = Field(None, description="folder of committed baselines (default: beside the suite)")
    gates: list[Gate]
