"""In-house builds as candidates: a policy file's `factory: module:function` builds the candidate
from the reference; it is gated beside the other candidates of the run, and a broken one fails."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from evals.cli import main
from evals.models.precision import load_policy
from tests.conftest import TEST_SUITES, write

BUILDS = '''
import copy

import torch


def blocks_in_bfloat16(reference):
    """An in-house build: the transformer blocks' linear weights rounded to bfloat16 and back."""
    transformer = copy.deepcopy(reference.transformer)
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks"):
            module.weight.data = module.weight.data.bfloat16().float()
    return transformer


def whole_pipeline(reference):
    """A build that returns a whole pipeline (its own transformer, the rest shared)."""
    return type(reference)(**dict(reference.components, transformer=blocks_in_bfloat16(reference)))


def sign_bug(reference):
    """A broken build: one projection's sign flipped, as a bad kernel would."""
    transformer = copy.deepcopy(reference.transformer)
    transformer.proj_out.weight.data.neg_()
    return transformer


def in_place(reference):
    return reference.transformer


def not_a_model(reference):
    return 42
'''


def factory_policy(folder: Path, name: str, function: str) -> Path:
    return write(folder / f"{name}.yaml", f"name: {name}\ndescription: in-house\nfactory: inhouse_builds:{function}\n")


@pytest.fixture
def builds(tmp_path: Path) -> Iterator[Path]:
    """A folder with the builds module; each test imports its own copy."""
    folder = tmp_path / "builds"
    write(folder / "inhouse_builds.py", BUILDS)
    sys.modules.pop("inhouse_builds", None)
    yield folder
    sys.modules.pop("inhouse_builds", None)


def test_factory_builds_are_gated_side_by_side_and_a_broken_one_fails(
    workdir: Path, builds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = [
        str(factory_policy(builds, "inhouse-bf16", "blocks_in_bfloat16")),
        str(factory_policy(builds, "inhouse-pipeline", "whole_pipeline")),
        str(factory_policy(builds, "inhouse-sign-bug", "sign_bug")),
    ]
    args = ["run", str(TEST_SUITES / "smoke.yaml"), "--no-progress", "--no-mlflow"]
    assert main(args + [a for p in policies for a in ("--policy", p)]) == 1
    out = capsys.readouterr().out
    (run_dir,) = (workdir / "runs").iterdir()
    verdict = json.loads((run_dir / "verdict.json").read_text())
    failed = {g["policy"] for g in verdict["results"] if g["status"] == "fail"}
    assert failed == {"inhouse-sign-bug"}, out
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == 48
    summary = json.loads((run_dir / "summary.json").read_text())["policies"]
    # both spellings of one build make the same images
    assert summary["inhouse-bf16"]["metrics"]["psnr"] == summary["inhouse-pipeline"]["metrics"]["psnr"]
    plan = json.loads((run_dir / "plans" / "inhouse-bf16.json").read_text())
    assert len(plan) == 92 and {layer["rule"] for layer in plan} == {"factory inhouse_builds:blocks_in_bfloat16"}
    for policy in ("inhouse-bf16", "inhouse-sign-bug"):
        assert f">{policy}<" in (run_dir / "report.html").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("factory: inhouse_builds:in_place\n", "returned the reference's own transformer"),
        ("factory: inhouse_builds:not_a_model\n", "returned int; expected a pipeline or a transformer"),
        ("factory: inhouse_builds:absent\n", "inhouse_builds has no function 'absent'"),
        ("factory: no_such_module:build\n", "cannot import 'no_such_module'"),
        ("factory: inhouse_builds\n", "factory 'inhouse_builds' must match"),
        ("factory: inhouse_builds:in_place\ncomponents: {vae: {dtype: float32}}\n", "either `components` or"),
        ("description: neither\n", "either `components` or a `factory`"),
    ],
)
def test_a_factory_that_cannot_build_is_exit_2_naming_the_policy(
    workdir: Path, builds: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    policy = write(builds / "bad.yaml", "name: bad\n" + text)
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), "--policy", str(policy), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert str(policy) in err and message in err, err
    assert not (workdir / "runs").exists()


def test_a_changed_build_is_another_candidate(builds: Path, tiny_model) -> None:
    """The factory module's source joins the policy's hash: a resume refuses a build that changed."""
    from evals.candidates import build_candidate
    from evals.suite_types import Generation

    gen = Generation(64, 64, 2, 4.5, 2, max_sequence_length=8)
    policy = load_policy(str(factory_policy(builds, "inhouse", "sign_bug")))
    first = build_candidate(tiny_model, policy, gen).policy_sha256
    assert build_candidate(tiny_model, policy, gen).policy_sha256 == first
    source = builds / "inhouse_builds.py"
    source.write_text(source.read_text() + "\n# a change\n")
    sys.modules.pop("inhouse_builds", None)
    importlib.invalidate_caches()
    assert build_candidate(tiny_model, policy, gen).policy_sha256 != first
