"""Failure detectors: pure functions over one image, returning a Finding. NumPy, except the stripe
statistic (`evals.stripes`), which runs in torch on the run's device.

Input is the float RGB image, HWC, on the 0..1 scale but *before* clamping or conversion to 8-bit:
NaN and Inf must still be visible here, because the 8-bit conversion turns them into black.
Thresholds are keyword arguments with defaults; a suite overrides them under `detector_thresholds`.
False-positive and recall rates of the defaults, measured on labelled photographs, are in the README
(reproduce with `python benchmarks/detector_rates.py`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Rec. 601 luma weights: brightness as people see it.
LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Finding:
    flagged: bool
    """True when the image shows the failure."""
    score: float
    """The measured quantity the decision was made on (see each detector)."""
    reason: str
    """One line a person can read: why it was flagged, or what was measured."""

    def __post_init__(self) -> None:
        # Detectors compute with NumPy; keep plain Python values so findings serialize as they are.
        object.__setattr__(self, "flagged", bool(self.flagged))
        object.__setattr__(self, "score", float(self.score))

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _finite_clipped(image: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _luma(image: np.ndarray) -> np.ndarray:
    return _finite_clipped(image) @ LUMA


def nonfinite(image: np.ndarray) -> Finding:
    """Any NaN or Inf value. Score: the share of non-finite values."""
    bad = ~np.isfinite(image)
    count = int(bad.sum())
    share = count / bad.size
    if count:
        kinds = [k for k, m in (("NaN", np.isnan(image)), ("Inf", np.isinf(image))) if m.any()]
        return Finding(True, share, f"{count} non-finite values ({'/'.join(kinds)}, {share:.1%} of the image)")
    return Finding(False, 0.0, "all values finite")


def black_frame(image: np.ndarray, *, max_mean: float = 0.03, max_p99: float = 0.08) -> Finding:
    """Black or near-black frame: mean luma below `max_mean` (~8/255) and 99th percentile below
    `max_p99` (~20/255): a night scene has lights, a black frame has none. Score: mean luma."""
    luma = _luma(image)
    mean = float(luma.mean())
    p99 = float(np.percentile(luma, 99))
    if mean < max_mean and p99 < max_p99:
        return Finding(True, mean, f"near-black frame: mean luma {mean:.4f}, 99th percentile {p99:.4f}")
    return Finding(False, mean, f"mean luma {mean:.4f}, 99th percentile {p99:.4f}")


def saturation(image: np.ndarray, *, max_share: float = 0.35) -> Finding:
    """Blown-out image: share of pixels with every channel clipped (at or past 0 or 1, i.e. 0 or
    255 in 8-bit) above `max_share`. Score: that share."""
    finite = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    clipped = ((finite <= 0.5 / 255) | (finite >= 254.5 / 255)).all(axis=2)
    share = float(clipped.mean())
    high = float((finite >= 254.5 / 255).all(axis=2).mean())
    detail = f"{share:.1%} of pixels clipped ({high:.1%} white, {share - high:.1%} black)"
    return Finding(share > max_share, share, ("saturated: " if share > max_share else "") + detail)


def flat(image: np.ndarray, *, min_range: float = 0.06) -> Finding:
    """Washed-out or near-constant image: the luma range between the 1st and 99th percentile below
    `min_range` (~15/255). Score: that range."""
    luma = _luma(image)
    low, high = np.percentile(luma, [1, 99])
    spread = float(high - low)
    if spread < min_range:
        return Finding(True, spread, f"flat image: luma spans only {spread * 255:.1f}/255 (1st-99th percentile)")
    return Finding(False, spread, f"luma spans {spread * 255:.1f}/255 (1st-99th percentile)")


def stripe_noise(
    image: np.ndarray,
    *,
    min_amplitude: float = 2 / 255,
    min_z: float = 6.5,
    max_period: int = 32,
    device: str = "cpu",
) -> Finding:
    """Periodic row or column banding of any period from 2 to `max_period` pixels: flagged when the
    banding pattern's amplitude (its standard deviation, 0..1 scale) is at least `min_amplitude` and
    it is consistent across the image (z >= `min_z`). Score: the amplitude. The statistic
    (`evals.stripes`) runs on `device`."""
    from evals.stripes import row_patterns

    luma = _luma(image)
    # Natural structure may be more consistent than the banding but faint: the banding is the most
    # consistent pattern among those large enough to see.
    found = [
        (amplitude >= min_amplitude and z >= min_z, z, amplitude, period, name)
        for name, plane in (("row", luma), ("column", luma.T))
        for amplitude, z, period in row_patterns(plane, max_period, device)
    ]
    if not found:
        return Finding(False, 0.0, "image too small for the stripe test (8 pixels a side at least)")
    flagged, z, amplitude, period, name = max(found, key=lambda f: (f[0], f[1]))
    detail = f"{name} pattern of period {period}: amplitude {amplitude * 255:.2f}/255, z {z:.1f}"
    return Finding(flagged, amplitude, ("stripes: " if flagged else "strongest ") + detail)


def checkerboard(image: np.ndarray, *, min_amplitude: float = 1.5 / 255, min_z: float = 6.5) -> Finding:
    """2-pixel checkerboard (the (-1)^(x+y) pattern of upsampling artifacts): its amplitude per
    16x16 block, consistent in sign across blocks (z >= `min_z`) and at least `min_amplitude`.
    Score: the mean amplitude."""
    luma = _luma(image)
    rows, cols = (s - s % 16 for s in luma.shape)
    if rows < 16 or cols < 16:
        return Finding(False, 0.0, "image smaller than one 16x16 block")
    sign = np.where((np.add.outer(np.arange(rows), np.arange(cols)) % 2) == 0, 1.0, -1.0)
    # Neighbour differences cancel smooth content; what survives in the (-1)^(x+y) direction is the pattern.
    block = (luma[:rows, :cols] * sign).reshape(rows // 16, 16, cols // 16, 16).mean(axis=(1, 3)).ravel()
    amplitude = float(block.mean())
    z = abs(amplitude) / (float(block.std()) / np.sqrt(block.size) + 1e-12)
    flagged = abs(amplitude) >= min_amplitude and z >= min_z
    detail = f"amplitude {abs(amplitude) * 255:.2f}/255, z {z:.1f}"
    return Finding(flagged, abs(amplitude), ("checkerboard: " if flagged else "") + detail)


Detector = Callable[..., Finding]

DETECTORS: dict[str, Detector] = {
    "black_frame": black_frame,
    "nonfinite": nonfinite,
    "saturation": saturation,
    "flat": flat,
    "stripe_noise": stripe_noise,
    "checkerboard": checkerboard,
}


def detector_params(name: str) -> dict[str, Any]:
    """The tunable thresholds of a detector and their defaults."""
    signature = inspect.signature(DETECTORS[name])
    params = signature.parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "device"}


def run_detectors(
    image: np.ndarray,
    names: tuple[str, ...] | list[str],
    thresholds: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
) -> dict[str, Finding]:
    """Every named detector on one image; the costly statistics run on `device`."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {image.shape}")
    thresholds = thresholds or {}
    extra = {"stripe_noise": {"device": device}}
    return {name: DETECTORS[name](image, **thresholds.get(name, {}), **extra.get(name, {})) for name in names}
