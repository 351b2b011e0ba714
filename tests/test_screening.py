"""Screening: every sample's step error before any candidate image, --fail-fast after it, images of a
subset of the suite, and a resume after screening (tiny model, the light smoke suite with step error)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from evals.cli import main
from evals.fail_fast import settled_by_screening
from evals.gates import GateResult
from evals.suite import load_suite
from evals.suite_types import GateSpec
from tests.conftest import TEST_SUITES, write

FAST = ["--no-progress", "--no-mlflow"]
SCREENED = (
    (TEST_SUITES / "smoke.yaml")
    .read_text()
    .replace("batch_size: 4", "batch_size: 2")
    .replace("metrics: [psnr, ssim]", "metrics: [psnr, ssim, step_error]\nmetric_options: {step_error: {steps: 2}}")
)
STEP_GATE = '  - {metric: step_error, stat: mean, op: "<=", value: 0.5}\n'
SAMPLES = 16


def screened_suite(folder: Path, gate: str = STEP_GATE, extra: str = "") -> Path:
    return write(folder / "screened.yaml", SCREENED + gate + extra)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def only_run(workdir: Path) -> Path:
    (run_dir,) = (workdir / "runs").iterdir()
    return run_dir


class Events:
    """What the runner did, in order: `reference`/`candidate` generation calls and `screen` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, crash_at: str | None = None):
        import evals.runner
        from evals.step_error.in_run import StepErrorRun

        self.seen: list[str] = []
        generate, score = evals.runner.generate, StepErrorRun.score

        def generating(pipe, batch, gen):  # type: ignore[no-untyped-def]
            kind = "candidate" if self._candidate(pipe) else "reference"
            self.seen.append(kind)
            if kind == crash_at:
                raise RuntimeError("simulated crash")
            return generate(pipe, batch, gen)

        def scoring(run, cand, traj):  # type: ignore[no-untyped-def]
            self.seen.append("screen")
            return score(run, cand, traj)

        self.reference: object | None = None
        monkeypatch.setattr(evals.runner, "generate", generating)
        monkeypatch.setattr(StepErrorRun, "score", scoring)

    def _candidate(self, pipe: object) -> bool:
        if self.reference is None:  # the first pipeline to generate is the reference's
            self.reference = pipe
        return pipe is not self.reference


