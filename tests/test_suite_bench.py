"""A suite's `bench`: candidates' transformer step latency and weights against the reference's,
measured after the run, gated like any statistic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.cli import main
from tests.conftest import TEST_SUITES, write

BENCH = "bench: {resolution: 16, batch: 2, warmup: 0, iters: 1, compile: none}\n"  # the smallest: cheap


def bench_suite(workdir: Path, weights_limit: float) -> Path:
    gates = (
        f'  - {{bench: weights_ratio, op: "<=", value: {weights_limit}}}\n'
        '  - {bench: latency_ratio, op: "<=", value: 1000}\n'  # FP8 is emulated-slow on a CPU: no speed claim here
    )
    return write(workdir / "smoke.yaml", (TEST_SUITES / "smoke.yaml").read_text() + gates + BENCH)


def tiny_pipeline_gib(model) -> float:
    """Bytes of every parameter and buffer of the tiny pipeline's modules (all plain float32 tensors)."""
    modules = [c for c in model.pipeline.components.values() if isinstance(c, torch.nn.Module)]
    assert len(modules) == 4  # both CLIP text encoders (tiny has no T5), the transformer, the VAE
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]) / 1024**3


def comparison_table(markdown: str) -> list[dict[str, str]]:
    """The rows of summary.md's comparison table, each as column title -> cell."""
    section = markdown.split("## Comparison\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


@pytest.mark.parametrize(("limit", "code"), [(0.6, 0), (0.3, 1)])
def test_bench_gates_see_the_measured_ratios(workdir: Path, tiny_model, limit: float, code: int) -> None:
    assert main(["run", str(bench_suite(workdir, limit)), "--no-mlflow", "--no-progress"]) == code
    (run_dir,) = (workdir / "runs").iterdir()
    bench = json.loads((run_dir / "summary.json").read_text())["policies"]["fp8-e4m3-rowwise"]["bench"]
    assert 0.25 < bench["weights_ratio"] < 0.45  # FP8 weights (a quarter of float32) plus scales and kept layers
    assert bench["latency_ratio"] > 0 and bench["step_ms"] > 0
    results = {r["subject"]: r for r in json.loads((run_dir / "verdict.json").read_text())["results"]}
    assert results["weights_ratio"]["actual"] == bench["weights_ratio"]
    assert results["weights_ratio"]["status"] == ("pass" if code == 0 else "fail")
    assert "latency ratio" in (run_dir / "report.html").read_text()
    reference, fp8 = json.loads((run_dir / "bench.json").read_text())["results"]
    assert [reference["name"], fp8["name"]] == ["reference", "fp8-e4m3-rowwise"]
    # Whole images too: at the suite's steps, every component weighed; the candidate's summary has them.
    assert json.loads((run_dir / "bench.json").read_text())["settings"]["steps"] == 4
    assert reference["pipeline_s_per_image"] > 0 and fp8["pipeline_s_per_image"] > 0
    assert reference["pipeline_peak_gib"] is None and fp8["pipeline_peak_gib"] is None  # no GPU, no peak
    assert reference["pipeline_weights_gib"] == pytest.approx(tiny_pipeline_gib(tiny_model))
    # fp8-e4m3-rowwise changes the transformer only: the rest of the pipeline weighs the same.
    rest = reference["pipeline_weights_gib"] - reference["weights_gib"]
    assert fp8["pipeline_weights_gib"] - fp8["weights_gib"] == pytest.approx(rest)
    for key in ("pipeline_s_per_image", "pipeline_weights_gib"):
        assert bench[key] == fp8[key]
    assert "pipeline_peak_gib" not in bench  # not measured: absent, never a zero
    # The comparison table of summary.md: the reference and the candidate, their figures, the verdict.
    rows = comparison_table((run_dir / "summary.md").read_text())
    assert [row["candidate"] for row in rows] == ["reference", "fp8-e4m3-rowwise"]
    for row, result in zip(rows, (reference, fp8), strict=True):
        assert row["step ms"] == f"{result['step_ms']:.4g}"
        assert row["s/image"] == f"{result['pipeline_s_per_image']:.4g}"
        assert row["pipeline GiB"] == f"{result['pipeline_weights_gib']:.4g}"
        assert row["pipeline peak GiB"] == "-"
    assert rows[1]["verdict"] == ("PASSED" if code == 0 else "FAILED")


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


TEXT_POLICY = """name: fp8-text-encoders
description: FP8 in both CLIP text encoders; the transformer untouched
components:
  text_encoder:
    default: {format: e4m3fn, weights: per_channel, activations: none}
  text_encoder_2:
    default: {format: e4m3fn, weights: per_channel, activations: none}
"""


def test_evals_bench_weighs_and_times_the_whole_pipeline(
    workdir: Path, tiny_model, capsys: pytest.CaptureFixture[str]
) -> None:
    """The candidate is built as `evals run` builds it: a policy that quantizes only the text encoders
    leaves the transformer's figures alone and makes the whole pipeline lighter."""
    policy = write(workdir / "fp8-text-encoders.yaml", TEXT_POLICY)
    smallest = ["--resolution", "16", "--batch", "2", "--warmup", "0", "--iters", "1", "--steps", "1"]
    args = ["bench", "--model", "tiny", "--device", "cpu", "--compile", "none", "--no-mlflow", *smallest]
    assert main([*args, "--policy", str(policy), "--json", "bench.json"]) == 0
    reference, candidate = json.loads((workdir / "bench.json").read_text())["results"]
    assert [reference["name"], candidate["name"]] == ["reference", "fp8-text-encoders"]
    assert reference["pipeline_weights_gib"] == pytest.approx(tiny_pipeline_gib(tiny_model))
    assert candidate["weights_gib"] == reference["weights_gib"]  # the transformer is the reference's
    assert candidate["pipeline_weights_gib"] < reference["pipeline_weights_gib"]
    assert reference["pipeline_s_per_image"] > 0 and candidate["pipeline_s_per_image"] > 0
    assert reference["pipeline_peak_gib"] is None  # a CPU has no peak-memory counter
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    assert "| pipeline s/image | pipeline GiB | pipeline peak GiB |" in header
    row = next(line for line in table.splitlines() if line.startswith("| fp8-text-encoders"))
    assert f"| {candidate['pipeline_weights_gib']:.3g} | n/a |" in row


@pytest.mark.gpu
def test_a_whole_image_s_peak_memory_is_measured_on_a_gpu() -> None:
    from evals.bench import BenchSetup, bench_transformer
    from evals.models.sources import load_source

    model = load_source("tiny", "float32", "cuda")
    setup = BenchSetup(resolution=64, batch=2, warmup=1, iters=2, steps=2, compile="none")
    result = bench_transformer("reference", model.pipeline.transformer, setup, "cuda", model.pipeline)
    assert result.pipeline_weights_gib == pytest.approx(tiny_pipeline_gib(model))
    assert result.pipeline_peak_gib is not None and result.peak_gib is not None
    # The image's activations come on top of every weight, and a 64x64 image needs far less than a GiB.
    assert result.pipeline_weights_gib < result.pipeline_peak_gib < result.pipeline_weights_gib + 1
