"""The reports of a run, rendered from its directory alone: a self-contained HTML page (images and
plots embedded), JUnit XML (one test case per gate and candidate) and the Markdown summary, which
is also appended to `$GITHUB_STEP_SUMMARY` when that is set."""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from evals.records import SampleRecord, read_records
from evals.rundir import load_png, write_atomic
from reports.images import comparison_grid, png_data_uri
from reports.render import (
    NOISE_FLOOR,
    STATUS,
    _fmt,
    load_run,
    noise_floor_value,
    threshold_text,
    write_summary_markdown,
)
from reports.svg import box_plot

WORST = 4
"""Worst samples shown per candidate."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; }
.pass { color: #137333; font-weight: 600; } .fail { color: #c5221f; font-weight: 600; }
.warn { color: #b06000; font-weight: 600; } .skip { color: #666; }
.sample img { image-rendering: pixelated; width: min(100%, 800px); }
.sample { margin: 1em 0; } .caption { font-size: 13px; color: #444; }
"""


def _status_cell(status: str) -> str:
    css = {"pass": "pass", "fail": "fail", "warn": "warn"}.get(status, "skip")
    return f'<td class="{css}">{STATUS[status]}</td>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _gate_table(verdict: dict[str, Any], summary: dict[str, Any]) -> str:
    with_floor = NOISE_FLOOR in summary.get("policies", {})
    rows = []
    for r in verdict["results"]:
        row = [
            html.escape(r["policy"]),
            html.escape(r["subject"]),
            r["stat"],
            html.escape(threshold_text(r)),
            _fmt(r["actual"]),
            _status_cell(r["status"]),
            html.escape(r["reason"]),
        ]
        if with_floor:
            row.insert(5, noise_floor_value(r, summary))
        rows.append(row)
    header = ["policy", "gate", "stat", "threshold", "actual", "result", "reason"]
    if with_floor:
        header.insert(5, "noise floor")
    return _table(header, rows)


def _distribution_plots(records: list[SampleRecord]) -> str:
    """One box plot per metric output: its per-sample values for every candidate."""
    policies = sorted({r.policy for r in records})
    figures = []
    for metric in sorted({m for r in records for m in r.metrics}):
        rows = [
            (p, [r.metrics[metric] for r in records if r.policy == p and math.isfinite(r.metrics[metric])])
            for p in policies
        ]
        if any(values for _, values in rows):
            figures.append(box_plot(f"{metric} per sample (finite values)", metric, rows))
    return "\n".join(figures) or "<p>No finite metric values.</p>"


def _grid_uri(run_dir: Path, record: SampleRecord) -> str:
    grid = comparison_grid(load_png(run_dir / record.reference_image), load_png(run_dir / record.image))
    return png_data_uri(grid, compress_level=1)  # 10% larger than zlib's default, twice as fast


def _worst_samples(run_dir: Path, records: list[SampleRecord]) -> str:
    from concurrent.futures import ThreadPoolExecutor

    from evals.testing import worst_samples

    metric = next((m for m in ("psnr", "ssim", "lpips") if any(m in r.metrics for r in records)), None)
    chosen = {}
    for policy in sorted({r.policy for r in records}):
        mine = [r for r in records if r.policy == policy]
        chosen[policy] = worst_samples(mine, metric, WORST) if metric else mine[:WORST]
    shown = [r for rs in chosen.values() for r in rs]
    # PNG decoding and encoding release the GIL: the grids are made side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(shown), os.cpu_count() or 1))) as pool:
        uris = iter(list(pool.map(lambda r: _grid_uri(run_dir, r), shown)))  # in the order of `shown`
    parts = []
    for policy, rs in chosen.items():
        parts.append(f"<h3>{html.escape(policy)}</h3>")
        for r in rs:
            scores = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(r.metrics.items()))
            flagged = [d for d, f in r.detectors.items() if f["flagged"]]
            parts.append(
                f'<div class="sample"><img alt="{html.escape(r.sample_id)}" src="{next(uris)}">'
                f'<div class="caption"><b>{html.escape(r.sample_id)}</b>: {html.escape(r.prompt)}<br>{scores}'
                f"{'; flagged: ' + html.escape(', '.join(flagged)) if flagged else ''}"
                "<br>reference | candidate | difference (black: equal, yellow: 32/255 or more)</div></div>"
            )
    return "\n".join(parts)


