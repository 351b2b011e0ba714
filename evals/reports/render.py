"""Render a run directory: the gate table (terminal) and summary.md. Reads files, loads no model.

Every report shows what blocks the run first: candidates with failed gates (most failures first), then
those with warnings, then the passing ones; within a candidate, failed gates, warnings, gates not
evaluated, then passed ones. Ties go by name, so the same run always renders the same way.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4g}"


def threshold_text(r: dict[str, Any]) -> str:
    """`>= 40`, or `max drop 0.5 vs baseline 52.1` for a regression gate; tags and warn marked."""
    text = f"{r['op']} {r['threshold']:g}"
    if r.get("baseline_gate"):
        limit = r.get("baseline_limit") or "drop"  # max_drop or max_rel_drop (runs before 2026-11-29: drop)
        text = f"{limit.replace('_', ' ')} {r['threshold']:g} vs baseline"
        if r.get("baseline") is not None:
            text += f" {_fmt(r['baseline'])}"
    suite = r.get("suite_threshold")
    if r.get("jitter") is not None and suite is not None and suite != r["threshold"]:
        text += f" (measured jitter {_fmt(r['jitter'])}; the suite's {suite:g} sat inside it)"
    if r.get("tags"):
        text += f" [tags {','.join(r['tags'])}]"
    if r.get("severity") == "warn":
        text += " (warn)"
    return text


STATUS = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "not evaluated": "SKIP"}

GATE_RANK = {"fail": 0, "warn": 1, "not evaluated": 2, "pass": 3}
"""Where a gate result's status sorts: what blocks the run first, what passed last."""


def status_counts(verdict: dict[str, Any], names: Iterable[str] = ()) -> dict[str, Counter[str]]:
    """Candidate -> gate status -> how many results have it; `names` are listed even without results."""
    counts: dict[str, Counter[str]] = {name: Counter() for name in names}
    for r in verdict["results"]:
        counts.setdefault(r["policy"], Counter())[r["status"]] += 1
    return counts


def candidate_status(counts: Counter[str]) -> str:
    """`fail` with a failed gate, `warn` with a failed warn gate only, else `pass`."""
    return "fail" if counts["fail"] else ("warn" if counts["warn"] else "pass")


def ordered_candidates(verdict: dict[str, Any], names: Iterable[str] = ()) -> list[str]:
    """The candidates of `verdict` (and `names`): failing first, most failed gates first, then those
    with warnings, then passing ones (those with gates not evaluated before the clean ones); ties by name."""
    counts = status_counts(verdict, names)

    def key(name: str) -> tuple[int, int, int, int, str]:
        c = counts[name]
        return (GATE_RANK[candidate_status(c)], -c["fail"], -c["warn"], -c["not evaluated"], name)

    return sorted(counts, key=key)


def ordered_results(verdict: dict[str, Any], by_candidate: bool = False) -> list[dict[str, Any]]:
    """The gate results, failed ones first. `by_candidate`: grouped by candidate in `ordered_candidates`
    order, each group failed first; otherwise every failed gate on top whatever its candidate (the flat
    tables, where a second failing candidate's failures must not hide below the first one's passes)."""
    rank = {name: i for i, name in enumerate(ordered_candidates(verdict))}

    def key(r: dict[str, Any]) -> tuple[int, int, str]:
        status, candidate = GATE_RANK[r["status"]], rank[r["policy"]]
        return (candidate, status, r["gate"]) if by_candidate else (status, candidate, r["gate"])

    return sorted(verdict["results"], key=key)


def explains(r: dict[str, Any]) -> bool:
    """Whether a result's reason says more than its numbers: why it was not evaluated, why the value is
    NaN, or the baseline and drop of a regression gate."""
    actual = r["actual"]
    finite = isinstance(actual, int | float) and math.isfinite(actual)
    baseline_gate = r.get("baseline_gate", "vs baseline" in r["gate"])  # runs before 'baseline_gate' was written
    return bool(r["reason"]) and (r["status"] == "not evaluated" or bool(baseline_gate) or not finite)


