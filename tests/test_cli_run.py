"""`evals run` end to end on the tiny model: verdicts, exit codes, the run directory, MLflow."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import evals.models.precision
from evals.cli import main
from evals.rundir import save_png
from tests.conftest import TEST_SUITES, write

SMOKE = str(TEST_SUITES / "smoke.yaml")
FAST = ["--no-progress", "--no-mlflow"]


def only_run_dir(workdir: Path) -> Path:
    (run_dir,) = (workdir / "runs").iterdir()
    return run_dir


def test_smoke_passes_logs_to_mlflow_and_reuses_the_reference(
    workdir: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    capsys = capfd  # MLflow's log handler writes to the process's stderr, not sys.stderr
    assert main(["run", SMOKE, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "verdict: PASSED" in out and "psnr" in out and "reference images generated: 16" in out
    assert "time: startup " in out and "; beside generation: metrics " in out
    assert "review it with `" in out and "`mlflow ui`" not in out
    assert " INFO mlflow" not in err  # MLflow's INFO lines would cut through the progress bar

    run_dir = only_run_dir(workdir)
    timings = json.loads((run_dir / "timings.json").read_text())
    steps = ("startup", "startup.model", "startup.candidates", "startup.mlflow", "generation", "waiting", "finishing")
    assert {*steps, "metrics", "detectors", "writing"} <= set(timings)
    finishing = ("finishing.summary", "finishing.reports", "finishing.mlflow")
    # Each figure is rounded to the millisecond on its own: the steps' sum may pass the whole by 1.5 ms.
    assert timings["finishing"] + 0.0015 >= sum(timings[k] for k in finishing) > 0
    assert timings["startup"] >= timings["startup.model"] + timings["startup.candidates"] > 0
    # A later run in the same process counts its start-up from its own call, not the process's start.
    assert main(["run", SMOKE, "--no-progress", "--no-mlflow", "--runs-dir", "again"]) == 0
    (again,) = (workdir / "again").iterdir()
    again_timings = json.loads((again / "timings.json").read_text())
    assert again_timings["startup"] < again_timings["startup.model"] + again_timings["startup.candidates"] + 5
    for name in (
        "run.json",
        "records.jsonl",
        "summary.json",
        "verdict.json",
        "summary.md",
        "plans/fp8-e4m3-rowwise.json",
    ):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == 16 and {r["policy"] for r in records} == {"fp8-e4m3-rowwise"}
    assert all((run_dir / r["image"]).is_file() and (run_dir / r["reference_image"]).is_file() for r in records)
    assert all(15 < r["metrics"]["psnr"] < 100 for r in records)  # quantized, so not identical, and close
    run = json.loads((run_dir / "run.json").read_text())
    assert run["policies"][0]["backends"].startswith("keep:7,scaled_mm:")
    assert run["reference_dtype"] == "float32"  # "auto" resolved on the CPU

    # MLflow's default local store, in the working directory.
    from mlflow import MlflowClient

    assert (workdir / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    # A review page: runs first (not MLflow's GenAI pages), names and metrics that say the verdict.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name == "smoke: PASS (1 candidate)"
    assert child.info.run_name == "fp8-e4m3-rowwise: pass" and child.data.tags["verdict"] == "pass"
    assert parent.data.metrics["fp8-e4m3-rowwise/psnr_mean"] == pytest.approx(child.data.metrics["psnr_mean"], abs=1e-4)
    assert parent.data.metrics["fp8-e4m3-rowwise/gates_failed"] == 0 and parent.data.metrics["passed"] == 1
    assert parent.data.tags["suite"] == "smoke" and child.data.tags["suite"] == "smoke"
    view = json.loads(experiment.tags["mlflow.sharedViewState.evals-review"])
    assert "metrics.`fp8-e4m3-rowwise/psnr_mean`" in view["selectedColumns"]
    assert "tags.`verdict`" in view["selectedColumns"]
    assert child.data.metrics["psnr_mean"] > 30 and child.data.metrics["ssim_mean"] > 0.93
    assert child.data.params["backend"].startswith("keep:7,scaled_mm:")
    assert parent.data.tags["verdict"] == "pass" and parent.info.status == "FINISHED"
    state = json.loads((run_dir / "mlflow.json").read_text())
    assert state["run_id"] == parent.info.run_id and state["complete"] is True
    assert state["candidates"] == {"fp8-e4m3-rowwise": child.info.run_id}
    assert any(k.startswith("system/") for k in parent.data.metrics)  # MLflow's system metrics (psutil)
    child_artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"samples.json", "images", "fp8-e4m3-rowwise.json"} <= child_artifacts
    table = json.loads(Path(client.download_artifacts(child.info.run_id, "samples.json")).read_text())
    assert len(table["data"]) == 16 and "psnr" in table["columns"]
    assert len(client.list_artifacts(child.info.run_id, "images")) >= 16
    assert {"records.jsonl", "verdict.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    # Second run of the same suite: references come from the cache, identical scores; their PNGs are
    # the cache's files, copied: only the 16 candidate images are encoded.
    encoded = []
    monkeypatch.setattr("evals.runner.save_png", lambda path, image: encoded.append(path) or save_png(path, image))
    assert main(["run", SMOKE, *FAST]) == 0
    assert "reference images generated: 0" in capsys.readouterr().out
    second = max((workdir / "runs").iterdir())
    again = [json.loads(line) for line in (second / "records.jsonl").read_text().splitlines()]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in records]
    assert len(encoded) == 16 and all(p.parent.name == "fp8-e4m3-rowwise" for p in encoded)
    references = sorted((run_dir / "images" / "ref").iterdir())
    assert len(references) == 16
    assert all((second / "images" / "ref" / p.name).read_bytes() == p.read_bytes() for p in references)


def test_wrong_scales_fail_the_psnr_gate(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deliberately broken candidate: every weight scale off by 30%."""
    original = evals.models.precision.apply_policy

    def broken_scales(policy, components, input_amax=None):
        out, plan = original(policy, components, input_amax)
        for module in out["transformer"].modules():
            if hasattr(module, "weight_scale"):
                module.weight_scale.mul_(1.3)
        return out, plan

    monkeypatch.setattr(evals.models.precision, "apply_policy", broken_scales)
    monkeypatch.setattr("evals.candidates.apply_policy", broken_scales)
    assert main(["run", SMOKE, *FAST]) == 1
    out = capsys.readouterr().out
    assert "verdict: FAILED" in out
    failing = [line for line in out.splitlines() if line.endswith("FAIL")]
    assert failing and all(line.split()[1] in ("psnr", "ssim") for line in failing)
    verdict = json.loads((only_run_dir(workdir) / "verdict.json").read_text())
    assert not verdict["passed"] and any(r["subject"] == "psnr" and not r["passed"] for r in verdict["results"])


