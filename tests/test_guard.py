"""The guard (evals.guard) in front of a pipeline, and guarded candidates in a suite: a build that
breaks some images (NaN: black once saved) is caught and repaired by the fallback, and the suite's
retry-rate gate can fail. Which images break is found independently, from the latents."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from evals.cli import main
from evals.guard import Fallback, GuardEvent, Reseed, guarded, retry_seed
from evals.records import read_records
from tests.conftest import write

THRESHOLD = 0.5
"""A latent whose first value passes this at any step is poisoned: about a third of the images."""

BROKEN_BUILD = f'''
import copy


def poisoned(transformer, threshold={THRESHOLD}):
    """A broken kernel in miniature: the output of every image whose first latent value is above
    `threshold` becomes NaN, so some seeds give a broken (black) image and others do not."""

    def poison(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        sample = output[0] if isinstance(output, tuple) else output.sample
        sample[hidden.flatten(1)[:, 0] > threshold] = float("nan")
        return output

    transformer.register_forward_hook(poison, with_kwargs=True)
    return transformer


def broken_build(reference):
    return poisoned(copy.deepcopy(reference.transformer))
'''

SETTINGS = dict(height=32, width=32, num_inference_steps=2, guidance_scale=4.5, max_sequence_length=8)


def _broken(pipeline: Any, threshold: float = THRESHOLD) -> Any:
    namespace: dict[str, Any] = {}
    exec(BROKEN_BUILD, namespace)
    transformer = namespace["poisoned"](copy.deepcopy(pipeline.transformer), threshold)
    built = type(pipeline)(**dict(pipeline.components, transformer=transformer))
    built.set_progress_bar_config(disable=True)
    return built


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _images(pipe: Any, prompts: list[str], seeds: list[int]) -> np.ndarray:
    return pipe(prompt=prompts, generator=_generators(seeds), output_type="np", **SETTINGS).images


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_fallback_repairs_exactly_the_broken_images(tiny_model: Any, device: str) -> None:
    if device == "cpu":
        reference = tiny_model.pipeline
    else:
        from evals.models.sources import load_source

        reference = load_source("tiny", "float32", device).pipeline
    broken = _broken(reference)
    seeds = list(range(8))
    prompts = [f"a red cube, take {s}" for s in seeds]
    latents = broken(prompt=prompts, generator=_generators(seeds), output_type="latent", **SETTINGS).images
    bad = [i for i in range(len(seeds)) if latents[i].isnan().any()]
    assert 0 < len(bad) < len(seeds), "the broken build must break some images, not all"
    unguarded = _images(broken, prompts, seeds)

    events: list[GuardEvent] = []
    pipe = guarded(broken, ["nonfinite", "black_frame"], Fallback(reference), on_event=events.append)
    images = pipe(prompt=prompts, generator=_generators(seeds), output_type="np", **SETTINGS).images

    outcomes = pipe.last_outcomes
    assert [i for i, o in enumerate(outcomes) if o.tries] == bad
    assert all(outcomes[i].outcome == "repaired" and outcomes[i].source == "fallback" for i in bad)
    assert all("nonfinite" in outcomes[i].flagged for i in bad)
    assert [(e.kind, e.index) for e in events] == [("flagged", i) for i in bad] + [("repaired", i) for i in bad]
    good = [i for i in range(len(seeds)) if i not in bad]
    np.testing.assert_array_equal(images[good], unguarded[good])  # images that pass are left alone
    # A repaired image is the reference's image of the same request (same seed, same batch of retries).
    expected = _images(reference, [prompts[i] for i in bad], [seeds[i] for i in bad])
    np.testing.assert_array_equal(images[bad], expected)
    assert np.isfinite(images).all() and images[bad].mean() > 0.05


def test_reseed_gives_up_after_its_tries_and_says_so(tiny_model: Any, caplog: pytest.LogCaptureFixture) -> None:
    always_broken = _broken(tiny_model.pipeline, threshold=-float("inf"))
    events: list[GuardEvent] = []
    pipe = guarded(always_broken, ["nonfinite"], Reseed(max_tries=2), on_event=events.append)
    with caplog.at_level("WARNING", logger="evals.guard"):
        images = pipe(prompt=["a cat", "a dog"], generator=_generators([3, 4]), output_type="pt", **SETTINGS).images
    assert images.shape == (2, 3, 32, 32)
    assert [o.outcome for o in pipe.last_outcomes] == ["failed", "failed"]
    assert [o.tries for o in pipe.last_outcomes] == [2, 2]
    assert [o.seed for o in pipe.last_outcomes] == [retry_seed(3, 2), retry_seed(4, 2)]
    assert len({retry_seed(3, 1), retry_seed(3, 2), 3}) == 3
    assert [e.kind for e in events].count("flagged") == 6 and [e.kind for e in events][-2:] == ["failed", "failed"]
    assert "still flagged after every retry" in caplog.text
    assert pipe.guard.counts == {"images": 2, "flagged": 2, "repaired": 0, "failed": 2}


def test_the_guard_counts_into_the_active_mlflow_run(tiny_model: Any, tmp_path: Path) -> None:
    import mlflow

    always_broken = _broken(tiny_model.pipeline, threshold=-float("inf"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            pipe = guarded(always_broken, ["nonfinite"], Reseed(max_tries=1), mlflow=True)
            pipe(prompt=["a cat", "a dog", "a cow"], generator=_generators([1, 2, 3]), output_type="pt", **SETTINGS)
        metrics = mlflow.get_run(run.info.run_id).data.metrics
    finally:
        mlflow.set_tracking_uri(None)
    assert metrics == {"guard_images": 3.0, "guard_flagged": 3.0, "guard_repaired": 0.0, "guard_failed": 3.0}


def test_the_guard_refuses_what_it_cannot_check(tiny_model: Any) -> None:
    with pytest.raises(ValueError, match="expected some of"):
        guarded(tiny_model.pipeline, ["no_such_detector"])
    with pytest.raises(ValueError, match="max_tries 0"):
        guarded(tiny_model.pipeline, on_failure=Reseed(max_tries=0))
    with pytest.raises(ValueError, match="latent"):
        guarded(tiny_model.pipeline)(prompt="a cat", output_type="latent", **SETTINGS)


SUITE = """
name: guarded
model: tiny
generation: {height: 32, width: 32, steps: 2, guidance: 4.5, batch_size: 4, max_sequence_length: 8}
seeds: [0, 1, 2]
cases:
  - {id: red-cube, prompt: "a red cube on a wooden table"}
  - {id: old-man, prompt: "a portrait photo of an old man"}
  - {id: alpine-lake, prompt: "a calm alpine lake at sunrise"}
  - {id: cat-window, prompt: "a cat sleeping on a sunny windowsill"}
