"""The reports of a run, rendered from its directory alone: a self-contained HTML page (images and
plots embedded), JUnit XML (one test case per gate and candidate) and the Markdown summary, which
is also appended to `$GITHUB_STEP_SUMMARY` when that is set."""

from __future__ import annotations

import html
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from evals.records import SampleRecord, read_records
from evals.reports.comparison import (
    OUTCOME,
    bench_note,
    comparison_cells,
    comparison_header,
    comparison_markdown,
    comparison_rows,
    guard_columns,
)
from evals.reports.images import comparison_grid, png_data_uri
from evals.reports.render import (
    NOISE_FLOOR,
    REVIEW_RATES,
    STATUS,
    _fmt,
    candidate_status,
    coverage_lines,
    explains,
    load_run,
    noise_floor_value,
    not_evaluated,
    ordered_candidates,
    ordered_results,
    rate_text,
    read_located,
    read_review,
    status_counts,
    threshold_text,
    write_summary_markdown,
)
from evals.reports.svg import box_plot
from evals.rundir import load_png, write_atomic

WORST = 4
"""Worst samples shown per candidate."""

STYLE_FILE = Path(__file__).resolve().parent / "templates" / "report.css"
"""The report's style sheet, inlined so that report.html is one file that can be mailed or attached."""

CANDIDATE_COUNTS = (("fail", "failed"), ("warn", "passed with warnings"), ("pass", "passed"))
SECTION_CLASS = {"fail": "failed", "warn": "warned", "pass": "passed"}
"""A candidate section's class (not `fail`: that one colours text)."""


