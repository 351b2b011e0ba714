"""The report's box plots: statistics against matplotlib's, geometry read back from the SVG."""

from __future__ import annotations

import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
from matplotlib.cbook import boxplot_stats

from evals.reports.svg import box_plot, box_stats, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("seed", range(5))
def test_box_stats_match_matplotlib(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = [*rng.normal(30, 3, 25 + seed * 7), *[5.0, 60.0][: seed % 3]]  # with 0, 1 or 2 outliers
    ours = box_stats(values)
    (theirs,) = boxplot_stats(np.asarray(values))
    assert ours.q1 == pytest.approx(theirs["q1"]) and ours.q3 == pytest.approx(theirs["q3"])
    assert ours.median == pytest.approx(theirs["med"])
    assert ours.low_whisker == pytest.approx(theirs["whislo"]) and ours.high_whisker == pytest.approx(theirs["whishi"])
    assert sorted(ours.outliers) == pytest.approx(sorted(theirs["fliers"].tolist()))


@pytest.mark.parametrize(("low", "high"), [(0.81, 0.97), (18.2, 41.0), (-0.3, 0.02), (0.5, 0.5), (1e-4, 3e-4)])
def test_nice_ticks_span_the_data_in_round_steps(low: float, high: float) -> None:
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
    assert any(np.isclose(mantissa, m) for m in (1, 2, 5, 10))
    assert 3 <= len(ticks) <= 12


def read_boxes(svg: str) -> dict[str, dict[str, float | int]]:
    """Each box's quartiles, median and outliers, in data units, from the drawing and its axis."""
    root = ElementTree.fromstring(svg)
    ticks = [(float(t.get("x", "nan")), float(t.text or "nan")) for t in root.findall(f"{SVG}text")[1:-1]]
    (x0, v0), (x1, v1) = ticks[0], ticks[-1]

    def value(x: str | None) -> float:
        return v0 + (float(x or "nan") - x0) * (v1 - v0) / (x1 - x0)

    boxes = {}
    for group in root.findall(f"{SVG}g"):
        rect = group.find(f"{SVG}rect")
        median = group.find(f"{SVG}line[@class='median']")
        assert rect is not None and median is not None
        left = float(rect.get("x", "nan"))
        boxes[group.get("data-name", "")] = {
            "q1": value(rect.get("x")),
            "q3": value(str(left + float(rect.get("width", "nan")))),
            "median": value(median.get("x1")),
            "outliers": len(group.findall(f"{SVG}circle")),
        }
    return boxes


def test_the_drawing_puts_each_box_at_its_values() -> None:
    rng = np.random.default_rng(7)
    rows = [("fp8-a", [*rng.normal(30, 2, 40), 15.0]), ("fp8-b", list(rng.normal(26, 3, 40))), ("none", [])]
    boxes = read_boxes(box_plot("psnr per sample", "psnr", rows))
    assert set(boxes) == {"fp8-a", "fp8-b"}  # an empty row is left out
    for name, values in rows[:2]:
        stats = box_stats(values)
        drawn = boxes[name]
        # Coordinates are rounded to 0.01 px; the axis spans tens of dB over 400 px.
        assert drawn["q1"] == pytest.approx(stats.q1, abs=0.01)
        assert drawn["q3"] == pytest.approx(stats.q3, abs=0.01)
        assert drawn["median"] == pytest.approx(stats.median, abs=0.01)
        assert drawn["outliers"] == len(stats.outliers)
    assert boxes["fp8-a"]["outliers"] >= 1  # the 15 dB sample


def test_names_and_titles_are_escaped() -> None:
    svg = box_plot("a <b> & c", "x", [("<script>", [1.0, 2.0, 3.0])])
    root = ElementTree.fromstring(svg)  # well-formed despite the markup in the names
    assert "<script>" not in svg and root.find(f"{SVG}g[@data-name='<script>']") is not None


def test_the_report_plots_import_no_plotting_library() -> None:
    code = (
        "import sys\n"
        "from evals.reports.html import _distribution_plots\n"
        "from tests.test_records import record\n"
        "out = _distribution_plots([record('fp8', f's{i}', 30.0 + i) for i in range(8)])\n"
        "assert out.startswith('<svg'), out[:80]\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