def test_every_sample_is_screened_before_any_candidate_image(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = Events(monkeypatch)
    assert main(["run", str(screened_suite(workdir)), *FAST]) == 0
    first_image = events.seen.index("candidate")
    assert events.seen.count("screen") == 8 and "screen" not in events.seen[first_image:]  # 8 batches
    assert events.seen.count("reference") == 8  # the references made for screening serve the images too
    run_dir = only_run(workdir)
    screened = {line["sample_id"]: line for line in lines(run_dir / "screening.jsonl")}
    records = lines(run_dir / "records.jsonl")
    assert len(screened) == len(records) == SAMPLES
    for record in records:  # each record carries its sample's screening, as it was written
        line = screened[record["sample_id"]]
        assert record["metrics"]["step_error"] == line["step_error"] and record["steps"] == line["steps"]
        assert math.isclose(line["step_error"], sum(line["steps"]["error"]) / 2, rel_tol=1e-6)  # float32 mean
    summary = json.loads((run_dir / "summary.json").read_text())["policies"]["fp8-e4m3-rowwise"]
    assert summary["screened"] == summary["n"] == SAMPLES
    assert "Step error was screened on all 16 samples" in (run_dir / "summary.md").read_text()


def test_fail_fast_stops_a_candidate_after_screening_before_any_image(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mean never stops a candidate while images come in; once every sample is screened, a failed
    step-error mean is final, and with --fail-fast no image of that candidate is made."""
    strict = '  - {metric: step_error, stat: mean, op: "<=", value: 0.001}\n'
    events = Events(monkeypatch)
    assert main(["run", str(screened_suite(workdir, strict)), *FAST, "--fail-fast"]) == 1
    assert "candidate" not in events.seen and events.seen.count("screen") == 8
    run_dir = only_run(workdir)
    assert lines(run_dir / "records.jsonl") == [] and not (run_dir / "images" / "fp8-e4m3-rowwise").exists()
    assert len(lines(run_dir / "screening.jsonl")) == SAMPLES
    verdict = json.loads((run_dir / "verdict.json").read_text())
    status = {r["gate"]: r["status"] for r in verdict["results"]}
    assert status.pop("step_error mean <= 0.001") == "fail" and not verdict["passed"]
    assert set(status.values()) == {"not evaluated"}  # image gates: no images to judge
    psnr = next(r for r in verdict["results"] if r["gate"] == "psnr mean >= 30")
    assert "no images" in psnr["reason"]
    notes = json.loads((run_dir / "notes.json").read_text())
    assert any("stopped after screening 16 of 16 samples, before any image (--fail-fast)" in n for n in notes)
    summary_md = (run_dir / "summary.md").read_text()
    assert "fp8-e4m3-rowwise: no images, step error of 16" in summary_md
    assert "no images, step error of 16" in (run_dir / "report.html").read_text()


def test_without_fail_fast_a_failed_screening_still_generates_every_image(workdir: Path) -> None:
    strict = '  - {metric: step_error, stat: mean, op: "<=", value: 0.001}\n'
    assert main(["run", str(screened_suite(workdir, strict)), *FAST]) == 1
    assert len(lines(only_run(workdir) / "records.jsonl")) == SAMPLES


MEAN = GateSpec("mean", "<=", 0.1, metric="step_error")
AGAINST_BASELINE = GateSpec("mean", "<=", 0.02, metric="step_error", baseline=("max_rel_drop", 0.02))
LAYERS = GateSpec("value", "<=", 1.5, layers="max_ratio")
WARN = GateSpec("mean", "<=", 0.1, metric="step_error", severity="warn")


@pytest.mark.parametrize(
    ("result", "settled"),
    [
        (GateResult("c", MEAN, 0.2, False, "above"), True),  # a mean of every sample is final
        (GateResult("c", MEAN, 0.05, True, ""), False),
        (GateResult("c", AGAINST_BASELINE, 0.2, False, "no baseline"), False),  # known before the run
        (GateResult("c", AGAINST_BASELINE, 0.2, False, "drop", baseline=0.1), True),
        (GateResult("c", LAYERS, math.nan, False, "no profile"), False),
        (GateResult("c", LAYERS, 3.0, False, "ratio"), True),
        (GateResult("c", WARN, 1.0, False, "above"), False),
    ],
)
def test_which_step_error_failures_screening_settles(result: GateResult, settled: bool) -> None:
    assert settled_by_screening(result) is settled


def test_images_of_a_subset(workdir: Path) -> None:
    """`images: {sample: 6}` (batches of 2): three whole batches, of three different first tags, the
    same on every load; every sample still screened; the reports say what has no image."""
    path = screened_suite(workdir, extra="images: {sample: 6}\n")
    suite = load_suite(path)
    chosen = suite.image_batches()
    assert chosen == load_suite(path).image_batches() and sum(map(len, chosen)) == 6
    assert len({b[0].case.tags[0] for b in chosen}) == 3 and all(b in suite.batches() for b in chosen)
    assert main(["run", str(path), *FAST]) == 0
    run_dir = only_run(workdir)
    ids = [s.id for b in chosen for s in b]
    assert sorted(r["sample_id"] for r in lines(run_dir / "records.jsonl")) == sorted(ids)
    assert len(lines(run_dir / "screening.jsonl")) == SAMPLES
    run = json.loads((run_dir / "run.json").read_text())
    assert run["images"] == {"requested": 6, "samples": ids}
    summary = json.loads((run_dir / "summary.json").read_text())["policies"]["fp8-e4m3-rowwise"]
    assert summary["n"] == 6 and summary["screened"] == SAMPLES
    wording = "Candidate images were generated for 6 of 16 samples only"
    assert wording in (run_dir / "summary.md").read_text() and wording in (run_dir / "report.html").read_text()
    assert len(list((run_dir / "images" / "fp8-e4m3-rowwise").iterdir())) == 6


def test_more_images_than_samples_is_an_input_error(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = screened_suite(workdir, extra="images: {sample: 17}\n")
    assert main(["run", str(path), *FAST]) == 2
    err = capsys.readouterr().err
    assert "screened.yaml" in err and "images.sample" in err and "16 samples" in err
    assert not (workdir / "runs").exists() or not any((workdir / "runs").iterdir())


def test_a_resume_after_screening_screens_nothing_again(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed at its first candidate image: screening is on disk, and the resume only makes images
    (and screens again just the line that was torn); the records equal an uninterrupted run's."""
    path = screened_suite(workdir)
    with monkeypatch.context() as patch:
        Events(patch, crash_at="candidate")
        assert main(["run", str(path), *FAST, "--no-cache"]) == 3
    run_dir = only_run(workdir)
    screening = run_dir / "screening.jsonl"
    assert len(lines(screening)) == SAMPLES and lines(run_dir / "records.jsonl") == []
    torn = screening.read_text().splitlines()
    screening.write_text("\n".join(torn[:-1]) + "\n" + torn[-1][:40] + "\n")  # the last line cut short
    with monkeypatch.context() as patch:
        events = Events(patch)
        assert main(["run", "--resume", str(run_dir), *FAST, "--no-cache"]) == 0
    assert events.seen.count("screen") == 1  # the torn line's batch only
    assert "screening.jsonl:16: dropped, screened again" in capsys.readouterr().err
    resumed = {r["sample_id"]: r["metrics"] for r in lines(run_dir / "records.jsonl")}
    assert len(lines(screening)) == SAMPLES
    assert main(["run", str(path), *FAST, "--no-cache"]) == 0
    whole = next(p for p in (workdir / "runs").iterdir() if p != run_dir)
    assert resumed == {r["sample_id"]: r["metrics"] for r in lines(whole / "records.jsonl")}


def test_screening_answers_the_candidates_first_step_exactly(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The candidate's first step in its own generation has the reference's very inputs: screening's
    output there, given back, makes the same images; wrong inputs are not answered; a wrong answer
    to the right inputs shows in the images (the answer is really used)."""
    import torch

    from evals.candidates import build_candidate
    from evals.generation import generate
    from evals.models.precision import load_policy
    from evals.step_error.trajectory import answered_first, recording, step_inputs, teacher_forced
    from evals.suite_types import Case, Generation, Sample

    gen = Generation(height=64, width=64, steps=4, guidance=4.5, batch_size=2, max_sequence_length=8)
    batch = [Sample(Case("a", "a red circle", (0,)), 0), Sample(Case("b", "a calm lake", (1,)), 1)]
    with recording(tiny_model.pipeline.transformer, (0, 2), gen.guidance, len(batch)) as recorded:
        generate(tiny_model.pipeline, batch, gen)
    traj = recorded[0]
    cand = build_candidate(tiny_model, load_policy("fp8-e4m3-rowwise"), gen).pipeline
    errors = teacher_forced(cand.transformer, traj)
    assert errors.first is not None
    plain = generate(cand, batch, gen)
    inputs = step_inputs(traj, 0, "cpu")
    with answered_first(cand.transformer, inputs, errors.first):
        assert torch.equal(generate(cand, batch, gen), plain)
    assert "forward" not in cand.transformer.__dict__  # put back as it was
    wrong = dict(inputs, hidden_states=inputs["hidden_states"] + 1)
    with answered_first(cand.transformer, wrong, torch.zeros_like(errors.first)):
        assert torch.equal(generate(cand, batch, gen), plain)
    with answered_first(cand.transformer, inputs, torch.zeros_like(errors.first)):
        assert not torch.equal(generate(cand, batch, gen), plain)


def test_a_broken_layer_stops_a_candidate_after_its_first_screened_batch(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layers gate is settled once the profile is made, on the candidate's first batch: no further
    batch is screened and no image made. (A bound of 0.001 reads every FP8 layer as broken.)"""
    gate = '  - {layers: max_error, op: "<=", value: 0.001}\n'
    events = Events(monkeypatch)
    assert main(["run", str(screened_suite(workdir, STEP_GATE + gate)), *FAST, "--fail-fast"]) == 1
    assert events.seen.count("screen") == 1 and "candidate" not in events.seen
    run_dir = only_run(workdir)
    notes = json.loads((run_dir / "notes.json").read_text())
    assert any("stopped after screening 2 of 16 samples" in n and "max_error value <= 0.001" in n for n in notes)
    layers = json.loads((run_dir / "summary.json").read_text())["policies"]["fp8-e4m3-rowwise"]["layers"]
    profile = json.loads((run_dir / "layers" / "fp8-e4m3-rowwise.json").read_text())["errors"]
    assert layers == {"max_error": max(profile.values())}  # no baseline profile: no max_ratio
    assert json.loads((run_dir / "locate.json").read_text())["fp8-e4m3-rowwise"]["error"] == layers["max_error"]
