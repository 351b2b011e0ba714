"""Step error: which steps are recorded, the recorded trajectory against the pipeline's own, the
teacher-forced error against a hand-built transformer call, the cache, and the broken layer named."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from evals.candidates import build_candidate
from evals.generation import generate
from evals.models.precision import load_policy
from evals.step_error.locate import FLOOR, departure
from evals.step_error.profile import profile
from evals.step_error.steps import recorded_steps
from evals.step_error.trajectory import Trajectory, recording, teacher_forced
from evals.suite_types import Case, Generation, Sample

GEN = Generation(height=64, width=64, steps=4, guidance=4.5, batch_size=2, max_sequence_length=8)
BATCH = [Sample(Case("a", "a red circle on a white background", (0,)), 0), Sample(Case("b", "a calm lake", (1,)), 1)]
STEPS = (0, 1, 3)


def test_recorded_steps() -> None:
    assert recorded_steps(4, 8) == (0, 2, 5, 7)
    assert recorded_steps(None, 28) == (0, 9, 18, 27)
    assert recorded_steps("all", 3) == (0, 1, 2)
    assert recorded_steps([5, 1, 5], 8) == (1, 5)
    assert recorded_steps(1, 8) == (4,)
    assert recorded_steps(20, 4) == (0, 1, 2, 3)
    for bad in ([8], [], 0, "some"):
        with pytest.raises(ValueError):
            recorded_steps(bad, 8)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def recorded(tiny_model) -> tuple[Trajectory, list[torch.Tensor]]:
    """The tiny reference's trajectory at STEPS, and the latents the pipeline itself reports after each step."""
    after: list[torch.Tensor] = []

    def keep(pipe, i, t, kwargs):  # type: ignore[no-untyped-def]
        after.append(kwargs["latents"].clone())
        return kwargs

    pipe = tiny_model.pipeline
    with recording(pipe.transformer, STEPS, GEN.guidance, len(BATCH)) as out:
        with torch.inference_mode():
            pipe(
                prompt=[s.case.prompt for s in BATCH],
                height=GEN.height,
                width=GEN.width,
                num_inference_steps=GEN.steps,
                guidance_scale=GEN.guidance,
                max_sequence_length=GEN.max_sequence_length,
                generator=[torch.Generator().manual_seed(s.seed) for s in BATCH],
                output_type="latent",
                callback_on_step_end=keep,
            )
    return out[0], after


def test_trajectory_is_the_pipelines_own(recorded, tiny_model) -> None:
    """The latent entering step s is the one the pipeline reports after step s-1, and the recorded
    guided output is what the flow-matching scheduler stepped with: x_{s+1} = x_s + (sigma_{s+1} -
    sigma_s) * v_s (an independent reading of the same trajectory)."""
    traj, after = recorded
    assert traj.steps == STEPS and traj.latents.shape[:2] == (2, 3) and traj.guided.shape == traj.latents.shape
    sigmas = tiny_model.pipeline.scheduler.sigmas
    for k, s in enumerate(STEPS):
        if s > 0:
            torch.testing.assert_close(traj.latents[:, k], after[s - 1].float(), rtol=0, atol=0)
        stepped = traj.latents[:, k] + (sigmas[s + 1] - sigmas[s]) * traj.guided[:, k]
        torch.testing.assert_close(stepped, after[s].float(), rtol=1e-5, atol=1e-5)
    assert traj.prompt_embeds.shape[1] == 2  # unconditional and conditional, guidance on