def test_nan_in_the_candidate_vae_is_caught_before_8_bit(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = evals.models.precision.apply_policy

    def nan_vae(policy, components, input_amax=None):
        out, plan = original(policy, components, input_amax)
        vae = copy.deepcopy(out["vae"])
        with torch.no_grad():
            vae.decoder.conv_out.bias[0] = float("nan")
        out["vae"] = vae
        return out, plan

    monkeypatch.setattr("evals.candidates.apply_policy", nan_vae)
    assert main(["run", SMOKE, *FAST]) == 1
    run_dir = only_run_dir(workdir)
    results = {r["subject"]: r for r in json.loads((run_dir / "verdict.json").read_text())["results"]}
    assert not results["nonfinite"]["passed"] and results["nonfinite"]["actual"] == 16
    summary = json.loads((run_dir / "summary.json").read_text())["policies"]["fp8-e4m3-rowwise"]
    assert summary["reference_detectors"]["nonfinite"]["count"] == 0  # the reference is fine
    record = json.loads((run_dir / "records.jsonl").read_text().splitlines()[0])
    assert "NaN" in record["detectors"]["nonfinite"]["reason"]


def test_several_candidates_share_one_reference(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e5m2 = write(
        workdir / "e5m2.yaml",
        (Path(evals.models.precision.POLICY_DIR) / "fp8-e4m3-rowwise.yaml")
        .read_text()
        .replace("name: fp8-e4m3-rowwise", "name: e5m2-tensor")
        .replace("format: e4m3fn, weights: per_channel", "format: e5m2, weights: per_tensor"),
    )
    code = main(["run", SMOKE, *FAST, "--policy", "fp8-e4m3-rowwise", "--policy", str(e5m2)])
    out = capsys.readouterr().out
    assert "reference images generated: 16" in out and "candidate images: 32" in out
    run_dir = only_run_dir(workdir)
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    by_policy = {p: [r for r in records if r["policy"] == p] for p in ("fp8-e4m3-rowwise", "e5m2-tensor")}
    assert all(len(v) == 16 for v in by_policy.values())
    assert {r["reference_image"] for r in by_policy["e5m2-tensor"]} == {
        r["reference_image"] for r in by_policy["fp8-e4m3-rowwise"]
    }
    mean = lambda p: sum(r["metrics"]["psnr"] for r in by_policy[p]) / 16  # noqa: E731
    assert mean("fp8-e4m3-rowwise") > mean("e5m2-tensor")  # 3 mantissa bits beat 2
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert {r["policy"] for r in verdict["results"]} == {"fp8-e4m3-rowwise", "e5m2-tensor"}
    assert code == (0 if verdict["passed"] else 1)


BAD_INPUTS = [
    ("suite: unknown key", "suite", ("name: smoke", "name: smoke\nmodle: tiny"), "did you mean 'model'"),
    ("suite: gate on an unknown metric", "suite", ("metric: psnr, stat: mean", "metric: lpipz, stat: mean"), "lpipz"),
    ("suite: wrong type", "suite", ("steps: 4", "steps: four"), "generation.steps"),
    ("policy: unknown key", "policy", ("default: {", "defaults: {"), "did you mean 'default'"),
    ("policy: rule matching nothing", "policy", ('"proj_out"', '"proj_outt"'), "matches no module"),
    ("policy: bad format", "policy", ("format: e4m3fn", "format: e4m3"), "did you mean 'e4m3fn'"),
]


@pytest.mark.parametrize(("kind", "edit", "message"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_and_writes_nothing(
    workdir: Path, capsys: pytest.CaptureFixture[str], kind: str, edit: tuple[str, str], message: str
) -> None:
    suite_text = (TEST_SUITES / "smoke.yaml").read_text()
    policy_text = (Path(evals.models.precision.POLICY_DIR) / "fp8-e4m3-rowwise.yaml").read_text()
    if kind == "suite":
        assert edit[0] in suite_text
        suite_text = suite_text.replace(edit[0], edit[1], 1)
    else:
        assert edit[0] in policy_text
        policy_text = policy_text.replace(edit[0], edit[1], 1)
    suite = write(workdir / "in" / "suite.yaml", suite_text)
    policy = write(workdir / "in" / "policy.yaml", policy_text)
    assert main(["run", str(suite), "--policy", str(policy), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(workdir / "in") in err
    assert sorted(p.name for p in workdir.iterdir()) == ["in"]  # no runs/, no mlflow.db, no cache


def test_bad_arguments_exit_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2  # neither a suite nor --resume
    with pytest.raises(SystemExit) as info:
        main(["run", SMOKE, "--no-such-option"])
    assert info.value.code == 2
    assert main(["run", SMOKE, "--device", "tpu", *FAST]) == 2
    assert "--device 'tpu'" in capsys.readouterr().err
    assert main(["run", SMOKE, "--policy", "no-such-policy", *FAST]) == 2
    assert main(["run", SMOKE, "--model", str(workdir / "missing"), *FAST]) == 2
    assert not (workdir / "runs").exists()


def test_validate_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", SMOKE, str(Path(evals.models.precision.POLICY_DIR) / "fp8-e4m3-rowwise.yaml")]) == 0
    assert "16 samples" in capsys.readouterr().out


def test_the_timings_line_puts_steps_beside_their_part() -> None:
    from evals.cli import timings_line

    parts = {"startup": 5.3, "startup.model": 3.9, "generation": 4.7, "waiting": 0.2, "finishing": 0.4}
    parts |= {"finishing.reports": 0.1, "finishing.mlflow": 0.3, "metrics": 3.0, "detectors": 0.2}
    assert timings_line(parts) == (
        "time: startup 5.3 s (model 3.9), generation 4.7 s, waiting 0.2 s, finishing 0.4 s (reports 0.1, mlflow 0.3)"
        "; beside generation: metrics 3.0 s, detectors 0.2 s"
    )
