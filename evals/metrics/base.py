"""The interface every image metric class implements."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from evals.metrics import MetricInfo


class ImageMetric(Protocol):
    info: ClassVar[MetricInfo]

    def __call__(self, candidate: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Score a batch: images are float NCHW in [0, 1]; returns one value per image (N,) for each
        of `info.outputs`."""
        ...