def test_teacher_forced_error_against_a_hand_built_call(recorded, tiny_model) -> None:
    """The reference's own transformer on its own inputs is exact; a changed one gives the relative
    L2 error and cosine of the guided outputs, computed here from the pipeline's encode_prompt."""
    traj, _ = recorded
    pipe = tiny_model.pipeline
    same = teacher_forced(pipe.transformer, traj)
    assert torch.all(same.relative == 0) and torch.allclose(same.cosine, torch.ones(2, 3))

    changed = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        changed.transformer_blocks[1].attn.to_v.weight.mul_(1.5)
    errors = teacher_forced(changed, traj)
    with torch.inference_mode():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            [s.case.prompt for s in BATCH], None, None, max_sequence_length=GEN.max_sequence_length
        )
        for k in range(len(STEPS)):
            lat = traj.latents[:, k]
            out = changed(
                hidden_states=torch.cat([lat, lat]),
                timestep=torch.cat([traj.timesteps[:, k]] * 2),
                encoder_hidden_states=torch.cat([neg, embeds]),
                pooled_projections=torch.cat([neg_pooled, pooled]),
                return_dict=False,
            )[0]
            uncond, cond = out.chunk(2)
            guided = (uncond + GEN.guidance * (cond - uncond)).double().flatten(1)
            ref = traj.guided[:, k].double().flatten(1)
            expected = (guided - ref).norm(dim=1) / ref.norm(dim=1)
            torch.testing.assert_close(errors.relative[:, k].double(), expected, rtol=1e-4, atol=1e-6)
            cos = (guided * ref).sum(1) / (guided.norm(dim=1) * ref.norm(dim=1))
            torch.testing.assert_close(errors.cosine[:, k].double(), cos, rtol=1e-5, atol=1e-6)
    assert torch.all(errors.relative > 0.01)


def test_fp8_step_error_is_between_exact_and_broken(recorded, tiny_model) -> None:
    traj, _ = recorded
    fp8 = build_candidate(tiny_model, load_policy("fp8-e4m3-rowwise"), GEN).pipeline.transformer
    e5m2 = build_candidate(tiny_model, load_policy("fp8-e5m2-rowwise"), GEN).pipeline.transformer
    sound, coarse = teacher_forced(fp8, traj).relative.mean(), teacher_forced(e5m2, traj).relative.mean()
    assert 0.02 < sound < coarse


def test_trajectory_per_sample_round_trip(recorded) -> None:
    traj, _ = recorded
    again = Trajectory.from_samples(
        [traj.sample(i) for i in range(len(traj))], traj.steps, traj.guidance, torch.float32
    )
    for name in ("latents", "guided", "prompt_embeds", "pooled", "timesteps"):
        assert torch.equal(getattr(again, name), getattr(traj, name))
    halves = Trajectory.cat(
        [Trajectory.from_samples([traj.sample(i)], traj.steps, traj.guidance, torch.float32) for i in (0, 1)]
    )
    assert torch.equal(halves.latents, traj.latents)


def test_profile_names_the_broken_layer(recorded, tiny_model) -> None:
    """Sixteen zeroed output rows of one FP8 layer stand out against the sound build's profile, at
    the layer itself; the sound build against itself names nothing beyond its baseline."""
    traj, _ = recorded
    ref = tiny_model.pipeline.transformer
    sound = build_candidate(tiny_model, load_policy("fp8-e4m3-rowwise"), GEN).pipeline.transformer
    base = profile(ref, sound, traj, 1)
    assert base["transformer_blocks.2.attn.to_v"] > 0 and base["proj_out"] == 0  # FP8 layer vs kept layer
    broken = copy.deepcopy(sound)
    layer = broken.transformer_blocks[2].attn.to_v
    layer.weight_fp8[8:24] = 0
    named = departure(profile(ref, broken, traj, 1), base)
    assert named is not None and named.part == "transformer_blocks.2.attn.to_v" and named.ratio > 3
    assert named.block == "transformer_blocks.2" and "x" in named.describe()
    again = departure(profile(ref, sound, traj, 1), base)
    assert again is not None and again.ratio == pytest.approx(1.0)


def test_departure_rules() -> None:
    base = {"transformer_blocks.0": 0.1, "transformer_blocks.0.attn.to_v": 0.02, "transformer_blocks.0.ff.net.2": 0.02,
            "transformer_blocks.1": 0.1, "transformer_blocks.1.attn.to_q": 0.02, "proj_out": 0.0}  # fmt: skip
    errors = {**base, "transformer_blocks.1": 0.3, "transformer_blocks.1.attn.to_q": 0.2}
    named = departure(errors, base)
    assert named is not None and (named.part, named.ratio) == ("transformer_blocks.1.attn.to_q", pytest.approx(10))
    kept = departure({**base, "proj_out": 0.05}, base)  # a kept layer that changed: against FLOOR
    assert kept is not None and kept.part == "proj_out" and kept.ratio == pytest.approx(0.05 / FLOOR)
    nan = departure({**base, "transformer_blocks.0": math.nan, "transformer_blocks.0.ff.net.2": math.nan}, base)
    assert nan is not None and nan.part == "transformer_blocks.0.ff.net.2" and nan.ratio == math.inf
    alone = departure(errors, None)
    assert alone is not None and alone.part == "transformer_blocks.1" and alone.baseline is None
    assert "no baseline profile" in alone.describe()
    assert departure({}, base) is None


