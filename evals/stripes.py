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
    """(planes, rows, cols) `luma` less its Gaussian blur along rows."""
    return luma - _blur_matrix(luma.shape[1], sigma, str(luma.device)) @ luma


def _group_profiles(residual: torch.Tensor) -> torch.Tensor:
    """(planes, groups, rows): the median across each group's columns; groups as np.array_split makes them."""
    planes, rows, cols = residual.shape
    groups = max(cols // GROUP_COLUMNS, 1)
    size, extra = divmod(cols, groups)  # the first `extra` groups hold one column more
    parts = []
    if extra:
        wide = residual[:, :, : extra * (size + 1)].reshape(planes, rows, extra, size + 1)
        parts.append(_median(wide, 3))
    narrow = residual[:, :, extra * (size + 1) :].reshape(planes, rows, groups - extra, size)
    parts.append(_median(narrow, 3))
    return torch.cat(parts, dim=2).transpose(1, 2)


FULL_CYCLES = 16  # periods in the image from which z counts in full (32 px at 512 px)
HARMONICS = 3  # the first harmonics hold 95% of a square wave's energy, all of a sinusoid's


def _harmonic_z(profiles: torch.Tensor, periods: list[int]) -> torch.Tensor:
    """(planes, periods): for each period, the largest robust z of the groups' Fourier coefficients
    at harmonics h/period, h = 1..3, each over the whole periods the profile holds; all periods of a
    band in one matrix product and one sort (on a GPU, one small kernel per period and harmonic was
    the cost)."""
    planes, groups, rows = profiles.shape
    x = torch.arange(rows, dtype=profiles.dtype, device=profiles.device)
    pairs = [(p, h) for p in periods for h in range(1, min(HARMONICS, p // 2) + 1)]
    period = torch.tensor([p for p, _ in pairs], dtype=profiles.dtype, device=profiles.device)
    harmonic = torch.tensor([h for _, h in pairs], dtype=profiles.dtype, device=profiles.device)
    usable = torch.floor(rows / period) * period
    angle = x[:, None] * (2 * math.pi * harmonic / period)[None, :]
    inside = (x[:, None] < usable[None, :]).to(profiles.dtype) * (2 / usable)[None, :]
    nyquist = 2 * harmonic == period  # the sine term is zero there: the cosine's deviations stand in
    sine = torch.where(nyquist[None, :], torch.cos(angle), torch.sin(angle))
    basis = torch.cat([torch.cos(angle) * inside, sine * inside], dim=1)
    coefficients = profiles @ basis  # (planes, groups, 2K)
    shared = _median(coefficients, 1)
    count = len(pairs)
    norm = torch.hypot(shared[:, :count], torch.where(nyquist, 0.0, shared[:, count:]))
    deviations = (coefficients - shared[:, None, :]).abs()
    pooled = torch.cat([deviations[..., :count], deviations[..., count:]], dim=1)  # (planes, 2 groups, K)
    spread = 1.4826 * _median(pooled, 1) + 1e-12
    z = norm / spread * math.sqrt(groups)
    per_period = torch.full((planes, len(periods), HARMONICS), -1.0, dtype=z.dtype, device=z.device)
    index = {p: i for i, p in enumerate(periods)}
    rows_of = torch.tensor([index[p] for p, _ in pairs], device=z.device)
    cols_of = torch.tensor([h - 1 for _, h in pairs], device=z.device)
    per_period[:, rows_of, cols_of] = z
    return per_period.max(dim=2).values


def row_patterns(luma: torch.Tensor, max_period: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The periodic row pattern of each (rows, cols) plane of `luma` (rows along axis 1) at every
    period from 2 to `max_period` (at most a quarter of the rows): amplitudes and z, both
    (planes, periods) on `luma`'s device, and the periods."""
    planes, rows, _ = luma.shape
    periods: list[int] = []
    amplitudes, zs = [], []
    for low, high, sigma in STRIPE_BANDS:
        top = min(high, max_period, rows // 4)
        if low > top:
            break
        profiles = _group_profiles(_high_pass(luma, sigma))
        groups = profiles.shape[1]
        band = list(range(low, top + 1))
        for period in band:
            usable = (rows // period) * period
            folded = _median(profiles[..., :usable].reshape(planes, groups, -1, period), 2)
            pattern = _median(folded - folded.mean(dim=2, keepdim=True), 1)
            amplitudes.append(pattern.std(dim=1, unbiased=False))
        # Over few periods natural structure of that scale looks periodic too: z is discounted.
        discount = [math.sqrt(min(rows / p / FULL_CYCLES, 1.0)) for p in band]
        zs.append(_harmonic_z(profiles, band) * torch.tensor(discount, dtype=luma.dtype, device=luma.device))
        periods += band
    if not periods:
        empty = luma.new_zeros((planes, 0))
        return empty, empty, []
    return torch.stack(amplitudes, dim=1), torch.cat(zs, dim=1), periods