def _status_cell(status: str) -> str:
    css = {"pass": "pass", "fail": "fail", "warn": "warn"}.get(status, "skip")
    return f'<td class="{css}">{STATUS[status]}</td>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if any(header) else ""
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _gate_table(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """One candidate's gate results, in the order given (failed first)."""
    with_floor = NOISE_FLOOR in summary.get("policies", {})
    rows = []
    for r in results:
        row = [
            html.escape(r["subject"]),
            html.escape(r["stat"]),
            html.escape(threshold_text(r)),
            _fmt(r["actual"]),
            _status_cell(r["status"]),
            html.escape(r["reason"]),
        ]
        if with_floor:
            row.insert(4, noise_floor_value(r, summary))
        rows.append(row)
    header = ["gate", "stat", "threshold", "actual", "result", "reason"]
    if with_floor:
        header.insert(4, "noise floor")
    return _table(header, rows) if rows else "<p>No gates apply to this candidate.</p>"


def _distribution_plots(records: list[SampleRecord], policies: list[str] | None = None) -> str:
    """One box plot per metric output: its per-sample values for each of `policies` (default: every
    policy in `records`, by name), in that order."""
    policies = sorted({r.policy for r in records}) if policies is None else policies
    records = [r for r in records if r.policy in policies]
    figures = []
    for metric in sorted({m for r in records for m in r.metrics}):
        rows = [
            (
                p,
                [
                    r.metrics[metric]
                    for r in records
                    if r.policy == p and math.isfinite(r.metrics.get(metric, math.nan))
                ],
            )
            for p in policies
        ]
        if any(values for _, values in rows):
            figures.append(box_plot(f"{metric} per sample (finite values)", metric, rows))
    return "\n".join(figures) or "<p>No finite metric values.</p>"


def _grid_uri(run_dir: Path, record: SampleRecord) -> str:
    """Reference beside candidate; an image that is missing or unreadable shows as grey, so that the
    report of a damaged run directory still renders (`evals run --resume` regenerates it)."""
    images: list[np.ndarray | None] = []
    for relative in (record.reference_image, record.image):
        try:
            images.append(load_png(run_dir / relative))
        except (OSError, ValueError, SyntaxError):  # PIL raises these for absent or damaged files
            images.append(None)
    shape = next((i.shape for i in images if i is not None), (64, 64, 3))
    reference, candidate = (np.full(shape, 128, np.uint8) if i is None else i for i in images)
    grid = comparison_grid(reference, candidate)
    return png_data_uri(grid, compress_level=1)  # 10% larger than zlib's default, twice as fast


def _worst_samples(run_dir: Path, records: list[SampleRecord], policies: list[str]) -> dict[str, str]:
    """Policy -> its worst samples as image grids with captions."""
    from concurrent.futures import ThreadPoolExecutor

    from evals.testing import worst_samples

    metric = next((m for m in ("psnr", "ssim", "lpips") if any(m in r.metrics for r in records)), None)
    chosen = {}
    for policy in policies:
        mine = [r for r in records if r.policy == policy]
        chosen[policy] = worst_samples(mine, metric, WORST) if metric else mine[:WORST]
    shown = [r for rs in chosen.values() for r in rs]
    # PNG decoding and encoding release the GIL: the grids of every policy are made side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(shown), os.cpu_count() or 1))) as pool:
        uris = iter(list(pool.map(lambda r: _grid_uri(run_dir, r), shown)))  # in the order of `shown`
    out = {}
    for policy, rs in chosen.items():
        parts = []
        for r in rs:
            scores = ", ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in sorted(r.metrics.items()))
            flagged = [d for d, f in r.detectors.items() if f["flagged"]]
            parts.append(
                f'<div class="sample"><img alt="{html.escape(r.sample_id)}" src="{next(uris)}">'
                f'<div class="caption"><b>{html.escape(r.sample_id)}</b>: {html.escape(r.prompt)}<br>{scores}'
                f"{'; flagged: ' + html.escape(', '.join(flagged)) if flagged else ''}"
                "<br>reference | candidate | difference (black: equal, yellow: 32/255 or more)</div></div>"
            )
        out[policy] = "\n".join(parts) or "<p>No samples.</p>"
    return out


def _findings(records: list[SampleRecord], side: str = "candidate") -> str:
    """Flagged detector findings on the candidate images of `records`, or on their reference images."""
    rows = []
    for r in records:
        found = r.detectors if side == "candidate" else r.reference_detectors
        for name, finding in sorted(found.items()):
            if finding["flagged"]:
                rows.append([html.escape(r.sample_id), html.escape(name), html.escape(finding["reason"])])
    if not rows:
        return "<p>No detector flagged any image.</p>"
    return _table(["sample", "detector", "reason"], rows)


def _bench(summary: dict[str, Any], policies: list[str]) -> str:
    """The suite's bench figures of `policies`, when it benches."""
    rows = [
        [html.escape(name), *(_fmt(b[k]) for k in ("step_ms", "latency_ratio", "weights_gib", "weights_ratio"))]
        for name in policies
        if (b := summary.get("policies", {}).get(name, {}).get("bench"))
    ]
    if not rows:
        return ""
    header = ["candidate", "step ms", "latency ratio", "weights GiB", "weights ratio"]
    return "<h2>Speed and memory (transformer step against the reference)</h2>" + _table(header, rows)


def _comparison(run_dir: Path, run: dict[str, Any], summary: dict[str, Any], verdict: dict[str, Any]) -> str:
    """Every candidate side by side, the reference first: memory, time, metric means, verdict."""
    metrics, rows = comparison_rows(run, summary, verdict, run_dir)
    guard = guard_columns(rows)
    cells = []
    for row in rows:
        text = [html.escape(c) for c in comparison_cells(row, metrics, guard)]
        if row.outcome is not None:
            text[-1] = f'<td class="{row.outcome}">{text[-1]}</td>'
        cells.append(text)
    note = f"<p>{html.escape(bench_note(run_dir, run['reference_dtype']))}</p>"
    return "<h2>Comparison</h2>" + note + _table(comparison_header(metrics, guard), cells)


def _count_text(counts: Counter[str]) -> str:
    words = {"fail": "failed", "warn": "warned", "not evaluated": "not evaluated", "pass": "passed"}
    return ", ".join(f"{counts[s]} {word}" for s, word in words.items() if counts[s]) or "no gates"


def _result_html(r: dict[str, Any]) -> str:
    """One gate result: `<b>psnr mean >= 30</b>: actual 27.1 vs threshold >= 30`, and why when that
    is not all there is to say (not evaluated, NaN, a regression gate's drop)."""
    text = f"<b>{html.escape(r['gate'])}</b>: actual {_fmt(r['actual'])} vs threshold {html.escape(threshold_text(r))}"
    return f"{text}: {html.escape(r['reason'])}" if explains(r) else text


def _summary(
    run: dict[str, Any],
    verdict: dict[str, Any],
    candidates: list[str],
    notes: list[str],
    comparison: str,
    coverage: list[str],
) -> str:
    """The top of the page: the verdict, what ran, one line per candidate, the comparison table, and
    every gate that did not pass with its numbers and, where they do not say it, why."""
    counts = status_counts(verdict, candidates)
    outcome = {c: candidate_status(counts[c]) for c in candidates}
    outcomes = Counter(outcome.values())
    link = {c: f'<a href="#candidate-{i}">{html.escape(c)}</a>' for i, c in enumerate(candidates)}
    verdict_cell = '<td class="pass">PASSED</td>' if verdict["passed"] else '<td class="fail">FAILED</td>'
    facts = [
        ["verdict", verdict_cell],
        ["suite", html.escape(run["suite"]["name"])],
        ["model", html.escape(str(run["model"]["source"]))],
        ["samples", f"{html.escape(str(run.get('samples', '?')))} per candidate"],
        ["candidates", ", ".join(f"{outcomes[o]} {word}" for o, word in CANDIDATE_COUNTS if outcomes[o]) or "none"],
    ]
    overview = [
        [link[c], f'<td class="{outcome[c]}">{OUTCOME[outcome[c]]}</td>', _count_text(counts[c])] for c in candidates
    ]
    parts = ['<section id="summary">', _table(["", ""], facts), _table(["candidate", "result", "gates"], overview)]
    parts += [f"<p class='coverage'>{html.escape(line)}</p>" for line in coverage]
    parts.append(comparison)
    results = ordered_results(verdict, by_candidate=True)
    for title, wanted in (("Failed gates", "fail"), ("Warnings", "warn")):
        items = []
        for c in candidates:
            mine = "".join(f"<li>{_result_html(r)}</li>" for r in results if r["policy"] == c and r["status"] == wanted)
            if mine:
                items.append(f"<li>{link[c]}<ul>{mine}</ul></li>")
        if items:
            parts.append(f"<h2>{title}</h2><ul>{''.join(items)}</ul>")
    skipped = [
        f"<li><b>{html.escape(gate)}</b> for {', '.join(link.get(n, html.escape(n)) for n in names)}: "
        f"{html.escape(reason)}</li>"
        for (gate, reason), names in not_evaluated(verdict).items()
    ]
    if skipped:
        parts.append(f"<h2>Not evaluated</h2><ul>{''.join(skipped)}</ul>")
    parts += [f"<p class='warn'>{html.escape(n)}</p>" for n in notes]
    return "\n".join([*parts, "</section>"])


def _details(css: str, head: str, body: list[str], is_open: bool = False, anchor: str = "") -> str:
    """A collapsible section: plain <details>, no script."""
    attributes = f' id="{anchor}"' if anchor else ""
    attributes += " open" if is_open else ""
    return f'<details class="{css}"{attributes}><summary>{head}</summary>\n' + "\n".join(body) + "\n</details>"


def _policy_sections(
    run_dir: Path,
    records: list[SampleRecord],
    summary: dict[str, Any],
    verdict: dict[str, Any],
    candidates: list[str],
    floors: list[str],
) -> list[str]:
    """One section per candidate, in the order given (failing first), open when it failed, then the
    noise floor's, closed: a passing candidate stays one line until someone opens it."""
    counts = status_counts(verdict, candidates)
    results = ordered_results(verdict, by_candidate=True)
    worst = _worst_samples(run_dir, records, [*candidates, *floors])
    located = read_located(run_dir)
    sections = []
    for i, name in enumerate([*candidates, *floors]):
        beside = [f for f in floors if f != name]  # the noise floor: what "no change" looks like
        body = [
            "<h2>Metric distributions</h2>",
            "<p>Beside the noise floor: the reference against itself.</p>" if beside else "",
            _distribution_plots(records, [name, *beside]),
            "<h2>Worst samples</h2>",
            worst[name],
            "<h2>Detector findings</h2>",
            _findings([r for r in records if r.policy == name]),
        ]
        if name in floors:
            head = (
                f'{html.escape(name)} <span class="skip">noise floor (the reference against itself, not gated)</span>'
            )
            sections.append(_details("floor", head, body, anchor=f"candidate-{i}"))
            continue
        outcome = candidate_status(counts[name])
        gates = _gate_table([r for r in results if r["policy"] == name], summary)
        head = (
            f'{html.escape(name)} <span class="{outcome}">{OUTCOME[outcome]}</span>'
            f' <span class="counts">gates: {_count_text(counts[name])}</span>'
        )
        jump = f'<p class="located">{html.escape(located[name]["text"])}</p>' if name in located else ""
        body = ["<h2>Gates</h2>", jump, gates, _bench(summary, [name]), *body]
        sections.append(
            _details(f"candidate {SECTION_CLASS[outcome]}", head, body, outcome == "fail", f"candidate-{i}")
        )
    return sections


def render_html(run_dir: Path) -> str:
    run, summary, verdict = load_run(run_dir)
    records = list(read_records(run_dir / "records.jsonl"))
    in_records = list(dict.fromkeys(r.policy for r in records))
    floors = {p["name"] for p in run["policies"] if p.get("noise_floor")} | ({NOISE_FLOOR} & set(in_records))
    named = [p["name"] for p in run["policies"]] + in_records
    candidates = ordered_candidates(verdict, [p for p in named if p not in floors])
    shown_floors = sorted(floors & set(in_records))
    status = "passed" if verdict["passed"] else "failed"
    env_rows = [[html.escape(k), html.escape(str(v))] for k, v in sorted(run["environment"].items())]
    env_rows += [
        ["git commit", html.escape(str(run.get("git_commit")))],
        ["model", html.escape(run["model"]["source"])],
        ["reference", html.escape(run["reference_dtype"])],
        ["run directory", f"<code>{html.escape(run_dir.name)}</code>"],
    ]
    notes_file = run_dir / "notes.json"
    notes = json.loads(notes_file.read_text()) if notes_file.is_file() else []
    sections = _policy_sections(run_dir, records, summary, verdict, candidates, shown_floors)
    compared = [p for p in [*candidates, *shown_floors] if p in in_records]
    if len(compared) > 1:
        body = ["<h2>Metric distributions</h2>", _distribution_plots(records, compared)]
        sections.append(_details("all", "All candidates compared", body))
    shared = [r for r in records if r.policy == in_records[0]] if in_records else []  # one reference per sample
    sections.append(
        _details("reference", "Detector findings on the reference images", [_findings(shared, "reference")])
    )
    sections.append(_details("environment", "Environment", [_table(["", ""], env_rows)]))
    title = f"{run['suite']['name']}: {status}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
{STYLE_FILE.read_text()}</style></head><body>
<h1>{html.escape(run["suite"]["name"])}: <span class="{"pass" if verdict["passed"] else "fail"}">{status}</span></h1>
{_summary(run, verdict, candidates, notes, _comparison(run_dir, run, summary, verdict), coverage_lines(run, summary))}
{_review_section(run_dir)}
{"".join(sections)}
</body></html>
"""


def _review_section(run_dir: Path) -> str:
    """The blind A/B review (`evals review`): each candidate's rates with their 95% intervals, per
    reviewer, and the samples people told apart most with both images; empty before any vote."""
    review = read_review(run_dir)
    if not review.get("candidates"):
        return ""
    parts = ['<section id="review"><h2>Blind A/B review</h2>']
    for name, figures in review["candidates"].items():
        rows = [
            [
                "all reviewers",
                str(figures["overall"]["votes"]),
                *(html.escape(rate_text(figures["overall"][k])) for k, _ in REVIEW_RATES),
            ]
        ]
        for reviewer, mine in figures.get("by_reviewer", {}).items():
            rows.append(
                [html.escape(reviewer), str(mine["votes"]), *(html.escape(rate_text(mine[k])) for k, _ in REVIEW_RATES)]
            )
        parts += [f"<h3>{html.escape(name)}</h3>", _table(["", "votes", *(label for _, label in REVIEW_RATES)], rows)]
        told = figures.get("told_apart", [])
        if told:
            cells = [
                f'<figure><img src="images/ref/{html.escape(t["sample_id"])}.png" alt="reference" width="128">'
                f'<img src="images/{html.escape(name)}/{html.escape(t["sample_id"])}.png" alt="{html.escape(name)}" '
                f'width="128"><figcaption>{html.escape(t["sample_id"])}: told apart {t["correct"]} of {t["votes"]}'
                "</figcaption></figure>"
                for t in told
            ]
            parts.append(f"<p>Told apart most (reference left, {html.escape(name)} right):</p>{''.join(cells)}")
    return "\n".join([*parts, "</section>"])


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
    summary_md = write_summary_markdown(run_dir, comparison_markdown(run_dir))
    report = run_dir / "report.html"
    write_atomic(report, render_html(run_dir))
    junit = run_dir / "junit.xml"
    write_atomic(junit, junit_xml(run_dir))
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write(summary_md.read_text() + "\n")
    return [report, junit, summary_md]
