"""Candidates built by torchao (`backend: torchao` in a policy): the same keep-rules as this
project's policies, judged beside them in one run; what cannot run here says why."""

from __future__ import annotations

import copy
import json
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch

from evals.candidates import build_candidate
from evals.cli import main
from evals.models.precision import load_policy
from evals.models.yamlspec import InputError
from evals.suite_types import Generation
from tests.conftest import REPO, TEST_SUITES, write

pytest.importorskip("torchao", reason="torchao is in the test extra: pip install -e '.[test]'")

GEN = Generation(64, 64, 2, 4.5, 2, max_sequence_length=8)
ROWWISE = (REPO / "models" / "policies" / "fp8-e4m3-rowwise.yaml").read_text()


def torchao_policy(tmp_path: Path, name: str, settings: str, extra_rules: str = "") -> Path:
    text = ROWWISE.replace("name: fp8-e4m3-rowwise", f"name: {name}").replace(
        "default: {format: e4m3fn, weights: per_channel, activations: dynamic_per_token, backend: auto}",
        f"default: {{{settings}, backend: torchao}}",
    )
    return write(tmp_path / f"{name}.yaml", text.replace("    rules:\n", "    rules:\n" + extra_rules))


@pytest.mark.parametrize(
    ("shipped", "config", "also_kept"),
    [
        ("torchao-int8-weight-only", "Int8WeightOnlyConfig", ()),
        ("torchao-int8-dynamic", "Int8DynamicActivationInt8WeightConfig", ("*.norm1.linear", "*.norm1_context.linear")),
        ("torchao-fp8-weight-only", "Float8WeightOnlyConfig", ()),
    ],
)
def test_a_torchao_policy_is_torchao_itself_on_the_layers_the_rules_pick(
    tiny_model, shipped: str, config: str, also_kept: tuple[str, ...]
):
    """Against torchao's quantize_ called directly on a copy of the reference transformer, with the
    layers the policy keeps filtered out by hand: the same weights and the same output."""
    import torchao.quantization as ao

    candidate = build_candidate(tiny_model, load_policy(shipped), GEN)
    kept = {"pos_embed.proj", "time_text_embed.timestep_embedder.linear_1", "context_embedder", "norm_out.linear"}
    kept |= {"time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1"}
    kept |= {"time_text_embed.text_embedder.linear_2", "proj_out"}
    by_hand = copy.deepcopy(tiny_model.pipeline.transformer)
    ao.quantize_(
        by_hand,
        getattr(ao, config)(),
        filter_fn=lambda m, fqn: (
            isinstance(m, torch.nn.Linear) and fqn not in kept and not any(fnmatchcase(fqn, p) for p in also_kept)
        ),
    )
    ours = candidate.pipeline.transformer
    linears = [m for m in by_hand.modules() if isinstance(m, torch.nn.Linear)]
    quantized = sum(type(m.weight) is not torch.nn.Parameter for m in linears)
    assert quantized >= 60 and candidate.backends == f"keep:{len(linears) - quantized},torchao:{quantized}"
    for name, module in by_hand.named_modules():
        if isinstance(module, torch.nn.Linear):
            theirs = ours.get_submodule(name).weight
            assert type(theirs) is type(module.weight), name  # quantized exactly where torchao quantizes
    inputs = {
        "hidden_states": torch.randn(1, ours.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": torch.randn(1, 8, ours.config.joint_attention_dim),
        "pooled_projections": torch.randn(1, ours.config.pooled_projection_dim),
        "timestep": torch.tensor([500.0]),
    }
    with torch.no_grad():
        expected, got = by_hand(**inputs).sample, ours(**inputs).sample
        reference = tiny_model.pipeline.transformer(**inputs).sample
    assert torch.equal(got, expected)
    assert not torch.equal(got, reference)  # it did quantize
    assert type(tiny_model.pipeline.transformer.proj_out.weight) is torch.nn.Parameter  # reference untouched


def test_torchao_and_this_projects_fp8_are_judged_side_by_side(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One run, MLflow included: torchao's FP8 weight-only build beside this project's row-wise FP8,
    in the gate table, the report, the records and MLflow's runs."""
    policies = ["fp8-e4m3-rowwise", "torchao-fp8-weight-only"]
    args = ["run", str(TEST_SUITES / "smoke.yaml"), "--no-progress"]
    assert main(args + [a for p in policies for a in ("--policy", p)]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (workdir / "runs").iterdir()
    for policy in policies:
        assert f"{policy}  " in out
        assert f">{policy}<" in (run_dir / "report.html").read_text()
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert sorted({r["policy"] for r in records}) == sorted(policies) and len(records) == 32
    run = json.loads((run_dir / "run.json").read_text())
    assert {p["name"]: p["backends"] for p in run["policies"]}["torchao-fp8-weight-only"] == "keep:7,torchao:85"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    children = {r.data.tags["mlflow.runName"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert children == {f"{p}: pass" for p in policies}


def test_what_torchao_cannot_run_here_is_exit_2_saying_why(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    smoke = str(TEST_SUITES / "smoke.yaml")
    if not torch.cuda.is_available():  # float8 dynamic needs an Ada or Hopper GPU
        assert main(["run", smoke, "--policy", "torchao-fp8-rowwise", "--no-mlflow"]) == 2
        assert "torchao's float8 dynamic recipes need a CUDA GPU of compute capability 8.9+" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    assert main(["run", smoke, "--policy", "torchao-int8-weight-only", "--no-mlflow"]) == 2
    assert "needs the torchao package, which is not installed: pip install" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == []  # nothing written
    assert main(["quantize", "torchao-int8-dynamic", "--out", str(workdir / "x.safetensors")]) == 2
    assert "which `evals quantize` does not save" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "rules", "message"),
    [
        ("format: e5m2, weights: per_channel, activations: dynamic_per_token", "", "torchao runs format/weights/"),
        ("format: int8, weights: per_tensor, activations: none", "", "not int8/per_tensor/none"),
        ("format: int8, weights: per_channel, activations: static", "", "not int8/per_channel/static"),
        ("format: int8, weights: per_channel, activations: none, fast_accum: true", "", "fast_accum"),
        (
            "format: int8, weights: per_channel, activations: none",
            '      - {match: "transformer_blocks.0.*", backend: auto}\n',
            "int8 runs on backend: torchao only",
        ),
    ],
)
def test_torchao_settings_are_checked_when_the_policy_loads(tmp_path: Path, settings, rules, message) -> None:
    with pytest.raises(InputError, match=message):
        load_policy(str(torchao_policy(tmp_path, "bad-torchao", settings, rules)))


def test_keep_rules_and_mixed_backends_follow_the_policy_syntax(tmp_path: Path, tiny_model) -> None:
    """A rule can hand some blocks to this project's engine and keep others: first match wins, as in
    every policy."""
    from evals.models.fp8 import Fp8Linear

    rules = (
        '      - {match: "transformer_blocks.0.*", format: e4m3fn, activations: dynamic_per_token, backend: auto}\n'
        '      - {match: "transformer_blocks.1.ff.*", precision: keep}\n'
    )
    path = torchao_policy(tmp_path, "mixed", "format: int8, weights: per_channel, activations: none", rules)
    candidate = build_candidate(tiny_model, load_policy(str(path)), GEN)
    blocks = candidate.pipeline.transformer.transformer_blocks
    assert isinstance(blocks[0].attn.to_q, Fp8Linear)
    assert type(blocks[1].ff.net[2].weight) is torch.nn.Parameter and blocks[1].ff.net[2].weight.dtype == torch.float32
    assert type(blocks[2].attn.to_q.weight).__name__ == "Int8Tensor"


def test_bench_counts_torchao_weights_at_their_stored_size(tiny_model) -> None:
    from evals.bench import module_gib

    reference = module_gib(tiny_model.pipeline.transformer)
    int8 = module_gib(build_candidate(tiny_model, load_policy("torchao-int8-weight-only"), GEN).pipeline.transformer)
    fp8 = module_gib(build_candidate(tiny_model, load_policy("fp8-e4m3-rowwise"), GEN).pipeline.transformer)
    assert 0.2 < int8 / reference < 0.4  # float32 -> one byte per weight, plus scales and what stays
    assert int8 == pytest.approx(fp8, rel=0.02)  # the same 85 layers at one byte per weight (+ zero points)


@pytest.mark.gpu
def test_torchao_float8_rowwise_runs_on_a_gpu(workdir: Path) -> None:
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), "--policy", "torchao-fp8-rowwise", "--no-mlflow"]) in (0, 1)
    (run_dir,) = (workdir / "runs").iterdir()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["policies"][0]["backends"] == "keep:7,torchao:85"
