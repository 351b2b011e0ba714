"""The suite file, described once: these models validate a suite's YAML (its keys, types, bounds and
choices) and publish its JSON Schema (`evals schema suite`), which editors use to complete and check
suite files. What depends on more than one key (a gate's metric listed in `metrics`, tags that exist,
duplicate ids) is checked by `evals.suite`. Imports no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import Field, create_model

from evals.detectors import DETECTORS, detector_params
from evals.metrics import METRICS, OUTPUTS
from evals.models.yamlspec import StrictModel
from evals.suite_types import (
    BENCH_FIGURES,
    CASE_ID,
    COMPILE_CHOICES,
    DETECTOR_STATS,
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
else:  # the registries decide the names a suite may use
    MetricName = Literal[tuple(METRICS)]
    DetectorName = Literal[tuple(DETECTORS)]
    GatedMetric = Literal[tuple(OUTPUTS)]
    Stat = Literal[tuple(dict.fromkeys((*METRIC_STATS, PER_SAMPLE, *DETECTOR_STATS, "value")))]
    Op = Literal[OPS]
    ReferenceDtype = Literal[REFERENCE_DTYPES]
    CompileChoice = Literal[COMPILE_CHOICES]
    BenchFigure = Literal[BENCH_FIGURES]

Seed = Annotated[int, Field(ge=0)]


class Generation(StrictModel):
    """Generation settings shared by every sample."""

    height: int = Field(
        ge=SIDE_MULTIPLE,
        multiple_of=SIDE_MULTIPLE,
        description=f"image height in pixels, a multiple of {SIDE_MULTIPLE}",
    )
    width: int = Field(
        ge=SIDE_MULTIPLE, multiple_of=SIDE_MULTIPLE, description=f"image width in pixels, a multiple of {SIDE_MULTIPLE}"
    )
    steps: int = Field(ge=1, description="denoising steps")
    guidance: float = Field(ge=0, description="classifier-free guidance scale")
    batch_size: int = Field(ge=1, description="images per pipeline call; reference and candidates share batches")
    max_sequence_length: int = Field(256, ge=1, description="T5 token budget")


class Case(StrictModel):
    """A prompt, rendered once per seed."""

    id: str = Field(pattern=CASE_ID.pattern, description="lower-case letters, digits, '_', '.', '-': it names files")
    prompt: str = Field(description="the prompt")
    seeds: list[Seed] | None = Field(None, min_length=1, description="seeds (>= 0); left out: the suite's `seeds`")
    tags: list[str] = Field(default_factory=list, description="tags that gates can select")


class BaselineLimit(StrictModel):
    """The drop allowed against the accepted baseline: exactly one of the two."""

    max_drop: float | None = Field(None, ge=0, description="absolute drop (dB for PSNR)")
    max_rel_drop: float | None = Field(None, ge=0, description="drop as a fraction of the baseline's value")


class Gate(StrictModel):
    """One of metric, detector or bench; a threshold (`op`, `value`) or a `baseline` limit."""

    metric: GatedMetric | None = Field(None, description="a metric output, e.g. psnr, ssim, lpips, clip_score_delta")
    detector: DetectorName | None = Field(None, description="a detector listed in `detectors`")
    bench: BenchFigure | None = Field(None, description="a figure of the suite's `bench` section")
    stat: Stat | None = Field(
        None, description="metrics: mean, median, min, max, p05, p95 (per_sample with a baseline); detectors: "
        "count, rate, new_count"
    )  # fmt: skip
    op: Op | None = Field(None, description="comparison with `value`")
    value: float | None = Field(None, description="the threshold")
    optional: bool = Field(False, description="skip (shown) when the metric or baseline is unavailable here")
    severity: Literal["fail", "warn"] = Field("fail", description="warn: reported, does not fail the run")
    tags: list[str] = Field(default_factory=list, description="only the samples of cases with these tags")
    baseline: BaselineLimit | None = Field(None, description="compare with the committed baseline of the policy")


class Reference(StrictModel):
    dtype: ReferenceDtype = Field("auto", description="auto: float32 on CPU, bfloat16 on GPU")


class Bench(StrictModel):
    """Time the transformer step of reference and candidates (`bench` gates)."""

    resolution: int | None = Field(
        None, ge=SIDE_MULTIPLE, multiple_of=SIDE_MULTIPLE, description="image side in pixels"
    )
    batch: int | None = Field(None, ge=1)
    warmup: int | None = Field(None, ge=0)
    iters: int | None = Field(None, ge=1)
    compile: Literal["blocks", "none"] | None = None
    cuda_graph: bool | None = None


def _thresholds_model() -> Any:
    """`detector_thresholds`: each detector's own threshold keys, their defaults in the descriptions."""
    fields: dict[str, Any] = {}
    for name in DETECTORS:
        params = detector_params(name)
        if params:
            keys: dict[str, Any] = {
                k: (float | None, Field(None, description=f"default {v}")) for k, v in params.items()
            }
            fields[name] = (create_model(f"{name}_thresholds", __base__=StrictModel, **keys) | None, None)
    return create_model("DetectorThresholds", __base__=StrictModel, **fields)


DetectorThresholds = _thresholds_model()


class Weights(StrictModel):
    """Local weight files of the metrics that need them (relative to the suite file)."""

    lpips: str | None = None
    clip_score: str | None = None


class LpipsOptions(StrictModel):
    net: Literal["alex", "vgg", "squeeze"] | None = Field(None, description="LPIPS trunk")


class MetricOptions(StrictModel):
    lpips: LpipsOptions | None = None


class SuiteFile(StrictModel):
    """A suite: fixed prompts and seeds, the metrics and detectors that score them, and the gates."""

    name: str = Field(pattern=CASE_ID.pattern, description="names run folders and the MLflow experiment")
    description: str = ""
    model: str = Field("tiny", description="default model source: tiny, random:sd35-large, a folder or file")
    reference: Reference = Reference()
    policies: list[str] = Field(default_factory=list, description="candidates: shipped policy names or files")
    generation: Generation
    seeds: list[Seed] | None = Field(None, min_length=1, description="seeds of cases that give none")
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
    compile: CompileChoice = "auto"
    baselines: str | None = Field(None, description="folder of committed baselines (default: beside the suite)")
    gates: list[Gate]
