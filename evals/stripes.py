"""The statistic behind the `stripe_noise` detector, in torch so that it runs on the run's GPU
(on a CPU it is as fast as the NumPy/SciPy version it replaced).

Banding adds the same offset to every pixel of a row; natural content differs from column to
column. So the columns are split into groups of 4 and each group's row profile (median across its
columns of the high-passed image) is tested at every period:
- amplitude: the profile folded modulo the period (median per phase), the groups' median pattern,
  its standard deviation. Any periodic shape counts, at its full size.
- z: how consistently the groups share the pattern's first harmonics (Fourier coefficients at
  1/p, 2/p, 3/p): the groups' median coefficient against the MAD of their coefficients, a robust
  t-statistic. A harmonic gathers a band's energy from every period of it, where folding spreads
  the texture of p phases over the pattern: on grass and gravel this doubles z at period 32, and
  pure noise stays below 6.5 with odds of about 1e-7 per image.
Medians, not means: a few groups crossing an edge or a texture must not hide a pattern the others
share, or fake one.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

# Each band of periods is tested after removing structure coarser than it (Gaussian sigma ~ p/2).
STRIPE_BANDS = ((2, 3, 1.0), (4, 7, 2.0), (8, 15, 4.0), (16, 31, 8.0), (32, 63, 16.0), (64, 128, 32.0))
GROUP_COLUMNS = 4  # columns per group: 64 groups at 256 px, 128 at 512


def _median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """NumPy's median (the mean of the two middle values for an even count); torch's takes the lower."""
    ordered = x.sort(dim=dim).values
    n = x.shape[dim]
    upper = ordered.select(dim, n // 2)
    return upper if n % 2 else (upper + ordered.select(dim, n // 2 - 1)) / 2


@functools.lru_cache(maxsize=32)
def _blur_matrix(rows: int, sigma: float, device: str) -> torch.Tensor:
    """(rows, rows) matrix of scipy's gaussian_filter1d(mode='reflect', truncate=4) along axis 0:
    one matrix product blurs every column (float64 convolutions are slow on CPUs)."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    # scipy's 'reflect' repeats the edge sample (d c b a | a b c d); wider reaches reflect again.
    source = (torch.arange(rows).unsqueeze(1) + torch.arange(-radius, radius + 1).unsqueeze(0)) % (2 * rows)
    source = torch.where(source >= rows, 2 * rows - 1 - source, source)
    matrix = torch.zeros(rows, rows, dtype=torch.float64)
    matrix.scatter_add_(1, source, weights.expand(rows, -1).contiguous())
    return matrix.to(device)


def _high_pass(luma: torch.Tensor, sigma: float) -> torch.Tensor:
    """`luma` less its Gaussian blur along rows (axis 0)."""
    return luma - _blur_matrix(luma.shape[0], sigma, str(luma.device)) @ luma


def _group_profiles(residual: torch.Tensor) -> torch.Tensor:
    """(groups, rows): the median across each group's columns; groups as np.array_split makes them."""
    rows, cols = residual.shape
    groups = max(cols // GROUP_COLUMNS, 1)
    size, extra = divmod(cols, groups)  # the first `extra` groups hold one column more
    parts = []
    if extra:
        wide = residual[:, : extra * (size + 1)].reshape(rows, extra, size + 1)
        parts.append(_median(wide, 2))
    narrow = residual[:, extra * (size + 1) :].reshape(rows, groups - extra, size)
    parts.append(_median(narrow, 2))
    return torch.cat(parts, dim=1).T


FULL_CYCLES = 16  # periods in the image from which z counts in full (32 px at 512 px)
HARMONICS = 3  # the first harmonics hold 95% of a square wave's energy, all of a sinusoid's


def _harmonic_z(profiles: torch.Tensor, period: int) -> float:
    """Largest robust z of the groups' Fourier coefficients at harmonics h/period, h = 1..3."""
    groups, usable = profiles.shape
    phase = torch.arange(usable, dtype=profiles.dtype, device=profiles.device) * (2 * math.pi / period)
    best = 0.0
    for harmonic in range(1, min(HARMONICS, period // 2) + 1):
        parts = [profiles @ torch.cos(harmonic * phase)]
        if 2 * harmonic != period:  # at the Nyquist frequency the sine term is zero
            parts.append(profiles @ torch.sin(harmonic * phase))
        coefficients = torch.stack(parts) * (2 / usable)  # (1 or 2, groups)
        shared = _median(coefficients, 1)
        spread = 1.4826 * _median((coefficients - shared.unsqueeze(1)).abs().flatten(), 0) + 1e-12
        best = max(best, float(shared.norm() / spread) * math.sqrt(groups))
    return best


def row_patterns(luma: np.ndarray, max_period: int, device: str = "cpu") -> list[tuple[float, float, int]]:
    """(amplitude, z, period) of the periodic row pattern of `luma` (rows along axis 0) at every
    period from 2 to `max_period` (at most a quarter of the rows)."""
    plane = torch.as_tensor(luma, dtype=torch.float64, device=device)
    rows = plane.shape[0]
    found = []
    for low, high, sigma in STRIPE_BANDS:
        top = min(high, max_period, rows // 4)
        if low > top:
            break
        profiles = _group_profiles(_high_pass(plane, sigma))
        groups = profiles.shape[0]
        for period in range(low, top + 1):
            usable = (rows // period) * period
            folded = _median(profiles[:, :usable].reshape(groups, -1, period), 1)
            pattern = _median(folded - folded.mean(dim=1, keepdim=True), 0)
            # Over few periods natural structure of that scale looks periodic too: z is discounted.
            z = _harmonic_z(profiles[:, :usable], period) * math.sqrt(min(rows / period / FULL_CYCLES, 1.0))
            found.append((float(pattern.std(unbiased=False)), z, period))
    return found
