"""Which denoising steps a suite records for step error. No torch."""

from __future__ import annotations

ALL_STEPS = "all"
DEFAULT_RECORDED = 4
"""Recorded steps when a suite names none: a few, evenly spaced, keep the cost a fraction of a run."""


def recorded_steps(option: int | str | list[int] | tuple[int, ...] | None, total: int) -> tuple[int, ...]:
    """Step indices (0-based, ascending) to record out of `total` denoising steps.

    `all`: every step; N: N evenly spaced steps, the first and the last included; a list: those
    steps. Raises ValueError for a list naming a step outside 0..total-1 or an N below 1."""
    if option is None:
        option = DEFAULT_RECORDED
    if option == ALL_STEPS:
        return tuple(range(total))
    if isinstance(option, (list, tuple)):
        bad = [s for s in option if not 0 <= s < total]
        if bad or not option:
            raise ValueError(f"recorded steps {list(option)}: expected steps from 0 to {total - 1}")
        return tuple(sorted(set(option)))
    if not isinstance(option, int) or option < 1:
        raise ValueError(f"recorded steps {option!r}: expected 'all', a number of steps (>= 1) or a list of steps")
    count = min(option, total)
    if count == 1:
        return (total // 2,)
    return tuple(sorted({round(i * (total - 1) / (count - 1)) for i in range(count)}))
