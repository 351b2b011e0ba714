"""The comparison table of a run: one row per candidate, the reference first, with the whole
pipeline's memory, seconds per image and step time from the suite's `bench` (bench.json), the mean of
each metric the run scored (summary.json) and each candidate's verdict (verdict.json). Reads files,
loads no model. A figure the run did not measure is None, shown as a dash: never a zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.reports.render import (
    NOISE_FLOOR,
    _fmt,
    candidate_status,
    load_run,
    markdown_table,
    ordered_candidates,
    status_counts,
)

REFERENCE = "reference"
"""The reference's name in bench.json, and its row's."""

BENCH_COLUMNS = (
    ("pipeline_weights_gib", "pipeline GiB"),
    ("pipeline_peak_gib", "pipeline peak GiB"),
    ("pipeline_s_per_image", "s/image"),
    ("step_ms", "step ms"),
)
"""bench.json result keys shown, and their column titles."""

GUARD_COLUMNS = (("retry_rate", "retry rate"), ("failed_after_retry", "failed after retry"))
"""A guarded candidate's figures (summary.json), shown when the run guarded any candidate."""

OUTCOME = {"fail": "FAILED", "warn": "PASSED with warnings", "pass": "PASSED"}

DASH = "-"


@dataclass(frozen=True)
class ComparisonRow:
    name: str
    role: str
    """`reference`, `candidate` or `noise floor`."""
    bench: dict[str, float | None]
    """BENCH_COLUMNS key -> the figure, None where not measured."""
    metric_means: dict[str, float | None]
    """Metric -> its mean over the candidate's samples, None where not scored (the reference)."""
    outcome: str | None
    """`pass`, `warn` or `fail` for a gated candidate; None for the reference and the noise floor."""
    guard: dict[str, float | None]
    """GUARD_COLUMNS key -> the figure, None where the candidate is not guarded."""


def _number(value: Any) -> float | None:
    """A figure as read from a run file: a number, or None (absent, null or not a number)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def bench_figures(run_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, float | None]]]:
    """(the suite's bench settings, variant name -> BENCH_COLUMNS figures) from bench.json; empty
    when the suite did not bench."""
    path = run_dir / "bench.json"
    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text())
    figures = {
        str(r.get("name")): {key: _number(r.get(key)) for key, _ in BENCH_COLUMNS}
        for r in data.get("results", [])
        if isinstance(r, dict)
    }
    settings = data.get("settings")
    return (settings if isinstance(settings, dict) else {}), figures


def comparison_rows(
    run: dict[str, Any], summary: dict[str, Any], verdict: dict[str, Any], run_dir: Path
) -> tuple[list[str], list[ComparisonRow]]:
    """(the metrics scored, sorted; the rows: reference, the gated candidates in report order, then
    the noise floor)."""
    policies = summary.get("policies", {})
    metrics = sorted({m for p in policies.values() for m in p.get("metrics", {})})
    _, bench = bench_figures(run_dir)
    floors = [p["name"] for p in run["policies"] if p.get("noise_floor")]
    floors += [NOISE_FLOOR] if NOISE_FLOOR in policies and NOISE_FLOOR not in floors else []
    gated = ordered_candidates(verdict, [p["name"] for p in run["policies"] if p["name"] not in floors])
    counts = status_counts(verdict, gated)
    unmeasured = dict.fromkeys((key for key, _ in BENCH_COLUMNS), None)

    def row(name: str, role: str) -> ComparisonRow:
        scored = policies.get(name, {}).get("metrics", {})
        means = {m: _number(scored[m].get("mean")) if m in scored else None for m in metrics}
        outcome = candidate_status(counts[name]) if role == "candidate" else None
        guarded = policies.get(name, {}).get("guard", {})
        guard = {key: _number(guarded.get(key)) for key, _ in GUARD_COLUMNS}
        return ComparisonRow(name, role, bench.get(name, unmeasured), means, outcome, guard)

    unguarded = dict.fromkeys((key for key, _ in GUARD_COLUMNS), None)
    reference_bench = bench.get(REFERENCE, unmeasured)
    rows = [ComparisonRow(REFERENCE, REFERENCE, reference_bench, dict.fromkeys(metrics), None, unguarded)]
    rows += [row(name, "candidate") for name in gated]
    rows += [row(name, "noise floor") for name in floors]
    return metrics, rows


def guard_columns(rows: list[ComparisonRow]) -> tuple[tuple[str, str], ...]:
    """GUARD_COLUMNS when any row was guarded, else none (a run without a guard shows no such column)."""
    return GUARD_COLUMNS if any(v is not None for row in rows for v in row.guard.values()) else ()


def comparison_header(metrics: list[str], guard: tuple[tuple[str, str], ...] = ()) -> list[str]:
    return [
        "candidate",
        *(title for _, title in BENCH_COLUMNS),
        *(f"{m} mean" for m in metrics),
        *(title for _, title in guard),
        "verdict",
    ]


def verdict_text(row: ComparisonRow) -> str:
    if row.outcome is not None:
        return OUTCOME[row.outcome]
    return "not gated (the reference against itself)" if row.role == "noise floor" else DASH


def cell(value: float | None) -> str:
    return DASH if value is None else _fmt(value)


def comparison_cells(row: ComparisonRow, metrics: list[str], guard: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """One row as text: figures to four significant digits, a dash where nothing was measured."""
    return [
        row.name,
        *(cell(row.bench[key]) for key, _ in BENCH_COLUMNS),
        *(cell(row.metric_means[m]) for m in metrics),
        *(cell(row.guard[key]) for key, _ in guard),
        verdict_text(row),
    ]


def bench_note(run_dir: Path, reference_dtype: str) -> str:
    """What the table's figures are: the bench's settings, or that the suite did not bench."""
    settings, figures = bench_figures(run_dir)
    if not figures:
        return (
            f"Reference {reference_dtype}. The suite has no `bench` section: memory and time are not measured "
            "(add `bench:` to the suite to measure them)."
        )
    # evals.bench.BenchSetup's defaults (this module imports no torch)
    resolution, batch = settings.get("resolution", 1024), settings.get("batch", 2)
    steps = settings.get("steps", 28)
    images = max(batch // 2, 1) if isinstance(batch, int) else "?"
    return (
        f"Reference {reference_dtype}. Measured after the run at {resolution}x{resolution}: step ms is the "
        f"median transformer step at batch {batch}; s/image one warm {steps}-step pipeline call of {images} "
        "image(s) (text encoders, every step, VAE) divided by its images; pipeline GiB every component's weights; "
        "pipeline peak GiB the peak GPU memory of that call (GPU only). A dash: not measured."
    )


def comparison_markdown(run_dir: Path) -> str:
    """The `## Comparison` section of summary.md."""
    run, summary, verdict = load_run(run_dir)
    metrics, rows = comparison_rows(run, summary, verdict, run_dir)
    guard = guard_columns(rows)
    table = markdown_table([comparison_cells(r, metrics, guard) for r in rows], comparison_header(metrics, guard))
    return "\n".join(["## Comparison", "", bench_note(run_dir, run["reference_dtype"]), "", table, ""])
