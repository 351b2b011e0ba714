"""The comparison table of report.html and summary.md: one row per candidate, the reference first, with
the bench's memory and time, each metric's mean and the verdict. Its cells are checked against means
computed here from records.jsonl, the figures of bench.json and verdicts recounted from verdict.json.
The suite-bench run itself (real figures) is checked in tests/test_suite_bench.py."""

from __future__ import annotations

import json
import shutil
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from evals.reports.html import write_reports
from tests.test_report_html import FAILING_RUN, make_run

FIGURES = ("pipeline GiB", "pipeline peak GiB", "s/image", "step ms")
KEYS = ("pipeline_weights_gib", "pipeline_peak_gib", "pipeline_s_per_image", "step_ms")
BENCH_KEYS = dict(zip(FIGURES, KEYS, strict=True))


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (header row included)."""

    def __init__(self, page: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell += data


def html_table(run_dir: Path) -> list[dict[str, str]]:
    tables = Tables((run_dir / "report.html").read_text()).tables
    (table,) = [t for t in tables if t[0][:2] == ["candidate", FIGURES[0]]]
    return [dict(zip(table[0], row, strict=True)) for row in table[1:]]


def markdown_table(run_dir: Path) -> list[dict[str, str]]:
    section = (run_dir / "summary.md").read_text().split("## Comparison\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return [dict(zip(cells(lines[0]), cells(line), strict=True)) for line in lines[2:]]


def metric_means(run_dir: Path) -> dict[str, dict[str, float]]:
    """Policy -> metric -> mean, straight from records.jsonl."""
    values: dict[str, dict[str, list[float]]] = {}
    for line in (run_dir / "records.jsonl").read_text().splitlines():
        record = json.loads(line)
        for metric, value in record["metrics"].items():
            values.setdefault(record["policy"], {}).setdefault(metric, []).append(value)
    return {p: {m: statistics.fmean(v) for m, v in ms.items()} for p, ms in values.items()}


def verdicts(run_dir: Path) -> dict[str, str]:
    """Policy -> FAILED / PASSED with warnings / PASSED, recounted from verdict.json."""
    statuses: dict[str, set[str]] = {}
    for r in json.loads((run_dir / "verdict.json").read_text())["results"]:
        statuses.setdefault(r["policy"], set()).add(r["status"])
    return {
        p: "FAILED" if "fail" in s else "PASSED with warnings" if "warn" in s else "PASSED" for p, s in statuses.items()
    }


def check_quality_columns(run_dir: Path, rows: list[dict[str, str]], metrics: list[str]) -> None:
    means, verdict = metric_means(run_dir), verdicts(run_dir)
    reference, *candidates = rows
    assert reference["candidate"] == "reference" and reference["verdict"] == "-"
    assert all(reference[f"{m} mean"] == "-" for m in metrics)  # the reference is not scored against itself
    for row in candidates:
        for m in metrics:
            assert row[f"{m} mean"] == f"{means[row['candidate']][m]:.4g}", (row["candidate"], m)
        if row["candidate"] in verdict:
            assert row["verdict"] == verdict[row["candidate"]]


def test_a_run_without_bench_shows_metric_means_verdicts_and_dashes(finished: Path) -> None:
    assert not (finished / "bench.json").exists()
    for rows in (html_table(finished), markdown_table(finished)):
        assert [r["candidate"] for r in rows] == ["reference", "fp8-e4m3-rowwise"]
        assert list(rows[0]) == ["candidate", *FIGURES, "psnr mean", "ssim mean", "verdict"]
        check_quality_columns(finished, rows, ["psnr", "ssim"])
        assert rows[1]["verdict"] == "PASSED"
        assert all(row[f] == "-" for row in rows for f in FIGURES)  # nothing measured: dashes, never a zero
    assert "no `bench` section" in (finished / "summary.md").read_text()


BENCH = {
    "settings": {"resolution": 16, "batch": 2, "steps": 4},
    "results": [
        {"name": "reference", "step_ms": 12.5, "pipeline_s_per_image": 0.75, "pipeline_weights_gib": 0.0196},
        {"name": "m-failed-once", "step_ms": 30.0, "pipeline_s_per_image": 1.5, "pipeline_weights_gib": 0.0101},
        # Measured as zero is shown as zero; not measured (null, or a field an older run lacks) as a dash.
        {"name": "a-good", "step_ms": 0.0, "pipeline_s_per_image": None, "pipeline_weights_gib": 0.0133},
    ],
}


@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A written run of four gated candidates and a noise floor, with a bench.json for three variants."""
    run_dir = make_run(tmp_path_factory.mktemp("benched"), FAILING_RUN, noise_floor=[60.0, 61.0, 62.0])
    (run_dir / "bench.json").write_text(json.dumps(BENCH))
    write_reports(run_dir)
    return run_dir


@pytest.mark.parametrize("table", [html_table, markdown_table], ids=["html", "markdown"])
def test_bench_figures_come_from_bench_json_and_a_missing_one_is_a_dash(benched: Path, table) -> None:
    rows = table(benched)
    order = ["reference", "z-failed-thrice", "m-failed-once", "b-warned", "a-good", "noise-floor"]
    assert [r["candidate"] for r in rows] == order  # the reference, failing candidates first, the floor last
    check_quality_columns(benched, rows[:-1], ["psnr"])
    assert rows[-1]["psnr mean"] == f"{statistics.fmean([60.0, 61.0, 62.0]):.4g}"
    assert rows[-1]["verdict"].startswith("not gated")
    figures = {r["name"]: r for r in BENCH["results"]}
    for row in rows:
        measured = figures.get(row["candidate"], {})
        for title, key in BENCH_KEYS.items():
            value = measured.get(key)
            assert row[title] == ("-" if value is None else f"{value:.4g}"), (row["candidate"], title)
    by_name = {r["candidate"]: r for r in rows}
    assert by_name["a-good"]["step ms"] == "0" and by_name["a-good"]["s/image"] == "-"
    assert all(by_name["b-warned"][f] == "-" for f in FIGURES)  # no bench figures at all


def test_the_comparison_stands_in_the_summary_section(benched: Path) -> None:
    page = (benched / "report.html").read_text()
    summary = page[page.index('<section id="summary">') : page.index("</section>")]
    assert "<h2>Comparison</h2>" in summary and "16x16" in summary and "4-step" in summary
    assert '<td class="fail">FAILED</td>' in summary.split("<h2>Comparison</h2>", 1)[1]


def test_the_comparison_of_a_copied_run_follows_its_files(finished: Path, tmp_path: Path) -> None:
    """Rendered again from a copy whose bench.json names only the reference: its row has figures, the
    candidate's row dashes."""
    run_dir = Path(shutil.copytree(finished, tmp_path / finished.name))
    (run_dir / ".lock").unlink(missing_ok=True)
    (run_dir / "bench.json").write_text(json.dumps({"settings": {}, "results": [BENCH["results"][0]]}))
    write_reports(run_dir)
    reference, candidate = markdown_table(run_dir)
    assert reference["step ms"] == "12.5" and reference["s/image"] == "0.75"
    assert all(candidate[f] == "-" for f in FIGURES)
    assert "1024x1024" in (run_dir / "summary.md").read_text()  # the bench's defaults when a suite sets none
