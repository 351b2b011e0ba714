"""Per-block compilation: a reference and several FP8 candidates compile in one process without
hitting dynamo's recompile limit, and a limit that is hit is an error, never a silent eager run.
dynamo's `eager` backend is enough here: the limit and the guards are dynamo's, not inductor's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo.config as dynamo_config

from evals.bench import BenchSetup, step_inputs
from evals.compiling import CompileFellBack, block_kind, compile_blocks, explain_failure
from evals.models.precision import apply_policy, load_policy
from evals.models.sources import load_source
from tests.conftest import write


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    with dynamo_config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        yield
    torch._dynamo.reset()


ROWWISE = "{format: e4m3fn, weights: per_channel, activations: dynamic_per_token, backend: auto}"
SPECS = {  # each compiles to graphs of its own: dynamo guards on the spec the code branches on
    "e4m3-rowwise": ROWWISE,
    "e5m2-rowwise": ROWWISE.replace("e4m3fn", "e5m2"),
    "per-tensor": ROWWISE.replace("dynamic_per_token", "dynamic_per_tensor"),
    "weight-only": ROWWISE.replace("dynamic_per_token", "none"),
    "per-block": ROWWISE.replace("per_channel", "per_block"),
}


def variants(tmp_path: Path) -> list:
    reference = load_source("tiny", "float32").pipeline.transformer
    candidates = []
    for name, spec in SPECS.items():
        policy = write(tmp_path / f"{name}.yaml", f"name: {name}\ncomponents:\n  transformer:\n    default: {spec}\n")
        candidates.append(apply_policy(load_policy(str(policy)), {"transformer": reference})[0]["transformer"])
    return [reference, *candidates]


@torch.inference_mode()
def test_reference_and_candidates_compile_side_by_side(fresh_dynamo, tmp_path: Path) -> None:
    models = variants(tmp_path)
    kinds = len({block_kind(b) for b in models[0].transformer_blocks})
    assert kinds >= 2  # tiny has dual-attention blocks and plain ones, like SD3.5-Medium
    graphs = 0
    inputs = step_inputs(models[0], BenchSetup(resolution=64, batch=2), "cpu")
    for model in models:
        eager = model(**inputs, return_dict=False)[0]
        report = compile_blocks(model, backend="eager")
        compiled = model(**inputs, return_dict=False)[0]
        report.finish()
        assert report.graphs == kinds and report.graph_breaks == 0
        torch.testing.assert_close(compiled, eager)
        graphs += report.graphs
    assert graphs > 8  # more graphs of one code object than dynamo's default limit (8) allows


@torch.inference_mode()
def test_a_hit_recompile_limit_is_an_error(fresh_dynamo) -> None:
    model = load_source("tiny", "float32").pipeline.transformer
    inputs = step_inputs(model, BenchSetup(resolution=64, batch=2), "cpu")
    compile_blocks(model, backend="eager")
    dynamo_config.recompile_limit = 1  # room for one kind of block only
    with pytest.raises(Exception) as raised:
        model(**inputs, return_dict=False)
    explained = explain_failure(raised.value)
    assert isinstance(explained, CompileFellBack) and "run eagerly" in str(explained)


def test_a_suite_run_with_compiled_candidate_blocks(workdir: Path, fresh_dynamo) -> None:
    """`evals run --compile blocks`: the candidate's blocks run compiled (inductor, one graph per kind
    of block), its images stay those of the eager candidate, and the run records the setting."""
    import json

    from evals.cli import main
    from tests.conftest import TEST_SUITES

    fast = [str(TEST_SUITES / "smoke.yaml"), "--no-mlflow", "--no-progress"]
    assert main(["run", *fast, "--runs-dir", "eager"]) == 0
    assert main(["run", *fast, "--runs-dir", "compiled", "--compile", "blocks"]) == 0
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] >= 1  # the candidate's blocks went through dynamo

    def scores(kind: str) -> tuple[dict, dict]:
        (run_dir,) = Path(kind).iterdir()
        records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
        return json.loads((run_dir / "run.json").read_text()), {r["sample_id"]: r["metrics"]["psnr"] for r in records}

    (eager_run, eager), (compiled_run, compiled) = scores("eager"), scores("compiled")
    assert compiled_run["tracking"]["params"]["compile"] == "blocks"
    assert eager_run["tracking"]["params"]["compile"] == "none"
    # Fused kernels round differently, so PSNR against the reference moves a little, never far.
    # The trained tiny model amplifies rounding as a real one does: measured differences 0.3-7.5 dB per
    # sample, median 0.6, mean 1.4 (a broken build moves samples by 8-40 dB).
    diffs = sorted(abs(compiled[k] - eager[k]) for k in eager)
    assert diffs[len(diffs) // 2] < 1.5 and sum(diffs) / len(diffs) < 2.5, (eager, compiled)


def test_compile_auto_means_blocks_on_a_gpu_only() -> None:
    from evals.api import compile_mode

    assert compile_mode("auto", "cuda") == compile_mode("auto", "cuda:1") == "blocks"
    assert compile_mode("auto", "cpu") == "none"
    assert compile_mode("none", "cuda") == "none" and compile_mode("blocks", "cpu") == "blocks"
