"""Metric registry: what each metric is (metadata, importable without torch) and a lazy loader.

Each metric lives in its own module as a functional core plus a thin class (see `psnr.py`). The
registry names them here so suites can be validated before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evals.models.yamlspec import InputError, did_you_mean

if TYPE_CHECKING:
    from evals.metrics.base import ImageMetric


@dataclass(frozen=True)
class MetricInfo:
    name: str
    """The name suites use in `metrics:` and gates use in `metric:`."""
    higher_is_better: bool
    """Direction of "better", for reports and regression gates."""
    needs_reference: bool
    """Whether the metric compares a candidate image with its reference image."""
    description: str
    """One line for tables and `--help`."""
    implementation: str
    """`module:Class` of the implementation, imported only when the metric is used."""
    outputs: tuple[str, ...] = ()
    """Per-image values it produces (gates name these); empty means just `name`."""
    display_name: str = ""
    """Name for tables and reports, with the convention where one matters."""
    scores_images: bool = True
    """False for step error, which the runner computes from the transformers, not from images."""
    opposite: tuple[str, ...] = ()
    """Outputs whose direction is the opposite of `higher_is_better` (step error's cosine)."""

    @property
    def produces(self) -> tuple[str, ...]:
        return self.outputs or (self.name,)


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo(
            name="psnr",
            higher_is_better=True,
            needs_reference=True,
            description="peak signal-to-noise ratio in dB on 8-bit RGB, data range 1.0",
            implementation="evals.metrics.psnr:PSNR",
        ),
        MetricInfo(
            name="lpips",
            higher_is_better=False,
            needs_reference=True,
            description="LPIPS v0.1 perceptual distance (AlexNet trunk by default; VGG or SqueezeNet selectable)",
            implementation="evals.metrics.lpips:LPIPS",
            display_name="LPIPS",
        ),
        MetricInfo(
            name="clip_score",
            higher_is_better=True,
            needs_reference=False,
            description="CLIP score 100*cos(image, prompt), torchmetrics' convention, per image and not "
            "clamped, OpenAI ViT-L/14; also for the reference, and the candidate's difference",
            implementation="evals.metrics.clip_score:CLIPScore",
            outputs=("clip_score", "clip_score_ref", "clip_score_delta"),
            display_name="CLIP score (100*cos, ViT-L/14 OpenAI)",
        ),
        MetricInfo(
            name="step_error",
            higher_is_better=False,
            needs_reference=True,
            description="teacher-forced step error: relative L2 error of the candidate transformer's guided "
            "output on the reference's own step inputs, mean over the recorded steps; and the cosine",
            implementation="evals.step_error.trajectory:teacher_forced",
            outputs=("step_error", "step_cosine"),
            display_name="step error (relative L2, teacher-forced)",
            scores_images=False,
            opposite=("step_cosine",),
        ),
        MetricInfo(
            name="ssim",
            higher_is_better=True,
            needs_reference=True,
            description="structural similarity on 8-bit RGB (Gaussian 11x11, sigma 1.5)",
            implementation="evals.metrics.ssim:SSIM",
        ),
    )
}


def metric_info(name: str) -> MetricInfo:
    try:
        return METRICS[name]
    except KeyError:
        raise InputError(f"unknown metric {name!r}" + did_you_mean(name, METRICS)) from None


# Output name -> the metric that produces it (`clip_score_delta` -> `clip_score`).
OUTPUTS: dict[str, str] = {output: info.name for info in METRICS.values() for output in info.produces}


def higher_is_better(output: str) -> bool:
    """Direction of "better" of a metric output (`psnr`, `step_error`, `step_cosine`, ...)."""
    info = METRICS[OUTPUTS[output]]
    return info.higher_is_better != (output in info.opposite)


def load_metric(
    name: str, device: str = "cpu", weights: dict[str, str] | None = None, options: dict[str, object] | None = None
) -> ImageMetric:
    """Instantiate a metric (its network loaded once, on `device`); raises `MissingWeights` when its
    weights, or the package that runs it, are not installed here."""
    from evals.weights import MissingWeights

    module_name, class_name = metric_info(name).implementation.split(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        metric: ImageMetric = cls(device=device, weights=weights or {}, **(options or {}))
    except ModuleNotFoundError as exc:
        raise MissingWeights(f"the {exc.name!r} package is not installed (pip install -e . installs it)") from exc
    return metric
