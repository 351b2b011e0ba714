"""A suite's `bench`: candidates' transformer step latency and weights against the reference's,
measured after the run, gated like any statistic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.cli import main
from tests.conftest import SUITES, write

BENCH = "bench: {resolution: 64, batch: 2, warmup: 1, iters: 3, compile: none}\n"


def bench_suite(workdir: Path, weights_limit: float) -> Path:
    gates = (
        f'  - {{bench: weights_ratio, op: "<=", value: {weights_limit}}}\n'
        '  - {bench: latency_ratio, op: "<=", value: 100}\n'  # FP8 is emulated-slow on a CPU: no speed claim here
    )
    return write(workdir / "smoke.yaml", (SUITES / "smoke.yaml").read_text() + gates + BENCH)


@pytest.mark.parametrize(("limit", "code"), [(0.6, 0), (0.3, 1)])
def test_bench_gates_see_the_measured_ratios(workdir: Path, limit: float, code: int) -> None:
    assert main(["run", str(bench_suite(workdir, limit)), "--no-mlflow", "--no-progress"]) == code
    (run_dir,) = (workdir / "runs").iterdir()
    bench = json.loads((run_dir / "summary.json").read_text())["policies"]["fp8-e4m3-rowwise"]["bench"]
    assert 0.4 < bench["weights_ratio"] < 0.6  # FP8 weights plus float32 scales, float32 layers kept
    assert bench["latency_ratio"] > 0 and bench["step_ms"] > 0
    results = {r["subject"]: r for r in json.loads((run_dir / "verdict.json").read_text())["results"]}
    assert results["weights_ratio"]["actual"] == bench["weights_ratio"]
    assert results["weights_ratio"]["status"] == ("pass" if code == 0 else "fail")
    assert "latency ratio" in (run_dir / "report.html").read_text()
    assert [r["name"] for r in json.loads((run_dir / "bench.json").read_text())["results"]] == [
        "reference",
        "fp8-e4m3-rowwise",
    ]


def test_a_bench_gate_needs_a_bench_section(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (SUITES / "smoke.yaml").read_text() + '  - {bench: latency_ratio, op: "<=", value: 0.8}\n'
    assert main(["validate", str(write(workdir / "s.yaml", text))]) == 2
    assert "needs the suite's 'bench' section" in capsys.readouterr().err
