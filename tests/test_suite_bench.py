"""A suite's `bench`: candidates' transformer step latency and weights against the reference's,
measured after the run, gated like any statistic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.cli import main
from tests.conftest import TEST_SUITES, write

BENCH = "bench: {resolution: 64, batch: 2, warmup: 1, iters: 3, compile: none}\n"


def bench_suite(workdir: Path, weights_limit: float) -> Path:
    gates = (
        f'  - {{bench: weights_ratio, op: "<=", value: {weights_limit}}}\n'
        '  - {bench: latency_ratio, op: "<=", value: 100}\n'  # FP8 is emulated-slow on a CPU: no speed claim here
    )
    return write(workdir / "smoke.yaml", (TEST_SUITES / "smoke.yaml").read_text() + gates + BENCH)


@pytest.mark.parametrize(("limit", "code"), [(0.6, 0), (0.3, 1)])
def test_bench_gates_see_the_measured_ratios(workdir: Path, limit: float, code: int) -> None:
    assert main(["run", str(bench_suite(workdir, limit)), "--no-mlflow", "--no-progress"]) == code
    (run_dir,) = (workdir / "runs").iterdir()
    bench = json.loads((run_dir / "summary.json").read_text())["policies"]["fp8-e4m3-rowwise"]["bench"]
    assert 0.25 < bench["weights_ratio"] < 0.45  # FP8 weights (a quarter of float32) plus scales and kept layers
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
    text = (TEST_SUITES / "smoke.yaml").read_text() + '  - {bench: latency_ratio, op: "<=", value: 0.8}\n'
    assert main(["validate", str(write(workdir / "s.yaml", text))]) == 2
    assert "needs the suite's 'bench' section" in capsys.readouterr().err


def test_cuda_graph_settings_are_checked(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (TEST_SUITES / "smoke.yaml").read_text() + "bench: {cuda_graph: sometimes}\n"
    assert main(["validate", str(write(workdir / "s.yaml", text))]) == 2
    err = capsys.readouterr().err
    assert "bench.cuda_graph" in err and "true or false" in err
    assert main(["bench", "--model", "tiny", "--device", "cpu", "--cuda-graph", "--no-mlflow"]) == 2
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
    assert not (workdir / "runs").exists()


@pytest.mark.gpu
def test_a_step_replayed_from_a_cuda_graph_computes_the_launched_step() -> None:
    from evals.bench import BenchSetup, bench_transformer, capture_step, random_transformer, step_inputs
    from tests.conftest import REPO

    transformer = random_transformer(REPO / "models/configs/sd35-medium", torch.bfloat16, "cuda", num_layers=2)
    setup = BenchSetup(resolution=256, batch=2, warmup=1, iters=3, compile="none", cuda_graph=True)
    inputs = step_inputs(transformer, setup, "cuda")
    with torch.inference_mode():
        launched = transformer(**inputs, return_dict=False)[0].clone()
        outputs = []
        replay = capture_step(lambda: outputs.append(transformer(**inputs, return_dict=False)[0]))
        outputs[-1].zero_()
        replay()  # refills the captured step's output buffer
        torch.cuda.synchronize()
        assert torch.equal(outputs[-1], launched)
    result = bench_transformer("reference", transformer, setup, "cuda")
    assert result.cuda_graph and result.step_ms > 0 and result.step_ms_launched is not None