def not_evaluated(verdict: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """(gate, reason) -> the candidates it was not evaluated for, in `ordered_candidates` order: a
    missing baseline usually skips the same gate on every candidate, and one line says so."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in ordered_results(verdict, by_candidate=True):
        if r["status"] == "not evaluated":
            groups.setdefault((r["gate"], r["reason"]), []).append(r["policy"])
    return groups


def result_text(r: dict[str, Any]) -> str:
    """One gate result as a line of text: `psnr mean >= 30: actual 27.1 vs threshold >= 30 (why)`."""
    text = f"{r['gate']}: actual {_fmt(r['actual'])} vs threshold {threshold_text(r)}"
    return f"{text} ({r['reason']})" if explains(r) else text


NOISE_FLOOR = "noise-floor"


def noise_floor_value(r: dict[str, Any], summary: dict[str, Any]) -> str:
    """The noise floor's value of a gate's statistic (the reference against itself), or empty."""
    floor = summary.get("policies", {}).get(NOISE_FLOOR)
    if not floor or "vs baseline" in r["gate"]:
        return ""
    table = floor["metrics"] if r["subject"] in floor["metrics"] else floor["detectors"]
    value = table.get(r["subject"], {}).get(r["stat"])
    return "" if value is None else _fmt(value)


def gate_rows(verdict: dict[str, Any], summary: dict[str, Any] | None = None) -> list[list[str]]:
    """One row per gate result; with a noise floor in `summary`, its value of the same statistic."""
    rows = []
    for r in ordered_results(verdict):
        row = [r["policy"], r["subject"], r["stat"], threshold_text(r), _fmt(r["actual"]), status_text(r)]
        if summary and NOISE_FLOOR in summary.get("policies", {}):
            row.insert(5, noise_floor_value(r, summary))
        rows.append(row)
    return rows


def status_text(result: dict[str, Any]) -> str:
    """PASS/FAIL/WARN/SKIP, and why when the gate could not be evaluated (no baseline, a metric
    whose weights are missing): the table itself says it, not only verdict.json."""
    text = STATUS[result["status"]]
    unevaluated = result.get("baseline_gate") and result.get("baseline") is None
    actual = result.get("actual")
    unevaluated = unevaluated or actual is None or (isinstance(actual, float) and math.isnan(actual))
    if result["status"] != "pass" and unevaluated and result.get("reason"):
        why = result["reason"].removeprefix("not evaluated: ")
        text += f" ({why.split(':')[0].split(';')[0]})"
    return text


HEADER = ["policy", "gate", "stat", "threshold", "actual", "result"]


def gate_header(summary: dict[str, Any] | None) -> list[str]:
    if summary and NOISE_FLOOR in summary.get("policies", {}):
        return [*HEADER[:5], "noise floor", HEADER[5]]
    return HEADER


def text_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(rows: list[list[str]], header: list[str] = HEADER) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    read = lambda name: json.loads((run_dir / name).read_text())  # noqa: E731
    return read("run.json"), read("summary.json"), read("verdict.json")


def gate_table_text(run_dir: Path) -> str:
    _, summary, verdict = load_run(run_dir)
    status = "PASSED" if verdict["passed"] else "FAILED"
    table = text_table(gate_rows(verdict, summary), gate_header(summary))
    # The table's top may have scrolled away: what failed is repeated above the verdict, a line a candidate.
    results = ordered_results(verdict, by_candidate=True)
    failed = [
        f"failed: {name}: {', '.join(r['gate'] for r in results if r['policy'] == name and r['status'] == 'fail')}"
        for name in ordered_candidates(verdict)
        if any(r["policy"] == name and r["status"] == "fail" for r in results)
    ]
    return "\n".join([table, "", *failed, f"verdict: {status}  ({run_dir})"])


def read_located(run_dir: Path) -> dict[str, dict[str, Any]]:
    """locate.json: failed candidate -> the part its step error jumps at (empty: none named)."""
    from evals.step_error.locate import LOCATE_FILE

    path = run_dir / LOCATE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("text"), str)}


def coverage_lines(run: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """What was and was not generated, in words: the image subset a suite asked for, screening, and
    each candidate that stopped short of its images (--fail-fast). Empty when every candidate has
    an image of every sample and nothing was screened."""
    total = run.get("samples", "?")
    images = run.get("images") or {}
    with_images = images.get("samples")
    expected = len(with_images) if isinstance(with_images, list) else total
    lines = []
    if images.get("requested") is not None and expected != total:
        lines.append(
            f"Candidate images were generated for {expected} of {total} samples only (suite `images: "
            f"{{sample: {images['requested']}}}`: whole batches, chosen the same way on every run); the other "
            f"{total - expected if isinstance(total, int) else '?'} samples have no images. Image metrics, "
            f"detectors and their gates judge those {expected} samples."
        )
    if run.get("screened"):
        lines.append(f"Step error was screened on all {total} samples before any candidate image was generated.")
    policies = summary.get("policies", {}) if isinstance(summary.get("policies"), dict) else {}
    for p in run.get("policies", []):
        s = policies.get(p.get("name"), {})
        n = s.get("n", 0) if isinstance(s, dict) else 0
        if isinstance(expected, int) and n < expected:
            screened = s.get("screened", 0) if isinstance(s, dict) else 0
            what = "no images" if n == 0 else f"images of {n} of {expected} samples"
            where = f", step error of {screened}" if run.get("screened") else ""
            lines.append(f"{p['name']}: {what}{where} (stopped by --fail-fast: see the notes).")
    return lines


REVIEW_RATES = (
    ("indistinguishable_rate", "indistinguishable"),
    ("cant_tell_rate", "can't tell"),
    ("pick_accuracy", "pick accuracy"),
)


def read_review(run_dir: Path) -> dict[str, Any]:
    """review.json (`evals review --summary`): votes and rates per candidate; {} before any review."""
    try:
        data = json.loads((run_dir / "review.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("candidates"), dict) else {}


def rate_text(rate: dict[str, Any]) -> str:
    """`0.93 [0.88, 0.96] (93 of 100)`: a rate, its 95% Wilson interval and its counts."""
    if rate.get("value") is None:
        return f"undefined (0 of {rate.get('total', 0)})"
    return f"{rate['value']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}] ({rate['successes']} of {rate['total']})"


def review_lines(run_dir: Path) -> list[str]:
    """The blind A/B review in words, one line per candidate and reviewer; empty before any vote."""
    review = read_review(run_dir)
    lines = []
    for name, figures in review.get("candidates", {}).items():
        overall = figures["overall"]
        rates = "; ".join(f"{label} {rate_text(overall[key])}" for key, label in REVIEW_RATES)
        lines.append(f"**{name}**, {overall['votes']} votes: {rates}")
        for reviewer, mine in figures.get("by_reviewer", {}).items():
            lines.append(
                f"  - {reviewer}, {mine['votes']} votes: indistinguishable {rate_text(mine['indistinguishable_rate'])}"
            )
        told = [f"{t['sample_id']} ({t['correct']} of {t['votes']})" for t in figures.get("told_apart", [])]
        if told:
            lines.append(f"  - told apart most: {', '.join(told)}")
    return lines


def write_summary_markdown(run_dir: Path, comparison: str = "") -> Path:
    """summary.md; `comparison`: the comparison table's section (`evals.reports.comparison`, which
    reads this module), placed before the gate table."""
    run, summary, verdict = load_run(run_dir)
    status = "✅ passed" if verdict["passed"] else "❌ failed"
    lines = [
        f"# {run['suite']['name']}: {status}",
        "",
        f"Model `{run['model']['source']}`, reference {run['reference_dtype']}, "
        f"{run['samples']} samples, device {run['environment']['device']}.",
        "",
    ]
    coverage = coverage_lines(run, summary)
    if coverage:
        lines += ["## What was generated", "", *(f"- {line}" for line in coverage), ""]
    for title, wanted in (("Failed gates", "fail"), ("Warnings", "warn")):
        chosen = [r for r in ordered_results(verdict) if r["status"] == wanted]
        if chosen:
            lines += [f"## {title}", "", *(f"- **{r['policy']}** {result_text(r)}" for r in chosen), ""]
    reviewed = review_lines(run_dir)
    if reviewed:
        lines += [
            "## Blind A/B review (95% Wilson intervals)",
            "",
            *(f"- {line}" if not line.startswith("  ") else line for line in reviewed),
            "",
        ]
    located = read_located(run_dir)
    if located:
        lines += ["## Where step error departs from the baseline", ""]
        lines += [f"- **{name}**: {found['text']}" for name, found in located.items()]
        lines.append("")
    skipped = not_evaluated(verdict)
    if skipped:
        lines += ["## Not evaluated", ""]
        lines += [f"- {gate} for {', '.join(names)}: {reason}" for (gate, reason), names in skipped.items()]
        lines.append("")
    if comparison:
        lines += [comparison]
    lines += [
        "## Gates",
        "",
        markdown_table(gate_rows(verdict, summary), gate_header(summary)),
        "",
        "## Candidates",
        "",
    ]
    policies = {p["name"]: p for p in run["policies"]}
    floors = [name for name, p in policies.items() if p.get("noise_floor")]
    gated = [name for name in policies if name not in floors]
    for name in [*(n for n in ordered_candidates(verdict, gated) if n in policies), *floors]:
        s = summary["policies"].get(name, {})
        metrics = ", ".join(f"{m} mean {_fmt(v['mean'])}" for m, v in s.get("metrics", {}).items())
        flagged = ", ".join(f"{d} {int(v['count'])}" for d, v in s.get("detectors", {}).items())
        bench = s.get("bench") or {}
        timing = (
            f"; step {bench['step_ms']:.1f} ms, latency ratio {bench['latency_ratio']:.3f}, "
            f"weights ratio {bench['weights_ratio']:.3f}"
            if bench
            else ""
        )
        lines.append(
            f"- **{name}** (backend {policies[name]['backends']}): {metrics}; flagged: {flagged or 'none'}{timing}"
        )
    notes_file = run_dir / "notes.json"
    if notes_file.is_file():
        lines += ["", "## Notes", "", *(f"- {note}" for note in json.loads(notes_file.read_text()))]
    path = run_dir / "summary.md"
    from evals.rundir import write_atomic

    write_atomic(path, "\n".join(lines) + "\n")
    return path


def bench_markdown(report: dict[str, Any]) -> str:
    """The table of an `evals bench` report (bench.json)."""
    setup = report["setup"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    rows = []
    for r in report["results"]:
        ratio = report["ratios"].get(r["name"], {})
        rows.append(
            [
                r["name"],
                fmt(r["step_ms"], ".1f")
                + (f" ({r['step_ms_launched']:.1f} launched)" if r.get("step_ms_launched") is not None else ""),
                fmt(ratio.get("latency_ratio"), ".3f"),
                fmt(r["compile_s"], ".1f"),
                fmt(r["weights_gib"], ".3g"),
                fmt(ratio.get("weights_ratio"), ".3f"),
                fmt(r["peak_gib"], ".3g"),
                fmt(r["pipeline_s_per_image"], ".2f"),
                fmt(r.get("pipeline_weights_gib"), ".3g"),  # bench.json files before 2026-11-30 lack these
                fmt(r.get("pipeline_peak_gib"), ".3g"),
                f"{r['compile_report'].get('graphs', 0)}/{r['compile_report'].get('graph_breaks', 0)}",
            ]
        )
    header = [
        "variant",
        "step ms (median)",
        "latency ratio",
        "compile s",
        "weights GiB",
        "weights ratio",
        "peak GiB",
        "pipeline s/image",
        "pipeline GiB",
        "pipeline peak GiB",
        "graphs/breaks",
    ]
    env = report["environment"]
    return "\n".join(
        [
            f"# bench: {report['model']}",
            "",
            f"{setup['resolution']}x{setup['resolution']}, transformer batch {setup['batch']}, compile "
            f"{setup['compile']}{', steps replayed from a CUDA graph' if setup.get('cuda_graph') else ''}, "
            f"{setup['iters']} timed steps after {setup['warmup'] + 1} untimed; "
            f"{env.get('device_name', env['device'])}, torch {env['torch']}",
            "",
            markdown_table(rows, header),
            "",
        ]
    )
