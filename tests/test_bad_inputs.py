"""Table of bad inputs: each gets exit code 2, a message naming the problem, and leaves nothing
behind (no run directory, no MLflow store, no cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.cli import main
from tests.conftest import TEST_SUITES, write

SMOKE = (TEST_SUITES / "smoke.yaml").read_text()
ROWWISE = (Path(__file__).resolve().parents[1] / "models" / "policies" / "fp8-e4m3-rowwise.yaml").read_text()
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)


def suite_with(old: str, new: str) -> str:
    assert old in SMOKE
    return SMOKE.replace(old, new, 1)


def policy_with(old: str, new: str) -> str:
    assert old in ROWWISE
    return ROWWISE.replace(old, new, 1)


# (id, suite text or None for smoke, policy text or None for the shipped one, extra CLI args, message)
CASES = [
    ("empty suite", "", None, [], "got empty"),
    ("suite is a list", "- a\n- b\n", None, [], "got list"),
    ("broken YAML", "name: [smoke\n", None, [], "invalid YAML"),
    ("python tag", "name: !!python/object/apply:os.system [ls]\n", None, [], "invalid YAML"),
    ("billion laughs", LAUGHS, None, [], "YAML aliases"),
    ("unknown top-level key", suite_with("name: smoke", "name: smoke\nmodle: tiny"), None, [], "did you mean 'model'"),
    ("steps not an integer", suite_with("steps: 4", "steps: four"), None, [], "generation.steps"),
    ("negative seed", suite_with("seeds: [0, 1]", "seeds: [0, -1]"), None, [], "expected an integer >= 0"),
    ("odd image size", suite_with("height: 64", "height: 65"), None, [], "multiple of 16"),
    ("path-like case id", suite_with("id: red-cube", "id: ../../etc/passwd"), None, [], "must match"),
    ("duplicate case id", suite_with("id: old-man", "id: red-cube"), None, [], "duplicate case id"),
    ("gate on unknown metric", suite_with("metric: psnr, stat: mean", "metric: lpipz, stat: mean"), None, [], "lpipz"),
    ("gate stat for detectors", suite_with("metric: psnr, stat: mean", "metric: psnr, stat: count"), None, [], "count"),
    ("unknown detector", suite_with("flat, stripe", "flatt, stripe"), None, [], "did you mean 'flat'"),
    ("policy typo", None, policy_with("default: {", "defualt: {"), [], "did you mean 'default'"),
    ("policy bad format", None, policy_with("format: e4m3fn", "format: fp8"), [], "unknown value 'fp8'"),
    ("rule matching nothing", None, policy_with('"proj_out"', '"proj_outt"'), [], "matches no module"),
    (
        "policy name with a slash",
        None,
        policy_with("name: fp8-e4m3-rowwise", "name: a/b"),
        [],
        "must match ^[A-Za-z0-9._-]+$ (letters",
    ),
    ("missing model folder", None, None, ["--model", "no/such/folder/here"], "model folder not found"),
    ("model folder without index", None, None, ["--model", "EMPTY_DIR"], "model_index.json"),
    ("pickle checkpoint", None, None, ["--candidate-checkpoint", "PICKLE"], "never pickle"),
    ("garbage safetensors", None, None, ["--candidate-checkpoint", "GARBAGE"], "not a readable safetensors file"),
    ("missing weights file", None, None, ["--weights", "lpips=no-such.pth"], "no such file"),
    ("bad device", None, None, ["--device", "tpu"], "expected auto, cpu, cuda"),
    ("cuda without a GPU", None, None, ["--device", "cuda"], "no CUDA device"),
    ("unknown shipped policy", None, None, ["--policy", "fp8-e4m3-roww1se"], "did you mean 'fp8-e4m3-rowwise'"),
    ("missing suite file", "MISSING", None, [], "suite file not found"),
    ("larger than the model makes", suite_with("height: 64", "height: 512"), None, [], "larger than this model"),
    (
        "two errors in one suite",
        suite_with("steps: 4", "steps: four").replace("psnr, ssim", "psnr, sim"),
        None,
        [],
        "2 errors",
    ),
    (
        "gate tag no case has",
        suite_with('op: ">=", value: 30}', 'op: ">=", value: 30, tags: [drak]}'),
        None,
        [],
        "no case has tag 'drak'",
    ),
    (
        "gate severity unknown",
        suite_with('op: ">=", value: 30}', 'op: ">=", value: 30, severity: fatal}'),
        None,
        [],
        "unknown value 'fatal'",
    ),
    (
        "baseline gate with op",
        suite_with('op: ">=", value: 30}', 'op: ">=", value: 30, baseline: {max_drop: 1}}'),
        None,
        [],
        "a baseline gate has no 'op'",
    ),
    (
        "baseline gate two drops",
        suite_with('op: ">=", value: 30}', "baseline: {max_drop: 1, max_rel_drop: 0.1}}"),
        None,
        [],
        "exactly one of max_drop",
    ),
]


@pytest.mark.parametrize(
    ("suite_text", "policy_text", "extra", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(workdir: Path, capsys: pytest.CaptureFixture[str], suite_text, policy_text, extra, message) -> None:
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    inputs = workdir / "in"
    inputs.mkdir()
    suite = inputs / "suite.yaml"
    if suite_text != "MISSING":
        write(suite, SMOKE if suite_text is None else suite_text)
    args = ["run", str(suite), "--no-progress"]
    if policy_text is not None:
        args += ["--policy", str(write(inputs / "policy.yaml", policy_text))]
    replacements = {
        "EMPTY_DIR": inputs / "empty",
        "PICKLE": inputs / "weights.ckpt",
        "GARBAGE": inputs / "x.safetensors",
    }
    (inputs / "empty").mkdir()
    (inputs / "weights.ckpt").write_bytes(b"\x80\x04K\x01.")  # a pickle
    (inputs / "x.safetensors").write_bytes(b"\x00" * 64)
    args += [str(replacements.get(a, a)) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert sorted(p.name for p in workdir.iterdir()) == ["in"]  # nothing written: no runs/, mlflow.db, cache


def test_at_least_25_bad_inputs() -> None:
    assert len(CASES) >= 25


def test_a_bad_model_adds_nothing_to_an_existing_store(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With ./mlflow.db already there, MLflow is opened while the model loads; a model that fails
    to load still leaves no run in the store and no files beside it."""
    from mlflow import MlflowClient

    from evals.tracking import MlflowTracker, store_exists

    assert not store_exists()
    MlflowTracker()  # creates the default store, ./mlflow.db
    assert store_exists()
    before = sorted(p.name for p in workdir.iterdir())
    (workdir / "empty").mkdir()
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), "--model", str(workdir / "empty"), "--no-progress"]) == 2
    assert "error: " in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == sorted([*before, "empty"])
    client = MlflowClient("sqlite:///mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []


def test_a_suite_name_typo_suggests_the_shipped_suite(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "smoek", "--no-progress"]) == 2
    assert "did you mean 'smoke'" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("command", ["log", "report"])
def test_a_missing_run_directory_is_named(workdir: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    assert main([command, str(workdir / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "no-such-run: no such run directory" in err and "--resume" not in err
    assert main(["run", "--resume", str(workdir / "no-such-run")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert list(workdir.iterdir()) == []