metrics: [psnr]
detectors: [nonfinite, black_frame]
guard: {candidates: [broken], on_failure: reference, max_tries: 1}
gates:
  - {guard: failed_after_retry, op: "==", value: 0}
  - {guard: retry_rate, op: "<=", value: 0.05}
"""


@pytest.fixture
def builds(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "builds"
    write(folder / "broken_builds.py", BROKEN_BUILD)
    for name in ("broken", "broken-raw"):
        write(folder / f"{name}.yaml", f"name: {name}\nfactory: broken_builds:broken_build\n")
    sys.modules.pop("broken_builds", None)
    yield folder
    sys.modules.pop("broken_builds", None)


def test_a_guarded_candidate_is_repaired_and_its_retry_rate_gated(workdir: Path, builds: Path) -> None:
    suite = write(workdir / "guarded.yaml", SUITE)
    policies = ["--policy", str(builds / "broken.yaml"), "--policy", str(builds / "broken-raw.yaml")]
    assert main(["run", str(suite), *policies, "--no-progress", "--no-mlflow"]) == 1
    (run_dir,) = (workdir / "runs").iterdir()
    records = {(r.policy, r.sample_id): r for r in read_records(run_dir / "records.jsonl")}
    raw = {sid: r for (policy, sid), r in records.items() if policy == "broken-raw"}
    fixed = {sid: r for (policy, sid), r in records.items() if policy == "broken"}
    broken_ids = {sid for sid, r in raw.items() if r.detectors["nonfinite"]["flagged"]}
    assert 0 < len(broken_ids) < len(raw)
    assert all(r.guard is None for r in raw.values())  # not named in guard.candidates
    assert {sid for sid, r in fixed.items() if r.guard and r.guard["tries"]} == broken_ids
    assert all(
        r.guard and r.guard["outcome"] == ("repaired" if sid in broken_ids else "passed") for sid, r in fixed.items()
    )
    assert not any(r.detectors["nonfinite"]["flagged"] for r in fixed.values())
    assert min(fixed[sid].metrics["psnr"] for sid in broken_ids) > 30  # the reference's own image, re-batched

    summary = json.loads((run_dir / "summary.json").read_text())["policies"]
    assert summary["broken"]["guard"] == {
        "retry_rate": pytest.approx(len(broken_ids) / len(fixed)),
        "failed_after_retry": 0.0,
        "repaired": float(len(broken_ids)),
    }
    results = {(r["policy"], r["subject"]): r for r in json.loads((run_dir / "verdict.json").read_text())["results"]}
    assert results["broken", "failed_after_retry"]["status"] == "pass"
    assert results["broken", "retry_rate"]["status"] == "fail"  # it retried more than 5%: the gate can fail
    assert results["broken-raw", "retry_rate"]["status"] == "not evaluated"
    # The comparison table in summary.md and the report carries the guard's figures beside the metrics.
    section = (run_dir / "summary.md").read_text().split("## Comparison", 1)[1].split("\n\n")
    header, _, *lines = next(block for block in section if block.startswith("| candidate")).splitlines()
    assert "| retry rate | failed after retry |" in header
    rows = {line.split(" | ")[0].strip("| "): line for line in lines}
    assert f"| {len(broken_ids) / len(fixed):.4g} | 0 |" in rows["broken"]
    assert "| - | - |" in rows["broken-raw"]  # not guarded: dashes, not zeros
    assert "retry rate" in (run_dir / "report.html").read_text()

    # A resume keeps what the guard did for finished samples and redoes the rest the same way.
    lines = (run_dir / "records.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "records.jsonl").write_text("".join(lines[: len(lines) // 2]))
    (run_dir / "summary.json").unlink()
    assert main(["run", "--resume", str(run_dir), "--no-progress", "--no-mlflow"]) == 1
    resumed = {(r.policy, r.sample_id): r.guard for r in read_records(run_dir / "records.jsonl")}
    assert resumed == {key: r.guard for key, r in records.items()}
    assert (
        json.loads((run_dir / "summary.json").read_text())["policies"]["broken"]["guard"] == summary["broken"]["guard"]
    )


def test_a_guard_naming_a_missing_candidate_is_bad_input(workdir: Path, builds: Path) -> None:
    suite = write(workdir / "guarded.yaml", SUITE.replace("candidates: [broken]", "candidates: [brokn]"))
    code = main(["run", str(suite), "--policy", str(builds / "broken.yaml"), "--no-progress", "--no-mlflow"])
    assert code == 2
    assert not (workdir / "runs").exists()
    bad_gate = SUITE.replace("guard: {candidates: [broken], on_failure: reference, max_tries: 1}\n", "")
    write(workdir / "no-guard.yaml", bad_gate)
    assert main(["validate", str(workdir / "no-guard.yaml")]) == 2
