"""Detectors against labelled images: real photographs (clean, including a dark one) and defects."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from evals.detectors import black_frame, nonfinite, run_detectors


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


@pytest.mark.gpu
def test_the_stripe_statistic_is_the_same_on_the_gpu() -> None:
    from benchmarks.labelled_images import photo, with_stripes
    from evals.detectors import _luma
    from evals.stripes import row_patterns

    luma = _luma(with_stripes(photo("brick", 256), 4 / 255, 16, 0))
    cpu, gpu = row_patterns(luma, 32, "cpu"), row_patterns(luma, 32, "cuda")
    assert [p for _, _, p in gpu] == [p for _, _, p in cpu] == list(range(2, 33))
    assert [a for a, _, _ in gpu] == pytest.approx([a for a, _, _ in cpu], rel=1e-9)
    assert [z for _, z, _ in gpu] == pytest.approx([z for _, z, _ in cpu], rel=1e-6)
    assert max(cpu, key=lambda f: f[1])[2] == 16
