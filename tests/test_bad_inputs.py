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


DEEP_LISTS = "a: " + "[" * 10000 + "]" * 10000 + "\n"  # PyYAML's composer would recurse 10000 times
DEEP_MAPPINGS = "".join(" " * i + f"k{i}:\n" for i in range(1000)) + " " * 1000 + "v\n"
DETECTORS = "detectors: [black_frame, nonfinite, saturation, flat, stripe_noise, checkerboard]"


def line_of(text: str, fragment: str) -> int:
    return next(i for i, row in enumerate(text.splitlines(), 1) if fragment in row)


def suite_with(old: str, new: str) -> str:
    assert old in SMOKE
    return SMOKE.replace(old, new, 1)


def policy_with(old: str, new: str) -> str:
    assert old in ROWWISE
    return ROWWISE.replace(old, new, 1)


MODEL_LINE, STEPS_LINE, RULES_LINE = (
    line_of(SMOKE, "model: tiny"),
    line_of(SMOKE, "steps: 4"),
    line_of(ROWWISE, "rules:"),
)

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
        "must match ^[a-z0-9][a-z0-9_.-]{0,63}$ (lower-case letters",
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
    # numbers are finite and in range (checked before anything is loaded)
    (
        "guidance NaN",
        suite_with("guidance: 4.5", "guidance: .nan"),
        None,
        [],
        "guidance: expected a finite number, got nan",
    ),
    ("guidance infinite", suite_with("guidance: 4.5", "guidance: .inf"), None, [], "expected a finite number, got inf"),
    (
        "guidance too large",
        suite_with("guidance: 4.5", "guidance: 1000.5"),
        None,
        [],
        "expected a number <= 100, got 1000.5",
    ),
    (
        "gate value NaN",
        suite_with('op: ">=", value: 30}', 'op: ">=", value: .nan}'),
        None,
        [],
        "gates[0].value: expected a finite number, got nan",
    ),
    (
        "baseline drop -inf",
        suite_with('op: ">=", value: 30}', "baseline: {max_drop: -.inf}}"),
        None,
        [],
        "gates[0].baseline.max_drop: expected a finite number, got -inf",
    ),
    (
        "seed past 2**64-1",
        suite_with("seeds: [0, 1]", "seeds: [0, 18446744073709551616]"),
        None,
        [],
        "seeds[1]: expected an integer <= 18446744073709551615, got 18446744073709551616",
    ),
    (
        "case seed past 2**64-1",
        suite_with("tags: [objects]}", "tags: [objects], seeds: [99999999999999999999999]}"),
        None,
        [],
        "cases[0].seeds[0]: expected an integer <= 18446744073709551615",
    ),
    ("huge height", suite_with("height: 64", "height: 1048576"), None, [], "height: expected an integer <= 8192"),
    ("a million steps", suite_with("steps: 4", "steps: 1000000"), None, [], "steps: expected an integer <= 1000"),
    (
        "huge batch",
        suite_with("batch_size: 4", "batch_size: 100000"),
        None,
        [],
        "batch_size: expected an integer <= 1024",
    ),
    (
        "T5 budget past 512",
        suite_with("max_sequence_length: 8", "max_sequence_length: 4096"),
        None,
        [],
        "max_sequence_length: expected an integer <= 512",
    ),
    (
        "bench iterations",
        suite_with("gates:", "bench: {iters: 100000000}\ngates:"),
        None,
        [],
        "bench.iters: expected an integer <= 1000",
    ),
    (
        "detector threshold NaN",
        suite_with(DETECTORS, DETECTORS + "\ndetector_thresholds: {stripe_noise: {min_z: .nan}}"),
        None,
        [],
        "detector_thresholds.stripe_noise.min_z: expected a finite number, got nan",
    ),
    (
        "detector threshold out of range",
        suite_with(DETECTORS, DETECTORS + "\ndetector_thresholds: {flat: {min_range: 255}}"),
        None,
        [],
        "detector_thresholds.flat.min_range: expected a number <= 1, got 255",
    ),
    (
        "detector period not an integer",
        suite_with(DETECTORS, DETECTORS + "\ndetector_thresholds: {stripe_noise: {max_period: 1.0e+300}}"),
        None,
        [],
        "max_period: expected an integer, got float 1e+300",
    ),
    (
        "policy calibration seed too large",
        None,
        policy_with("components:", "calibration: {seed: 18446744073709551615}\ncomponents:"),
        [],
        "calibration.seed: expected an integer <= 18446744073709551600",
    ),
    (
        "policy calibration prompts NaN",
        None,
        policy_with("components:", "calibration: {prompts: .nan}\ncomponents:"),
        [],
        "calibration.prompts: expected an integer, got float nan",
    ),
    (
        "policy block size too large",
        None,
        policy_with("weights: per_channel", "weights: per_block, block_size: 1048576"),
        [],
        "default.block_size: expected an integer <= 4096, got 1048576",
    ),
    # a key given twice is an error, not the last value
    (
        "duplicate key in a suite",
        suite_with("model: tiny", "model: tiny\nmodel: random:sd35-large"),
        None,
        [],
        f":{MODEL_LINE + 1}: duplicate key 'model' (first at line {MODEL_LINE})",
    ),
    (
        "duplicate key in a flow mapping",
        suite_with("steps: 4", "steps: 4, steps: 40"),
        None,
        [],
        f":{STEPS_LINE}: generation: duplicate key 'steps' (first at line {STEPS_LINE})",
    ),
    (
        "duplicate key in a policy",
        None,
        policy_with("    rules:", "    rules: []\n    rules:"),
        [],
        f":{RULES_LINE + 1}: components.transformer: duplicate key 'rules' (first at line {RULES_LINE})",
    ),
    # deep nesting is refused before PyYAML's composer recurses into it
    ("deeply nested lists", suite_with("model: tiny", DEEP_LISTS.strip()), None, [], "nested more than 32 levels"),
    ("deeply nested mappings", DEEP_MAPPINGS, None, [], "suite.yaml:33: YAML nested more than 32 levels deep"),
    ("deeply nested policy", None, "name: p\n" + DEEP_LISTS, [], "policy.yaml:2: YAML nested more than 32 levels"),
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
