"""Failure detectors, each over a batch of images at once, in torch on the run's device (the GPU
in a GPU run: one pass per batch instead of NumPy per image on the CPU).

Input is the float RGB image on the 0..1 scale but *before* clamping or conversion to 8-bit: NaN
and Inf must still be visible here, because the 8-bit conversion turns them into black. Statistics
are in float64, as NumPy computed them before (quantiles interpolate as `np.percentile` does).
Thresholds are keyword arguments with defaults; a suite overrides them under `detector_thresholds`.
False-positive and recall rates of the defaults, measured on labelled photographs, are in docs/metrics-and-detectors.md
(reproduce with `python benchmarks/detector_rates.py`).

torch is imported inside the functions that compute: `evals.suite` reads this registry's names and
threshold defaults, and `evals --help` or `evals validate` must not load torch for that.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

# Rec. 601 luma weights: brightness as people see it.
LUMA = (0.299, 0.587, 0.114)


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


class ImageBatch:
    """(N, H, W, 3) float64 images on one device, and the planes several detectors share, made once."""

    def __init__(self, images: torch.Tensor) -> None:
        import torch

        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected (N, H, W, 3) RGB images, got shape {tuple(images.shape)}")
        self.images = images.to(torch.float64)

    def __len__(self) -> int:
        return self.images.shape[0]

    @functools.cached_property
    def finite(self) -> torch.Tensor:
        """NaN as 0, +Inf as 1, -Inf as 0; not clipped."""
        import torch

        return torch.nan_to_num(self.images, nan=0.0, posinf=1.0, neginf=0.0)

    @functools.cached_property
    def luma(self) -> torch.Tensor:
        """(N, H, W) luma of the finite values clipped to 0..1."""
        import torch

        weights = torch.tensor(LUMA, dtype=torch.float64, device=self.images.device)
        return self.finite.clamp(0.0, 1.0) @ weights

    @functools.cached_property
    def _sorted_luma(self) -> torch.Tensor:
        return self.luma.flatten(1).sort(dim=1).values

    def luma_percentiles(self, *qs: float) -> torch.Tensor:
        """(N, len(qs)): luma percentiles, interpolated as `np.percentile`'s default (linear) does."""
        import torch

        ordered = self._sorted_luma
        position = torch.tensor(qs, dtype=torch.float64, device=ordered.device) / 100 * (ordered.shape[1] - 1)
        below = position.floor().long()
        above = (below + 1).clamp(max=ordered.shape[1] - 1)
        t = position - below
        a, b = ordered[:, below], ordered[:, above]
        # NumPy's lerp: from the nearer end, so that t = 1 gives b exactly.
        return torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)


def nonfinite(batch: ImageBatch) -> list[Finding]:
    """Any NaN or Inf value. Score: the share of non-finite values."""
    import torch

    images = batch.images
    stats = torch.stack(
        [
            (~torch.isfinite(images)).flatten(1).sum(1),
            images.isnan().flatten(1).any(1),
            images.isinf().flatten(1).any(1),
        ]
    )
    size = images[0].numel()
    found = []
    for count, has_nan, has_inf in zip(*stats.tolist(), strict=True):
        if count:
            share = count / size
            kinds = "/".join(k for k, present in (("NaN", has_nan), ("Inf", has_inf)) if present)
            found.append(Finding(True, share, f"{count} non-finite values ({kinds}, {share:.1%} of the image)"))
        else:
            found.append(Finding(False, 0.0, "all values finite"))
    return found


def black_frame(batch: ImageBatch, *, max_mean: float = 0.03, max_p99: float = 0.08) -> list[Finding]:
    """Black or near-black frame: mean luma below `max_mean` (~8/255) and 99th percentile below
    `max_p99` (~20/255): a night scene has lights, a black frame has none. Score: mean luma."""
    import torch

    stats = torch.stack([batch.luma.flatten(1).mean(1), batch.luma_percentiles(99)[:, 0]], dim=1)
    found = []
    for mean, p99 in stats.tolist():
        if mean < max_mean and p99 < max_p99:
            found.append(Finding(True, mean, f"near-black frame: mean luma {mean:.4f}, 99th percentile {p99:.4f}"))
        else:
            found.append(Finding(False, mean, f"mean luma {mean:.4f}, 99th percentile {p99:.4f}"))
    return found


def saturation(batch: ImageBatch, *, max_share: float = 0.35) -> list[Finding]:
    """Blown-out image: share of pixels with every channel clipped (at or past 0 or 1, i.e. 0 or
    255 in 8-bit) above `max_share`. Score: that share."""
    import torch

    high = batch.finite >= 254.5 / 255
    clipped = ((batch.finite <= 0.5 / 255) | high).all(dim=3)
    stats = torch.stack([clipped.flatten(1).double().mean(1), high.all(dim=3).flatten(1).double().mean(1)], dim=1)
    found = []
    for share, white in stats.tolist():
        detail = f"{share:.1%} of pixels clipped ({white:.1%} white, {share - white:.1%} black)"
        found.append(Finding(share > max_share, share, ("saturated: " if share > max_share else "") + detail))
    return found