def test_generation_with_recording_keeps_images(tiny_model) -> None:
    """Recording changes nothing the pipeline makes."""
    pipe = tiny_model.pipeline
    plain = generate(pipe, BATCH, GEN)
    with recording(pipe.transformer, STEPS, GEN.guidance, len(BATCH)):
        recorded_images = generate(pipe, BATCH, GEN)
    assert torch.equal(plain, recorded_images)


def test_step_error_in_a_run_and_from_the_cache(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A suite listing step_error records it per sample (mean and per step), gates it, caches the
    trajectory with the images, and a second run reads it from there with the same values."""
    import json

    from evals.cli import main
    from evals.records import read_records
    from tests.conftest import TEST_SUITES, write

    text = (
        (TEST_SUITES / "smoke.yaml").read_text().replace("metrics: [psnr, ssim]", "metrics: [psnr, ssim, step_error]")
    )
    text += '  - {metric: step_error, stat: mean, op: "<=", value: 0.5}\n'
    text += '  - {metric: step_cosine, stat: min, op: ">=", value: 0.5}\n'
    text += "metric_options: {step_error: {steps: 2}}\n"
    suite = write(workdir / "suite.yaml", text)
    runs, printed = [], []
    for _ in range(2):
        assert main(["run", str(suite), "--no-mlflow", "--no-progress"]) == 0
        runs.append(sorted((workdir / "runs").iterdir())[-1])
        printed.append(capsys.readouterr().out)
    assert "reference images generated: 16 (0 reused)" in printed[0]
    assert "reference images generated: 0 (16 reused)" in printed[1]
    first, second = (list(read_records(r / "records.jsonl")) for r in runs)
    assert [r.steps for r in first] == [r.steps for r in second]
    rec = first[0]
    assert rec.steps is not None and rec.steps["step"] == [0, 3]
    assert rec.metrics["step_error"] == pytest.approx(sum(rec.steps["error"]) / 2)
    assert json.loads((runs[1] / "timings.json").read_text()).get("step_error", 0) > 0
    assert list((workdir / "cache").rglob("*.steps-0-3.safetensors"))
    gates = json.loads((runs[0] / "verdict.json").read_text())["results"]
    assert {g["subject"] for g in gates} >= {"step_error", "step_cosine"}
    assert (runs[0] / "layers" / "fp8-e4m3-rowwise.json").is_file()


def test_locate_on_demand_on_a_finished_run(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evals locate` on a run made without step error rebuilds the models, profiles the candidate and
    names a part (no baseline profile here: the largest own error); a second call reads the stored
    profile; bad input is exit 2 with nothing written."""
    import shutil

    from evals.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    assert main(["locate", str(run), "--candidate", "nope"]) == 2
    assert "not a candidate" in capsys.readouterr().err and not (run / "locate.json").exists()
    assert main(["locate", str(tmp_path / "nowhere")]) == 2
    assert main(["locate", str(run)]) == 0
    out = capsys.readouterr().out
    assert "rebuilding the models" in out and "fp8-e4m3-rowwise: largest own error at transformer_blocks." in out
    assert (run / "layers" / "fp8-e4m3-rowwise.json").is_file()
    named = json.loads((run / "locate.json").read_text())["fp8-e4m3-rowwise"]
    assert named["baseline"] is None and named["part"].startswith("transformer_blocks.")
    assert named["text"] in (run / "report.html").read_text() and named["text"] in (run / "summary.md").read_text()
    assert main(["locate", str(run)]) == 0
    assert "rebuilding" not in capsys.readouterr().out
