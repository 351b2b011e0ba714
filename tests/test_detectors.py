"""Detectors against labelled images: real photographs (clean, including a dark one) and defects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from evals.detectors import DETECTORS, Finding, detect_batch, run_detectors


def black_frame(image: np.ndarray) -> Finding:
    return run_detectors(image, ["black_frame"])["black_frame"]


def nonfinite(image: np.ndarray) -> Finding:
    return run_detectors(image, ["nonfinite"])["nonfinite"]


def clean_photos() -> dict[str, np.ndarray]:
    gray = np.stack([data.camera()] * 3, axis=-1)
    photos = {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "camera": gray,
        "rocket": data.rocket(),
        "brick": np.stack([data.brick()] * 3, axis=-1),
    }
    out = {k: v.astype(np.float64) / 255 for k, v in photos.items()}
    # A night scene: dark overall with some bright lights; it must not pass for a black frame.
    night = out["astronaut"] * 0.08
    night[100:110, 200:260] = 0.9
    out["night"] = night
    return out


@pytest.mark.parametrize("name", list(clean_photos()))
def test_clean_photos_are_not_flagged(name: str) -> None:
    findings = run_detectors(clean_photos()[name], ["black_frame", "nonfinite"])
    assert not any(f.flagged for f in findings.values()), findings


@pytest.mark.parametrize("level", [0.0, 1 / 255, 3 / 255, 6 / 255])
def test_black_and_near_black_frames_are_flagged(level: float) -> None:
    rng = np.random.default_rng(0)
    image = np.clip(level + rng.normal(0, 1 / 255, (64, 64, 3)), 0, 1)
    finding = black_frame(image)
    assert finding.flagged and "near-black" in finding.reason


def test_nan_image_counts_as_black_after_conversion() -> None:
    # What an 8-bit conversion would show: the float-stage nonfinite detector must say why.
    image = np.full((32, 32, 3), np.nan)
    assert black_frame(image).flagged
    assert nonfinite(image).flagged and "NaN" in nonfinite(image).reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_single_nonfinite_value_is_caught(bad: float) -> None:
    image = clean_photos()["coffee"].copy()
    image[10, 20, 1] = bad
    finding = nonfinite(image)
    assert finding.flagged and finding.score == pytest.approx(1 / image.size)
    assert not black_frame(image).flagged


def test_input_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="HWC RGB"):
        run_detectors(np.zeros((3, 32, 32)), ["nonfinite"])


def labelled_batch() -> torch.Tensor:
    """Four 256 px images with different findings: clean, striped, black, with a NaN."""
    from benchmarks.labelled_images import photo, with_stripes

    clean = photo("brick", 256)
    nan = photo("coffee", 256).copy()
    nan[5, 7, 0] = np.nan
    images = [clean, with_stripes(clean, 4 / 255, 16, 0), np.zeros_like(clean), nan]
    return torch.as_tensor(np.stack(images))


def test_a_batch_gives_each_image_its_own_findings() -> None:
    images = labelled_batch()
    batched = detect_batch(images, list(DETECTORS))
    for image, found in zip(images.numpy(), batched, strict=True):
        alone = run_detectors(image, list(DETECTORS))
        for name in DETECTORS:
            assert found[name].flagged == alone[name].flagged
            assert found[name].score == pytest.approx(alone[name].score, rel=1e-9, abs=1e-12)
    flagged = [sorted(n for n, f in found.items() if f.flagged) for found in batched]
    assert flagged == [[], ["stripe_noise"], ["black_frame", "flat", "saturation"], ["nonfinite"]]


@pytest.mark.gpu
def test_the_detectors_find_the_same_on_the_gpu() -> None:
    images = labelled_batch()
    cpu, gpu = detect_batch(images, list(DETECTORS)), detect_batch(images.cuda(), list(DETECTORS))
    for on_cpu, on_gpu in zip(cpu, gpu, strict=True):
        for name in DETECTORS:
            assert on_gpu[name].flagged == on_cpu[name].flagged
            assert on_gpu[name].score == pytest.approx(on_cpu[name].score, rel=1e-6, abs=1e-12)
    assert gpu[1]["stripe_noise"].reason.startswith("stripes: row pattern of period 16")