def flat(batch: ImageBatch, *, min_range: float = 0.06) -> list[Finding]:
    """Washed-out or near-constant image: the luma range between the 1st and 99th percentile below
    `min_range` (~15/255). Score: that range."""
    found = []
    for low, high in batch.luma_percentiles(1, 99).tolist():
        spread = high - low
        if spread < min_range:
            found.append(
                Finding(True, spread, f"flat image: luma spans only {spread * 255:.1f}/255 (1st-99th percentile)")
            )
        else:
            found.append(Finding(False, spread, f"luma spans {spread * 255:.1f}/255 (1st-99th percentile)"))
    return found


def stripe_noise(
    batch: ImageBatch, *, min_amplitude: float = 2 / 255, min_z: float = 6.5, max_period: int = 32
) -> list[Finding]:
    """Periodic row or column banding of any period from 2 to `max_period` pixels: flagged when the
    banding pattern's amplitude (its standard deviation, 0..1 scale) is at least `min_amplitude` and
    it is consistent across the image (z >= `min_z`). Score: the amplitude. The statistic is
    `evals.stripes`'."""
    import torch

    from evals.stripes import row_patterns

    luma = batch.luma
    patterns = {name: row_patterns(plane, max_period) for name, plane in (("row", luma), ("column", luma.mT))}
    labels = [(name, period) for name, (_, _, periods) in patterns.items() for period in periods]
    if not labels:
        return [Finding(False, 0.0, "image too small for the stripe test (8 pixels a side at least)")] * len(batch)
    amplitudes = torch.cat([a for a, _, _ in patterns.values()], dim=1)
    zs = torch.cat([z for _, z, _ in patterns.values()], dim=1)
    found = []
    for image_amplitudes, image_zs in zip(*torch.stack([amplitudes, zs]).tolist(), strict=True):  # one wait
        # Natural structure may be more consistent than the banding but faint: the banding is the
        # most consistent pattern among those large enough to see.
        candidates = [
            (a >= min_amplitude and zi >= min_z, zi, a, label)
            for a, zi, label in zip(image_amplitudes, image_zs, labels, strict=True)
        ]
        flagged, z, amplitude, (name, period) = max(candidates, key=lambda f: (f[0], f[1]))
        detail = f"{name} pattern of period {period}: amplitude {amplitude * 255:.2f}/255, z {z:.1f}"
        found.append(Finding(flagged, amplitude, ("stripes: " if flagged else "strongest ") + detail))
    return found


def checkerboard(batch: ImageBatch, *, min_amplitude: float = 1.5 / 255, min_z: float = 6.5) -> list[Finding]:
    """2-pixel checkerboard (the (-1)^(x+y) pattern of upsampling artifacts): its amplitude per
    16x16 block, consistent in sign across blocks (z >= `min_z`) and at least `min_amplitude`.
    Score: the mean amplitude."""
    import torch

    luma = batch.luma
    rows, cols = (s - s % 16 for s in luma.shape[1:])
    if rows < 16 or cols < 16:
        return [Finding(False, 0.0, "image smaller than one 16x16 block")] * len(batch)
    x = torch.arange(rows, device=luma.device)[:, None] + torch.arange(cols, device=luma.device)[None, :]
    sign = 1.0 - 2.0 * (x % 2).to(torch.float64)
    # Neighbour differences cancel smooth content; what survives in the (-1)^(x+y) direction is the pattern.
    shape = (len(batch), rows // 16, 16, cols // 16, 16)
    block = (luma[:, :rows, :cols] * sign).reshape(shape).mean(dim=(2, 4)).flatten(1)
    amplitude = block.mean(1)
    z = amplitude.abs() / (block.std(1, unbiased=False) / math.sqrt(block.shape[1]) + 1e-12)
    found = []
    for a, zi in torch.stack([amplitude, z], dim=1).tolist():
        flagged = abs(a) >= min_amplitude and zi >= min_z
        detail = f"amplitude {abs(a) * 255:.2f}/255, z {zi:.1f}"
        found.append(Finding(flagged, abs(a), ("checkerboard: " if flagged else "") + detail))
    return found


Detector = Callable[..., list[Finding]]

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
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def detect_batch(
    images: torch.Tensor,
    names: tuple[str, ...] | list[str],
    thresholds: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Finding]]:
    """Every named detector on each (H, W, 3) image of `images`, on their device."""
    batch = ImageBatch(images)
    thresholds = thresholds or {}
    per_detector = {name: DETECTORS[name](batch, **thresholds.get(name, {})) for name in names}
    return [{name: found[i] for name, found in per_detector.items()} for i in range(len(batch))]


def run_detectors(
    image: np.ndarray,
    names: tuple[str, ...] | list[str],
    thresholds: dict[str, dict[str, Any]] | None = None,
    device: str = "cpu",
) -> dict[str, Finding]:
    """Every named detector on one HWC image, on `device`."""
    import torch

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {image.shape}")
    return detect_batch(torch.as_tensor(image, device=device)[None], names, thresholds)[0]
