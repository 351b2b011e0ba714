"""The statistic behind the `stripe_noise` detector, in torch so that it runs on the run's GPU
(on a CPU it is as fast as the NumPy/SciPy version it replaced, and gives the same numbers).

Banding adds the same offset to every pixel of a row; natural content differs from column to
column. So the columns are split into groups of 4, each group's row profile (median across its
columns of the high-passed image) is folded modulo the period (median per phase), and the pattern
the groups share (their median) is compared with how much they disagree (the MAD): z is a robust
t-statistic. Medians, not means: a few groups crossing an edge or a texture must not hide a pattern
the others share, or fake one.
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


def strongest_row_pattern(luma: np.ndarray, max_period: int, device: str = "cpu") -> tuple[float, float, int]:
    """(amplitude, z, period) of the strongest periodic row pattern of `luma` (rows along axis 0)."""
    plane = torch.as_tensor(luma, dtype=torch.float64, device=device)
    rows = plane.shape[0]
    best = (0.0, 0.0, 0)
    for low, high, sigma in STRIPE_BANDS:
        top = min(high, max_period, rows // 4)
        if low > top:
            break
        profiles = _group_profiles(_high_pass(plane, sigma))
        groups = profiles.shape[0]
        for period in range(low, top + 1):
            usable = (rows // period) * period
            folded = _median(profiles[:, :usable].reshape(groups, -1, period), 1)
            folded = folded - folded.mean(dim=1, keepdim=True)
            pattern = _median(folded, 0)
            spread = 1.4826 * _median((folded - pattern).abs().flatten(), 0) + 1e-12
            amplitude = pattern.std(unbiased=False)
            z = amplitude / (spread / math.sqrt(groups))
            z_value = float(z)
            if z_value > best[1]:
                best = (float(amplitude), z_value, period)
    return best
