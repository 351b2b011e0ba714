"""Sensitivity sweep and policy search on a tiny model with one planted badly-quantizing layer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evals.candidates import build_candidate
from evals.cli import main
from evals.generation import generate
from evals.models.attention_policy import resolve_attention
from evals.models.precision import load_policy
from evals.models.sources import load_source
from evals.policy_search import Sweep, policy_yaml
from evals.sensitivity import GroupSensitivity, SwitchableCandidate, group_key, linear_groups
from evals.suite_types import Case, Generation, Sample
from tests.conftest import write

PLANTED = "transformer_blocks.0.attn.to_out.0"

MINI = """\
name: mini
model: tiny
generation: {height: 64, width: 64, steps: 4, guidance: 4.5, batch_size: 4}
seeds: [0]
cases:
  - {id: red-cube, prompt: "a red cube on a wooden table"}
  - {id: old-man, prompt: "a portrait photo of an old man with a grey beard"}
  - {id: alpine-lake, prompt: "a calm alpine lake at sunrise, mountains behind"}
  - {id: night-street, prompt: "a rainy street at night lit by a single lamp"}
metrics: [psnr, ssim]
detectors: [black_frame, nonfinite]
gates:
  - {metric: psnr, stat: mean, op: ">=", value: 36}
  - {detector: nonfinite, stat: count, op: "==", value: 0}
"""


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny, saved to a folder, with outlier input columns in one layer: 16 of the 64 value channels
    of block 0 are scaled down by 1e8 and the matching columns of its output projection up by 1e8.
    The model stays sane in float32, but in FP8 each row of that projection gets a scale set by the
    outlier columns and the other 48 channels' weights round to zero."""
    model = load_source("tiny", "float32", "cpu")
    attn = model.pipeline.transformer.transformer_blocks[0].attn
    k, channels = 1e8, list(range(0, 64, 4))
    with torch.no_grad():
        for layer in (attn.to_v, attn.add_v_proj):
            layer.weight[channels] /= k
            layer.bias[channels] /= k
        attn.to_out[0].weight[:, channels] *= k
    folder = tmp_path_factory.mktemp("outlier-model")
    model.pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def test_groups() -> None:
    shapes = {
        "transformer_blocks.0.attn.to_q": (64, 64),
        "transformer_blocks.1.attn.to_q": (64, 64),
        "proj_out": (16, 64),
    }
    assert {g.name: g.modules for g in linear_groups(shapes, "type")}["attn.to_q"] == (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.attn.to_q",
    )
    assert [g.name for g in linear_groups(shapes, "block")] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "proj_out",
    ]
    assert group_key("transformer_blocks.3.ff.net.2", "module") == "transformer_blocks.3.ff.net.2"
    assert linear_groups(shapes, "block")[2].params == 1024


def test_switched_variants_compute_what_real_candidates_compute(tiny_model) -> None:
    policy = load_policy("fp8-e4m3-rowwise")
    gen = Generation(height=64, width=64, steps=2, guidance=4.5, batch_size=2)
    batch = [Sample(Case("a", "a red cube", (0,)), 0), Sample(Case("b", "a forest", (1,)), 1)]
    switch = SwitchableCandidate(tiny_model, policy)
    everything = switch.variant("all", set(switch.shapes))
    nothing = switch.variant("none", set())
    everything.activate()
    assert torch.equal(
        generate(everything.pipeline, batch, gen),
        generate(build_candidate(tiny_model, policy, gen).pipeline, batch, gen),
    )
    nothing.activate()
    assert torch.equal(generate(nothing.pipeline, batch, gen), generate(tiny_model.pipeline, batch, gen))


# The search's start: blocks 0 and 1 in FP8, the rest as the reference has it. A module-by-module
# sweep makes two candidates per FP8 layer; 28 layers instead of all 92 keep the test to a minute.
TWO_BLOCKS = """\
name: two-blocks
components:
  transformer:
    rules:
      - {match: "transformer_blocks.[01].*", format: e4m3fn, weights: per_channel, activations: dynamic_per_token}
"""


