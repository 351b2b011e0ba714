"""Render a run directory: the gate table (terminal) and summary.md. Reads files, loads no model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.4g}"


def threshold_text(r: dict[str, Any]) -> str:
    """`>= 40`, or `max drop 0.5 vs baseline 52.1` for a regression gate; tags and warn marked."""
    text = f"{r['op']} {r['threshold']:g}"
    if "vs baseline" in r["gate"]:
        text = r["gate"].split(f" {r['stat']} ", 1)[1].split(" [tags")[0]
        if r.get("baseline") is not None:
            text += f" {_fmt(r['baseline'])}"
    if r.get("tags"):
        text += f" [tags {','.join(r['tags'])}]"
    if r.get("severity") == "warn":
        text += " (warn)"
    return text


STATUS = {"pass": "PASS", "fail": "FAIL", "warn": "WARN", "not evaluated": "SKIP"}


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
    for r in verdict["results"]:
        row = [r["policy"], r["subject"], r["stat"], threshold_text(r), _fmt(r["actual"]), STATUS[r["status"]]]
        if summary and NOISE_FLOOR in summary.get("policies", {}):
            row.insert(5, noise_floor_value(r, summary))
        rows.append(row)
    return rows


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
    return f"{table}\n\nverdict: {status}  ({run_dir})"


def write_summary_markdown(run_dir: Path) -> Path:
    run, summary, verdict = load_run(run_dir)
    status = "✅ passed" if verdict["passed"] else "❌ failed"
    lines = [
        f"# {run['suite']['name']}: {status}",
        "",
        f"Model `{run['model']['source']}`, reference {run['reference_dtype']}, "
        f"{run['samples']} samples, device {run['environment']['device']}.",
        "",
        "## Gates",
        "",
        markdown_table(gate_rows(verdict, summary), gate_header(summary)),
        "",
        "## Candidates",
        "",
    ]
    for policy in run["policies"]:
        s = summary["policies"].get(policy["name"], {})
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
            f"- **{policy['name']}** (backend {policy['backends']}): {metrics}; flagged: {flagged or 'none'}{timing}"
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
