"""Committed baselines: `evals baseline update`, the files it writes, and how runs find them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals import baselines
from evals.api import CheckpointArg
from evals.cli import main
from evals.gates import evaluate_gates
from evals.models.yamlspec import InputError
from evals.records import PolicySummary, RecordsWriter, SampleRecord, summarize, summary_to_json
from evals.suite_types import GateSpec
from tests.conftest import SUITES, write

SUITE = """name: mini
model: tiny
generation: {height: 64, width: 64, steps: 2, guidance: 4.5, batch_size: 2}
cases:
  - {id: a, prompt: "a red circle", seeds: [0]}
metrics: [psnr]
gates:
  - {metric: psnr, stat: mean, baseline: {max_drop: 1.0}}
"""


def record(policy: str, sample_id: str, psnr: float) -> SampleRecord:
    return SampleRecord(
        policy,
        sample_id,
        "a",
        "a red circle",
        0,
        (),
        {"psnr": psnr},
        {},
        {},
        f"images/{policy}/{sample_id}.png",
        f"images/ref/{sample_id}.png",
        0.1,
    )


def fake_run(tmp_path: Path, results: dict[str, tuple[float, bool]], device: str = "cpu") -> Path:
    """A finished run directory as `evals run` leaves it: run.json, summary.json, verdict.json."""
    suite = write(tmp_path / "suites" / "mini.yaml", SUITE)
    from evals.suite import load_suite

    loaded = load_suite(suite)
    run = tmp_path / "runs" / "20261129T000000Z-mini"
    summaries = {p: PolicySummary(n=2, metrics={"psnr": {"mean": v, "min": v - 3}}) for p, (v, _) in results.items()}
    write(run / "summary.json", summary_to_json(summaries))
    with RecordsWriter(run / "records.jsonl") as writer:
        for policy, (value, _) in results.items():
            for sample_id, psnr in (("a-s0", value - 3), ("a-s1", value + 3)):
                writer.write(record(policy, sample_id, psnr))
    gate = {"status": "", "policy": ""}
    verdict = [{**gate, "policy": p, "status": "pass" if ok else "fail"} for p, (_, ok) in results.items()]
    write(run / "verdict.json", json.dumps({"passed": all(ok for _, ok in results.values()), "results": verdict}))
    info = {
        "suite": {"name": "mini", "path": str(suite), "sha256": loaded.sha256},
        "model": {"source": "tiny", "fingerprint": "tiny-sd3-v2:trained:x"},
        "reference_dtype": "float32",
        "policies": [{"name": p} for p in results] + [{"name": "noise-floor", "noise_floor": "batch"}],
        "environment": {"device": device, "torch": "2.14.1"},
        "git_commit": "abc",
    }
    write(run / "run.json", json.dumps(info))
    return run


def test_update_writes_one_file_per_policy_and_platform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path, {"fp8-a": (33.0, True), "fp8-b": (35.0, True)})
    assert main(["baseline", "update", str(run), "--no-jitter"]) == 0
    folder = tmp_path / "suites" / "baselines" / "mini"
    assert sorted(p.name for p in folder.iterdir()) == ["fp8-a.json", "fp8-b.json"]
    entry = json.loads((folder / "fp8-a.json").read_text())["platforms"]["cpu-float32"]
    assert entry["metrics"]["psnr_mean"] == 33.0 and entry["git_commit"] == "abc"
    assert "noise-floor" not in capsys.readouterr().out
    loaded = baselines.load_committed(folder, "fp8-a", "cpu-float32")
    assert loaded is not None and loaded.metrics["psnr_min"] == 30.0
    assert loaded.samples == {"psnr": {"a-s0": 30.0, "a-s1": 36.0}}
    assert baselines.load_committed(folder, "fp8-a", "cuda-bfloat16") is None  # another platform: none
    assert baselines.load_committed(folder, "other", "cpu-float32") is None


def test_a_second_update_says_what_it_replaces_and_keeps_other_platforms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["baseline", "update", str(fake_run(tmp_path, {"fp8-a": (33.0, True)}, device="cuda:1")), "--no-jitter"])
    main(["baseline", "update", str(fake_run(tmp_path, {"fp8-a": (33.0, True)})), "--no-jitter"])
    capsys.readouterr()
    assert main(["baseline", "update", str(fake_run(tmp_path, {"fp8-a": (31.5, True)})), "--no-jitter"]) == 0
    out = capsys.readouterr().out
    assert "replaced" in out and "psnr_mean: 33 -> 31.5" in out
    data = json.loads((tmp_path / "suites" / "baselines" / "mini" / "fp8-a.json").read_text())
    assert sorted(data["platforms"]) == ["cpu-float32", "cuda-float32"]
    assert data["platforms"]["cpu-float32"]["metrics"]["psnr_mean"] == 31.5


def test_a_failed_candidate_is_refused_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path, {"fp8-a": (33.0, True), "fp8-bad": (20.0, False)})
    assert main(["baseline", "update", str(run), "--no-jitter"]) == 2
    assert "fp8-bad failed gates" in capsys.readouterr().err
    assert not (tmp_path / "suites" / "baselines").exists()  # nothing written
    assert main(["baseline", "update", str(run), "--policy", "fp8-a", "--no-jitter"]) == 0
    assert main(["baseline", "update", str(run), "--force", "--no-jitter"]) == 0
    assert (tmp_path / "suites" / "baselines" / "mini" / "fp8-bad.json").is_file()


def test_a_run_failing_only_for_want_of_a_baseline_can_make_the_first_one(tmp_path: Path) -> None:
    run = fake_run(tmp_path, {"fp8-a": (33.0, False)})
    verdict = json.loads((run / "verdict.json").read_text())
    verdict["results"] = [{"policy": "fp8-a", "status": "fail", "baseline_gate": True, "baseline": None}]
    (run / "verdict.json").write_text(json.dumps(verdict))
    assert main(["baseline", "update", str(run), "--no-jitter"]) == 0
    verdict["results"][0]["baseline"] = 35.0  # a regression against an existing baseline: refused
    (run / "verdict.json").write_text(json.dumps(verdict))
    assert main(["baseline", "update", str(run), "--no-jitter"]) == 2


def test_update_keeps_the_jitter_measured_against_other_runs_and_gates_never_sit_inside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--jitter-run: the largest move of every figure (and of any one sample) between the accepted run
    and runs under other arithmetic is kept with the baseline; a gate whose tolerance sits inside it
    applies twice the jitter instead, and still fails beyond that."""
    run = fake_run(tmp_path, {"fp8-a": (33.0, True)})
    others = [fake_run(tmp_path / name, {"fp8-a": (value, True)}) for name, value in (("x", 32.0), ("y", 33.25))]
    args = ["baseline", "update", str(run), "--jitter-run", f"machine-x={others[0]}", "--jitter-run", str(others[1])]
    assert main(args) == 0
    folder = tmp_path / "suites" / "baselines" / "mini"
    entry = json.loads((folder / "fp8-a.json").read_text())["platforms"]["cpu-float32"]
    assert entry["jitter"]["metrics"]["psnr_mean"] == 1.0 and entry["jitter"]["per_sample"]["psnr"] == 1.0
    assert entry["jitter"]["variants"] == sorted(["machine-x", str(others[1])])  # the same folder name twice
    loaded = baselines.load_committed(folder, "fp8-a", "cpu-float32")
    assert loaded is not None and loaded.jitter == {
        "jitter:psnr_mean": 1.0,
        "jitter:psnr_min": 1.0,
        "jitter:per_sample:psnr": 1.0,
    }
    gate = GateSpec(stat="mean", op="<=", value=0.5, metric="psnr", baseline=("max_drop", 0.5))
    flat = {**loaded.metrics, **loaded.jitter}
    for value, passes in ((31.1, True), (30.9, False)):  # tolerance 2 x 1.0, not the suite's 0.5
        summary = {"c": PolicySummary(n=1, metrics={"psnr": {"mean": value}})}
        (result,) = evaluate_gates(summary, (gate,), ["c"], baselines={"c": flat}).results
        assert (result.passed, result.tolerance, result.jitter) == (passes, 2.0, 1.0)
    from evals.reports.render import threshold_text

    assert "measured jitter 1" in threshold_text(result.to_dict())
    unmeasured = evaluate_gates(summary, (gate,), ["c"], baselines={"c": loaded.metrics}).results[0]
    assert unmeasured.tolerance == 0.5 and not unmeasured.passed
    assert main([*args, "--jitter-run", str(tmp_path / "nowhere")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["missing", "not json", "wrong version"])
def test_bad_baseline_files_and_run_dirs_are_input_errors(tmp_path: Path, broken: str) -> None:
    if broken == "missing":
        assert main(["baseline", "update", str(tmp_path / "nowhere"), "--no-jitter"]) == 2
        return
    path = tmp_path / "fp8.json"
    path.write_text("{" if broken == "not json" else json.dumps({"version": 99, "platforms": {}}))
    with pytest.raises(InputError, match=str(path)):
        baselines.load_committed(tmp_path, "fp8", "cpu-float32")


def test_shipped_smoke_baselines_cover_every_policy_the_suite_gates() -> None:
    """The CI gate compares with committed files: one per default policy, for the CI platform."""
    from evals.suite import load_suite

    suite = load_suite(SUITES / "smoke.yaml")
    folder = baselines.baselines_folder(suite.path, suite.name, suite.baselines)
    for policy in suite.policies:
        found = baselines.load_committed(folder, policy, "cpu-float32")
        assert found is not None, f"no committed baseline for {policy}"
        assert {"psnr_mean", "psnr_min", "ssim_mean"} <= set(found.metrics)


@pytest.mark.parametrize(
    ("text", "name", "path"),
    [
        ("model.safetensors", None, "model.safetensors"),
        ("mine=model.safetensors", "mine", "model.safetensors"),
        ("dir/a=b.safetensors", None, "dir/a=b.safetensors"),  # a path with '=' in it stays a path
    ],
)
def test_candidate_checkpoints_can_be_named(text: str, name: str | None, path: str) -> None:
    assert CheckpointArg.parse(text) == CheckpointArg(Path(path), name)


def test_a_bad_candidate_name_is_an_input_error() -> None:
    with pytest.raises(InputError, match="must match"):
        CheckpointArg.parse("Bad Name=model.safetensors")


PER_SAMPLE_GATE = GateSpec("per_sample", "<=", 1.0, metric="psnr", baseline=("max_drop", 1.0))


def test_a_per_sample_gate_catches_one_sample_that_moved() -> None:
    """The mean hides a drop in one image; the per-sample gate names it."""
    base = {"psnr": {"a-s0": 30.0, "a-s1": 36.0, "b-s0": 40.0}}
    same = [record("fp8", "a-s0", 30.0), record("fp8", "a-s1", 36.0), record("fp8", "b-s0", 40.0)]
    moved = [record("fp8", "a-s0", 32.5), record("fp8", "a-s1", 36.0), record("fp8", "b-s0", 37.5)]  # mean equal

    def verdict(records: list[SampleRecord], samples: dict | None):
        per_sample = None if samples is None else {"fp8": samples}
        gates = (PER_SAMPLE_GATE,)
        return evaluate_gates(summarize(records), gates, ["fp8"], records=records, baseline_samples=per_sample)

    assert verdict(same, base).passed
    failed = verdict(moved, base)
    assert not failed.passed and failed.results[0].actual == pytest.approx(2.5)
    assert "b-s0" in failed.results[0].reason
    assert not verdict(same, None).passed  # no baseline: fails, never skips
    assert "the suite changed" in verdict(same, {"psnr": {"a-s0": 30.0}}).results[0].reason
    nan = [record("fp8", "a-s0", float("nan")), *same[1:]]
    assert not verdict(nan, base).passed


def test_per_sample_is_only_a_baseline_statistic(tmp_path: Path) -> None:
    from evals.suite import load_suite

    bad = write(tmp_path / "s.yaml", SUITE.replace("baseline: {max_drop: 1.0}", 'op: ">=", value: 1').replace(
        "stat: mean", "stat: per_sample"))  # fmt: skip
    with pytest.raises(InputError, match="per_sample"):
        load_suite(bad)
    good = write(tmp_path / "g.yaml", SUITE.replace("stat: mean", "stat: per_sample"))
    assert load_suite(good).gates[0].stat == "per_sample"


def test_a_layers_gate_reads_the_profile_ratio_and_widens_only_to_its_jitter() -> None:
    """{layers: max_ratio}: no profile to compare with fails (saying why); a sound build's ratio of
    1.27 under eager bf16 kernels passes a 1.5 bound only widened where the jitter says so; past it fails."""
    from evals.gates import NO_PROFILE

    gate = GateSpec(stat="value", op="<=", value=1.2, layers="max_ratio")
    bare = {"c": PolicySummary(n=1)}
    (missing,) = evaluate_gates(bare, (gate,), ["c"]).results
    assert not missing.passed and missing.reason == NO_PROFILE
    for ratio, jitter, passes in ((1.15, None, True), (1.3, None, False), (1.3, 0.27, True), (1.6, 0.27, False)):
        summary = {"c": PolicySummary(n=1, layers={"max_ratio": ratio})}
        base = {} if jitter is None else {"jitter:layers_max_ratio": jitter}
        (result,) = evaluate_gates(summary, (gate,), ["c"], baselines={"c": base}).results
        assert result.passed is passes, (ratio, jitter)
        assert result.tolerance == (None if jitter is None else pytest.approx(1.54))