def test_sweep_ranks_the_planted_layer_first_and_search_keeps_it(
    workdir: Path, outlier_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = MINI.splitlines(keepends=True)
    two_cases = "".join(line for line in lines if "id: alpine-lake" not in line and "id: night-street" not in line)
    assert two_cases.count("- {id:") == 2
    suite = write(workdir / "mini.yaml", two_cases.replace("steps: 4", "steps: 2"))
    start = write(workdir / "two-blocks.yaml", TWO_BLOCKS)
    common = ["--model", str(outlier_model), "--groups", "module", "--no-mlflow", "--no-progress"]
    out = workdir / "found.yaml"
    assert main(["policy", "search", str(suite), "--start", str(start), "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    assert f"1     {PLANTED}" in printed  # ranked first
    (search_dir,) = (workdir / "runs").glob("*-mini-search")
    sweep = json.loads(next(search_dir.glob("*-mini/sensitivity.json")).read_text())
    assert sweep["groups"][0]["group"] == PLANTED
    hurt = [g["only_quantized"] for g in sweep["groups"]]
    assert hurt[0] < hurt[1] <= hurt[-1]
    assert next(search_dir.glob("*-mini/sensitivity.png")).stat().st_size > 10_000
    log = json.loads((search_dir / "search.json").read_text())
    assert not log[0]["passed"] and any(step["passed"] for step in log)

    found = load_policy(str(out))
    kept = [r.match for r in found.components["transformer"].rules if r.spec is None]
    # The planted layer first; on the trained model the search also keeps the layers the shipped
    # policies keep for the same reason (the output projection, the timestep embedding), nothing else.
    assert kept[0] == PLANTED and set(kept[1:]) <= {"proj_out", "norm_out.linear"} | {
        k for k in kept if k.startswith("time_text_embed.")
    }
    assert "KEPT transformer_blocks.0.attn.to_out.0: only it in FP8 ->" in out.read_text()

    args = ["run", str(suite), "--model", str(outlier_model), "--no-mlflow", "--no-progress"]
    assert main([*args, "--policy", str(out), "--policy", str(start)]) == 1  # the start fails its gate
    verdict = json.loads((max((workdir / "runs").glob("*-mini")) / "verdict.json").read_text())
    failed = {r["policy"] for r in verdict["results"] if not r["passed"]}
    assert failed == {"two-blocks"}  # and the found policy passes


def test_sweep_from_the_rowwise_policy_by_block(workdir: Path, outlier_model: Path, capsys) -> None:
    suite = write(workdir / "mini.yaml", MINI)
    args = [
        "sensitivity",
        str(suite),
        "--model",
        str(outlier_model),
        "--policy",
        "fp8-e4m3-rowwise",
        "--no-mlflow",
        "--no-progress",
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "1     transformer_blocks.0 " in table and "proj_out" not in table  # the policy keeps proj_out
    with pytest.raises(SystemExit) as info:
        main([*args, "--groups", "layers"])
    assert info.value.code == 2


ATTENTION_START = """\
name: int8-attention
components:
  transformer:
    attention: {default: int8, rules: [{match: "transformer_blocks.5.attn", precision: fp8}]}
"""


def test_attention_products_are_units_of_the_sweep_and_the_search_keeps_them_by_rules(
    tiny_model, tmp_path: Path
) -> None:
    policy = load_policy(str(write(tmp_path / "int8-attention.yaml", ATTENTION_START)))
    switch = SwitchableCandidate(tiny_model, policy)
    products = {f"transformer_blocks.{i}.attn.product" for i in range(6)} | {"transformer_blocks.0.attn2.product"}
    assert set(switch.shapes) == products  # the policy quantizes no linear layer
    assert {g.name for g in linear_groups(switch.shapes, "type")} == {"attn.product", "attn2.product"}
    gen = Generation(height=32, width=32, steps=2, guidance=4.5, batch_size=1)
    batch = [Sample(Case("a", "a red cube", (0,)), 0)]
    everything, nothing = switch.variant("all", set(switch.shapes)), switch.variant("none", set())
    everything.activate()
    assert torch.equal(
        generate(everything.pipeline, batch, gen),
        generate(build_candidate(tiny_model, policy, gen).pipeline, batch, gen),
    )
    nothing.activate()
    assert torch.equal(generate(nothing.pipeline, batch, gen), generate(tiny_model.pipeline, batch, gen))

    # A search that keeps block 5 writes a policy whose attention rules put block 5 back in bf16.
    groups = {g.name: g for g in linear_groups(switch.shapes, "block")}
    kept = [GroupSensitivity("transformer_blocks.5", 0, 20.0, 40.0)]
    result = Sweep(tmp_path, list(groups.values()), kept, 30.0, switch)
    found = write(tmp_path / "found.yaml", policy_yaml(policy, "found", kept, groups, "block", "psnr", result, 40, 1))
    attention = load_policy(str(found)).components["transformer"].attention
    plan = {a.name: a.precision for a in resolve_attention(attention, tiny_model.pipeline.transformer, str(found))}
    assert plan.pop("transformer_blocks.5.attn") == "bf16"
    assert set(plan.values()) == {"int8"}
