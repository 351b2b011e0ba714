"""The HTML report (and the text tables) put what blocks a run first: a run directory written by hand
(records, summary, a verdict from the real gate code, 8x8 PNGs), rendered without a model."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evals.gates import NO_BASELINE, evaluate_gates
from evals.records import SampleRecord, summarize, summary_to_json
from evals.reports.html import render_html
from evals.reports.render import gate_table_text, write_summary_markdown
from evals.suite_types import GateSpec

HOSTILE = "<script>alert(1)</script>"

# In suite order the failed gates come last, so sorting has to move them up.
GATES = (
    GateSpec("min", ">=", 20, metric="psnr"),
    GateSpec("count", "<=", 0, detector="black_frame"),
    GateSpec("mean", "<=", 0, metric="psnr", baseline=("max_drop", 0.5), optional=True),
    GateSpec("max", ">=", 43, metric="psnr", severity="warn"),
    GateSpec("mean", ">=", 30, metric="psnr"),
)

FAILING_RUN = {
    "a-good": [40.0, 42.0, 44.0],  # passes; its baseline gate is not evaluated
    "b-warned": [35.0, 36.0, 37.0],  # psnr max below the warn gate
    "m-failed-once": [25.0, 28.0, 29.0],  # psnr mean fails (and warns)
    "z-failed-thrice": [20.0, 25.0, 10.0],  # psnr min, mean and a black frame fail: sorts last by name
}


def make_run(run_dir: Path, psnr: dict[str, list[float]], noise_floor: list[float] | None = None) -> Path:
    """A finished run directory: every file report.html, summary.md and the gate table read."""
    rng = np.random.default_rng(0)
    runs = {**psnr, **({"noise-floor": noise_floor} if noise_floor else {})}
    records = []
    for policy, values in runs.items():
        (run_dir / "images" / policy).mkdir(parents=True)
        for i, value in enumerate(values):
            sample = f"case{i}-s0"
            black = policy.startswith("z-") and value < 15
            records.append(
                SampleRecord(
                    policy=policy,
                    sample_id=sample,
                    case_id=f"case{i}",
                    prompt=HOSTILE if i == 0 else f"prompt {i}",
                    seed=0,
                    tags=("t",),
                    metrics={"psnr": value},
                    detectors={"black_frame": {"flagged": black, "score": 0.0, "reason": "mean luma 0.01"}},
                    reference_detectors={"black_frame": {"flagged": False, "score": 0.5, "reason": ""}},
                    image=f"images/{policy}/{sample}.png",
                    reference_image=f"images/ref/{sample}.png",
                    seconds_per_image=0.1,
                )
            )
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(run_dir / records[-1].image)
    (run_dir / "images" / "ref").mkdir()
    for i in range(len(next(iter(psnr.values())))):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(run_dir / "images" / "ref" / f"case{i}-s0.png")
    (run_dir / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    summaries = summarize(records)
    (run_dir / "summary.json").write_text(summary_to_json(summaries))
    verdict = evaluate_gates(summaries, GATES, list(psnr), records=records)  # no baselines
    (run_dir / "verdict.json").write_text(json.dumps(verdict.to_dict()))
    policies = [{"name": name, "backends": "scaled_mm:1", "noise_floor": None} for name in psnr]
    policies += [{"name": "noise-floor", "backends": "", "noise_floor": "batch"}] if noise_floor else []
    run = {
        "environment": {"device": "cpu"},
        "git_commit": "abc123",
        "model": {"source": "tiny"},
        "policies": policies,
        "reference_dtype": "float32",
        "samples": 3,
        "suite": {"name": "synthetic"},
    }
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


class Sections(HTMLParser):
    """Each <details> element of a page: its attributes, its <summary> text, and the result cells
    (PASS, FAIL, ...) of the tables inside it."""

    def __init__(self, page: str):
        super().__init__()
        self.sections: list[dict] = []
        self._where = ""
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "details":
            self.sections.append({"attrs": dict(attrs), "summary": "", "results": []})
        elif tag in ("summary", "td") and self.sections:
            self._where = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == self._where:
            self._where = ""

    def handle_data(self, data: str) -> None:
        if self._where == "summary":
            self.sections[-1]["summary"] += data
        elif self._where == "td" and data in ("PASS", "FAIL", "WARN", "SKIP"):
            self.sections[-1]["results"].append(data)

    def candidate(self, name: str) -> dict:
        (section,) = [s for s in self.sections if s["summary"].split(" ")[0] == name]
        return section


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("run"), FAILING_RUN)


@pytest.fixture(scope="module")
def page(failing_run: Path) -> str:
    return render_html(failing_run)


def summary_block(page: str) -> str:
    start = page.index('<section id="summary">')
    return page[start : page.index("</section>", start)]


def test_the_summary_comes_first_and_names_what_failed(page: str) -> None:
    summary = summary_block(page)
    assert page.index('<section id="summary">') < page.index("<details")
    assert '<td class="fail">FAILED</td>' in summary and "synthetic" in summary and "tiny" in summary
    assert "2 failed, 1 passed with warnings, 1 passed" in summary
    failed = summary[summary.index("<h2>Failed gates</h2>") : summary.index("<h2>Warnings</h2>")]
    assert failed.index("z-failed-thrice") < failed.index("m-failed-once")
    assert "a-good" not in failed and "b-warned" not in failed
    assert "<b>psnr mean &gt;= 30</b>: actual 27.33 vs threshold &gt;= 30" in failed
    assert "black_frame count &lt;= 0" in failed
    skipped = summary[summary.index("<h2>Not evaluated</h2>") :]
    assert "<b>psnr mean max drop 0.5 vs baseline</b>" in skipped
    assert html.escape(f"not evaluated: {NO_BASELINE}") in skipped  # why it was not evaluated
    assert skipped.count(NO_BASELINE[:20]) == 1  # said once for the four candidates it skipped


def test_failing_candidates_come_first_whatever_their_names(page: str) -> None:
    order = [s["summary"].split(" ")[0] for s in Sections(page).sections if "candidate" in s["attrs"]["class"]]
    assert order == ["z-failed-thrice", "m-failed-once", "b-warned", "a-good"]
    summary = summary_block(page)
    overview = [summary.index(f">{name}</a>") for name in ("z-failed-thrice", "m-failed-once", "b-warned", "a-good")]
    assert overview == sorted(overview)


def test_failed_gates_come_first_in_the_gate_table(page: str) -> None:
    sections = Sections(page)
    assert sections.candidate("m-failed-once")["results"] == ["FAIL", "WARN", "SKIP", "PASS", "PASS"]
    assert sections.candidate("z-failed-thrice")["results"] == ["FAIL", "FAIL", "FAIL", "WARN", "SKIP"]
    assert sections.candidate("a-good")["results"] == ["SKIP", "PASS", "PASS", "PASS", "PASS"]


def test_failing_candidates_are_open_and_passing_ones_closed(page: str) -> None:
    sections = Sections(page)
    for name in ("z-failed-thrice", "m-failed-once"):
        assert "open" in sections.candidate(name)["attrs"], name
    for name in ("a-good", "b-warned"):
        assert "open" not in sections.candidate(name)["attrs"], name
    # Every per-candidate part is inside its <details>: nothing but the summary stands outside one.
    outside = page[: page.index("<details")] + page[page.rindex("</details>") :]
    assert "Worst samples" not in outside and "<svg" not in outside and "<img" not in outside


def test_hostile_prompts_are_escaped(page: str) -> None:
    assert HOSTILE not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_passing_run_is_closed_up(tmp_path: Path) -> None:
    names = ["f-one", "e-two", "d-three", "c-four", "b-five", "a-six"]
    run_dir = make_run(tmp_path, {name: [44.0, 45.0, 46.0] for name in names}, noise_floor=[60.0, 61.0, 62.0])
    page = render_html(run_dir)
    sections = Sections(page)
    assert all("open" not in s["attrs"] for s in sections.sections)
    candidates = [s["summary"].split(" ")[0] for s in sections.sections if "candidate" in s["attrs"]["class"]]
    assert candidates == sorted(names)  # all alike: by name
    floor = next(i for i, s in enumerate(sections.sections) if s["summary"].startswith("noise-floor"))
    assert floor == len(names)  # after every candidate
    assert "<th>noise floor</th>" in page
    summary = summary_block(page)
    assert '<td class="pass">PASSED</td>' in summary and "Failed gates" not in summary


def test_the_text_tables_put_failed_gates_first(failing_run: Path) -> None:
    lines = gate_table_text(failing_run).splitlines()
    statuses = ("FAIL", "WARN", "SKIP", "PASS")
    results = [next(w for w in line.split() if w in statuses) for line in lines[2 : lines.index("")]]
    assert any("SKIP (no baseline for this policy on this platform)" in line for line in lines)  # says why
    assert results[:4] == ["FAIL"] * 4  # every candidate's failures on top
    assert results == sorted(results, key=["FAIL", "WARN", "SKIP", "PASS"].index)
    assert lines[2].startswith("z-failed-thrice")
    # What failed, again just above the verdict line (the table's top may have scrolled away).
    assert lines[-3:-1] == [
        "failed: z-failed-thrice: black_frame count <= 0, psnr mean >= 30, psnr min >= 20",
        "failed: m-failed-once: psnr mean >= 30",
    ]
    assert lines[-1].startswith("verdict: FAILED")

    markdown = write_summary_markdown(failing_run).read_text()
    assert markdown.index("## Failed gates") < markdown.index("## Gates")
    assert "- **m-failed-once** psnr mean >= 30: actual 27.33 vs threshold >= 30" in markdown
    candidates = markdown[markdown.index("## Candidates") :]
    assert candidates.index("z-failed-thrice") < candidates.index("a-good")
