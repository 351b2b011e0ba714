"""Box plots as inline SVG for the HTML report: drawn as text, so writing a report imports no
plotting library (pyplot's import alone took most of a second of every run's end).

The boxes follow matplotlib's `boxplot` (Tukey's): quartiles by linear interpolation, whiskers at
the most extreme values within 1.5 IQR of the box, values beyond them drawn as outliers.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

PLOT_WIDTH = 400
ROW = 36
CHAR = 7.2  # about the width of one 12 px sans-serif character: the names' margin is made of it
TOP, BOTTOM, RIGHT = 28, 42, 16


@dataclass(frozen=True)
class BoxStats:
    low_whisker: float
    q1: float
    median: float
    q3: float
    high_whisker: float
    outliers: tuple[float, ...]


def box_stats(values: list[float]) -> BoxStats:
    data = np.asarray(values, dtype=np.float64)
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    reach = 1.5 * (q3 - q1)
    inside = data[(data >= q1 - reach) & (data <= q3 + reach)]
    outside = data[(data < q1 - reach) | (data > q3 + reach)]
    return BoxStats(
        float(inside.min()), float(q1), float(median), float(q3), float(inside.max()), tuple(outside.tolist())
    )


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) spanning [low, high]."""
    if high <= low:  # one value: a span around it
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    steps = math.ceil((high - first) / step - 1e-9)  # no extra tick for a rounding error
    ticks = [first + i * step for i in range(steps + 1)]
    return [round(t, 12) for t in ticks]


def _number(value: float) -> str:
    return f"{value:.6g}"


def box_plot(title: str, axis_label: str, rows: list[tuple[str, list[float]]]) -> str:
    """One horizontal box per (name, values) row, empty rows left out; an <svg> element."""
    rows = [(name, values) for name, values in rows if values]
    stats = [box_stats(values) for _, values in rows]
    ticks = nice_ticks(min(min(v) for _, v in rows), max(max(v) for _, v in rows))
    lo, hi = ticks[0], ticks[-1]
    margin = round(max(60, CHAR * max(len(name) for name, _ in rows) + 16))  # left margin: the names
    width, height = margin + PLOT_WIDTH + RIGHT, TOP + ROW * len(rows) + BOTTOM

    def x(value: float) -> float:
        return round(margin + (value - lo) / (hi - lo) * PLOT_WIDTH, 2)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12" role="img">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
    ]
    axis_y = TOP + ROW * len(rows)
    parts.append(f'<line x1="{margin}" y1="{axis_y}" x2="{width - RIGHT}" y2="{axis_y}" stroke="#444"/>')
    for tick in ticks:
        parts.append(f'<line x1="{x(tick)}" y1="{TOP}" x2="{x(tick)}" y2="{axis_y + 4}" stroke="#ddd"/>')
        parts.append(f'<text x="{x(tick)}" y="{axis_y + 16}" text-anchor="middle">{_number(tick)}</text>')
    label_x = margin + PLOT_WIDTH / 2
    parts.append(f'<text x="{label_x}" y="{height - 6}" text-anchor="middle">{html.escape(axis_label)}</text>')
    for i, ((name, _), s) in enumerate(zip(rows, stats, strict=True)):
        mid = TOP + ROW * i + ROW / 2
        top, bottom = mid - ROW * 0.3, mid + ROW * 0.3
        parts += [
            f'<g class="box" data-name="{html.escape(name)}">',
            f'<text x="{margin - 8}" y="{mid + 4}" text-anchor="end">{html.escape(name)}</text>',
            f'<line class="whisker" x1="{x(s.low_whisker)}" y1="{mid}" x2="{x(s.q1)}" y2="{mid}" stroke="#222"/>',
            f'<line class="whisker" x1="{x(s.q3)}" y1="{mid}" x2="{x(s.high_whisker)}" y2="{mid}" stroke="#222"/>',
            *(
                f'<line x1="{x(v)}" y1="{mid - ROW * 0.15}" x2="{x(v)}" y2="{mid + ROW * 0.15}" stroke="#222"/>'
                for v in (s.low_whisker, s.high_whisker)
            ),
            f'<rect x="{x(s.q1)}" y="{top}" width="{round(x(s.q3) - x(s.q1), 2)}" height="{bottom - top}" '
            'fill="#dfe8f5" stroke="#222"/>',
            f'<line class="median" x1="{x(s.median)}" y1="{top}" x2="{x(s.median)}" y2="{bottom}" '
            'stroke="#d2691e" stroke-width="2"/>',
            *(f'<circle class="outlier" cx="{x(v)}" cy="{mid}" r="3" fill="none" stroke="#222"/>' for v in s.outliers),
            f"<title>{html.escape(name)}: median {_number(s.median)}, "
            f"quartiles {_number(s.q1)} to {_number(s.q3)}</title>",
            "</g>",
        ]
    parts.append("</svg>")
    return "\n".join(parts)
