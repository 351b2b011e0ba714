"""PSNR per image: a functional core over torchmetrics and the registry's thin class."""

from __future__ import annotations

from typing import ClassVar

import torch

from evals.metrics import METRICS, MetricInfo


def psnr_per_image(candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image pair (float NCHW in [0, 1]); identical images give +inf."""
    # Imported here: torchmetrics takes seconds to import, which the scoring worker pays beside generation.
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if candidate.shape != reference.shape:
        raise ValueError(f"shape mismatch: candidate {tuple(candidate.shape)} vs reference {tuple(reference.shape)}")
    scores = peak_signal_noise_ratio(
        candidate.double(), reference.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return scores.float()


class PSNR:
    info: ClassVar[MetricInfo] = METRICS["psnr"]

    def __init__(self, device: str = "cpu", **_: object):
        self.device = device

    def __call__(self, candidate: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        # On the run's device: in float64 on a CPU, SSIM of 512x512 images costs ~0.3 s each.
        return {"psnr": psnr_per_image(candidate.to(self.device), reference.to(self.device)).cpu()}
