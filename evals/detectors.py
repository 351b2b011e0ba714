"""Failure detectors: pure functions over one image, returning a Finding. NumPy only, no torch.

Input is the float RGB image, HWC, on the 0..1 scale but *before* clamping or conversion to 8-bit:
NaN and Inf must still be visible here, because the 8-bit conversion turns them into black.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _finite_clipped(image: np.ndarray) -> np.ndarray:
    return np.clip(np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def nonfinite(image: np.ndarray) -> Finding:
    """Any NaN or Inf value. Score: the share of non-finite values."""
    bad = ~np.isfinite(image)
    count = int(bad.sum())
    share = count / bad.size
    if count:
        kinds = [k for k, m in (("NaN", np.isnan(image)), ("Inf", np.isinf(image))) if m.any()]
        return Finding(True, share, f"{count} non-finite values ({'/'.join(kinds)}, {share:.1%} of the image)")
    return Finding(False, 0.0, "all values finite")


BLACK_MEAN_LUMA = 0.03  # mean brightness below ~8/255 ...
BLACK_P99_LUMA = 0.08  # ... and almost no pixel above ~20/255: a night scene has lights, a black frame has none


def black_frame(image: np.ndarray) -> Finding:
    """Black or near-black frame. Score: mean luma (0..1)."""
    luma = _finite_clipped(image) @ LUMA
    mean = float(luma.mean())
    p99 = float(np.percentile(luma, 99))
    if mean < BLACK_MEAN_LUMA and p99 < BLACK_P99_LUMA:
        return Finding(True, mean, f"near-black frame: mean luma {mean:.4f}, 99th percentile {p99:.4f}")
    return Finding(False, mean, f"mean luma {mean:.4f}, 99th percentile {p99:.4f}")


Detector = Callable[[np.ndarray], Finding]

DETECTORS: dict[str, Detector] = {
    "black_frame": black_frame,
    "nonfinite": nonfinite,
}


def run_detectors(image: np.ndarray, names: tuple[str, ...] | list[str]) -> dict[str, Finding]:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {image.shape}")
    return {name: DETECTORS[name](image) for name in names}