def _findings(records: list[SampleRecord]) -> str:
    rows = []
    for r in records:
        for side, found in (("candidate", r.detectors), ("reference", r.reference_detectors)):
            for name, finding in sorted(found.items()):
                if finding["flagged"] and (side == "candidate" or r.policy == records[0].policy):
                    label = r.policy if side == "candidate" else "reference"
                    rows.append([html.escape(label), html.escape(r.sample_id), name, html.escape(finding["reason"])])
    if not rows:
        return "<p>No detector flagged any image.</p>"
    return _table(["image of", "sample", "detector", "reason"], rows)


def _bench(summary: dict[str, Any]) -> str:
    """The suite's bench figures per candidate, when it benches."""
    rows = [
        [html.escape(name), *(_fmt(b[k]) for k in ("step_ms", "latency_ratio", "weights_gib", "weights_ratio"))]
        for name, policy in sorted(summary.get("policies", {}).items())
        if (b := policy.get("bench"))
    ]
    if not rows:
        return ""
    header = ["candidate", "step ms", "latency ratio", "weights GiB", "weights ratio"]
    return "<h2>Speed and memory (transformer step against the reference)</h2>" + _table(header, rows)


def render_html(run_dir: Path) -> str:
    run, summary, verdict = load_run(run_dir)
    records = list(read_records(run_dir / "records.jsonl"))
    status = "passed" if verdict["passed"] else "failed"
    env_rows = [[html.escape(k), html.escape(str(v))] for k, v in sorted(run["environment"].items())]
    env_rows += [
        ["git commit", html.escape(str(run.get("git_commit")))],
        ["model", html.escape(run["model"]["source"])],
    ]
    notes_file = run_dir / "notes.json"
    notes = json.loads(notes_file.read_text()) if notes_file.is_file() else []
    title = f"{run['suite']['name']}: {status}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(run["suite"]["name"])}: <span class="{"pass" if verdict["passed"] else "fail"}">{status}</span></h1>
<p>{len(records)} candidate samples, {len(run["policies"])} candidate(s),
reference {html.escape(run["reference_dtype"])}, run directory <code>{html.escape(run_dir.name)}</code>.</p>
{"".join(f"<p class='warn'>{html.escape(n)}</p>" for n in notes)}
<h2>Gates</h2>
{_gate_table(verdict, summary)}
{_bench(summary)}
<h2>Metric distributions</h2>
{_distribution_plots(records)}
<h2>Worst samples</h2>
{_worst_samples(run_dir, records)}
<h2>Detector findings</h2>
{_findings(records)}
<h2>Environment</h2>
{_table(["", ""], env_rows)}
</body></html>
"""


def junit_xml(run_dir: Path) -> str:
    """One <testcase> per (candidate, gate): failure for a failed gate, skipped when not evaluated;
    a failed warn gate passes, with its warning in system-out."""
    run, _, verdict = load_run(run_dir)
    suite_name = run["suite"]["name"]
    results = verdict["results"]
    failures = sum(r["status"] == "fail" for r in results)
    skipped = sum(r["status"] == "not evaluated" for r in results)
    root = ElementTree.Element("testsuites", name="evals")
    suite = ElementTree.SubElement(
        root, "testsuite", name=suite_name, tests=str(len(results)), failures=str(failures), skipped=str(skipped)
    )
    for r in results:
        case = ElementTree.SubElement(suite, "testcase", classname=f"{suite_name}.{r['policy']}", name=r["gate"])
        message = f"{r['subject']} {r['stat']} = {_fmt(r['actual'])}: {r['reason']}"
        if r["status"] == "fail":
            ElementTree.SubElement(case, "failure", message=message)
        elif r["status"] == "not evaluated":
            ElementTree.SubElement(case, "skipped", message=r["reason"])
        elif r["status"] == "warn":
            ElementTree.SubElement(case, "system-out").text = f"warning: {message}"
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_reports(run_dir: Path) -> list[Path]:
    """report.html, junit.xml and summary.md in the run directory; summary.md also goes to
    $GITHUB_STEP_SUMMARY when set."""
    summary_md = write_summary_markdown(run_dir)
    report = run_dir / "report.html"
    write_atomic(report, render_html(run_dir))
    junit = run_dir / "junit.xml"
    write_atomic(junit, junit_xml(run_dir))
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write(summary_md.read_text() + "\n")
    return [report, junit, summary_md]
