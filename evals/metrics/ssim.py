"""SSIM per image: a functional core over torchmetrics and the registry's thin class."""

from __future__ import annotations

from typing import ClassVar

import torch

from evals.metrics import METRICS, MetricInfo

BORDER = 5  # half the Gaussian window: int(3.5 * sigma + 0.5)


def ssim_per_image(candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each image pair (float NCHW in [0, 1]), Gaussian window 11, sigma 1.5.

    The convention of Wang et al. 2004 (and of `skimage.metrics.structural_similarity` with
    `gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1`), averaged over
    channels. torchmetrics averages the SSIM map over the reflect-padded border too; like skimage we
    crop the 5-pixel border, where the window reaches outside the image, before averaging.
    """
    # Imported here: torchmetrics takes seconds to import, which the scoring worker pays beside generation.
    from torchmetrics.functional.image import structural_similarity_index_measure

    if candidate.shape != reference.shape:
        raise ValueError(f"shape mismatch: candidate {tuple(candidate.shape)} vs reference {tuple(reference.shape)}")
    if min(candidate.shape[-2:]) <= 2 * BORDER:
        raise ValueError(f"SSIM needs images larger than {2 * BORDER}x{2 * BORDER}, got {tuple(candidate.shape[-2:])}")
    _, ssim_map = structural_similarity_index_measure(
        candidate.double(),
        reference.double(),
        data_range=1.0,
        reduction="none",
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        return_full_image=True,
    )
    inner = ssim_map[..., BORDER:-BORDER, BORDER:-BORDER]
    return inner.mean(dim=(1, 2, 3)).float()


class SSIM:
    info: ClassVar[MetricInfo] = METRICS["ssim"]

    def __init__(self, device: str = "cpu", **_: object):
        self.device = device

    def __call__(self, candidate: torch.Tensor, reference: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        # On the run's device: in float64 on a CPU, SSIM of 512x512 images costs ~0.3 s each.
        return {"ssim": ssim_per_image(candidate.to(self.device), reference.to(self.device)).cpu()}
