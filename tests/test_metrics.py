"""PSNR and SSIM checked against scikit-image (an independent implementation) on real photographs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from evals.metrics import METRICS, load_metric, metric_info
from evals.metrics.psnr import psnr_per_image
from evals.metrics.ssim import ssim_per_image
from evals.models.yamlspec import InputError


def photos() -> list[np.ndarray]:
    gray = np.stack([data.camera()] * 3, axis=-1)
    return [im[:96, :128].astype(np.float64) / 255 for im in (data.astronaut(), data.coffee(), data.chelsea(), gray)]


def distortions(img: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    u8 = lambda x: np.round(np.clip(x, 0, 1) * 255) / 255  # noqa: E731 - the metrics see 8-bit images
    shifted = np.roll(img, 1, axis=1)
    return [
        u8(img + rng.normal(0, 0.02, img.shape)),
        u8(img + rng.normal(0, 0.1, img.shape)),
        u8(shifted),
        u8(img * 0.7),
        u8(1 - img),
    ]


def nchw(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("index", range(4))
def test_psnr_and_ssim_match_skimage(index: int) -> None:
    ref = photos()[index]
    cands = distortions(ref)
    refs = [ref] * len(cands)
    ours_psnr = psnr_per_image(nchw(cands), nchw(refs)).tolist()
    ours_ssim = ssim_per_image(nchw(cands), nchw(refs)).tolist()
    for cand, p, s in zip(cands, ours_psnr, ours_ssim, strict=True):
        assert p == pytest.approx(peak_signal_noise_ratio(ref, cand, data_range=1.0), abs=1e-4)
        expected = structural_similarity(
            ref, cand, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert s == pytest.approx(expected, abs=1e-5)


def test_known_values() -> None:
    ref = torch.zeros(1, 3, 32, 32)
    cand = torch.full((1, 3, 32, 32), 0.1)  # MSE 0.01 -> 20 dB exactly
    assert psnr_per_image(cand, ref).item() == pytest.approx(20.0, abs=1e-5)
    assert math.isinf(psnr_per_image(ref, ref).item())
    img = nchw(photos()[:1]).float()
    assert ssim_per_image(img, img).item() == pytest.approx(1.0, abs=1e-6)


def test_scores_are_per_image_in_batch_order() -> None:
    ref = nchw(photos())
    cand = ref.clone()
    cand[2] = (cand[2] + 0.05).clamp(0, 1)
    psnr = psnr_per_image(cand, ref)
    assert psnr.shape == (4,) and math.isinf(psnr[0]) and math.isfinite(psnr[2])


def test_registry_metadata_and_errors() -> None:
    assert METRICS["psnr"].higher_is_better and METRICS["ssim"].needs_reference
    scores = load_metric("ssim")(torch.ones(1, 3, 16, 16), torch.ones(1, 3, 16, 16), ["p"])
    assert scores["ssim"].item() == pytest.approx(1.0)
    with pytest.raises(InputError, match="did you mean 'psnr'"):
        metric_info("pnsr")


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr_per_image(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 32, 32))
