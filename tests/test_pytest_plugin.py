"""The pytest plugin, exercised with pytest's own pytester on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO

pytest_plugins = ["pytester"]

# pytester runs in-process and forgets modules first imported inside a run; extension modules
# (numpy, torch, tokenizers...) cannot be imported twice, so import everything a run uses here.
import diffusers  # noqa: E402, F401
import PIL.Image  # noqa: E402, F401
import safetensors.torch  # noqa: E402, F401
import scipy.ndimage  # noqa: E402, F401
import tqdm  # noqa: E402, F401
from diffusers import (  # noqa: E402, F401
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402, F401

import evals.api  # noqa: E402
import evals.metrics.psnr  # noqa: E402
import evals.metrics.ssim  # noqa: E402
import evals.models.fp8  # noqa: E402
import evals.models.tiny  # noqa: E402
import evals.runner  # noqa: E402
import evals.testing  # noqa: E402, F401

MINI_SUITE = """\
name: mini
model: tiny
policies: [fp8-e4m3-rowwise]
generation: {height: 64, width: 64, steps: 2, guidance: 4.5, batch_size: 2}
seeds: [0]
cases:
  - {id: cube, prompt: "a red cube on a wooden table"}
  - {id: forest, prompt: "a dark forest at night"}
metrics: [psnr, ssim]
detectors: [black_frame, nonfinite]
gates:
  - {metric: psnr, stat: mean, op: ">=", value: PSNR_MIN}
  - {detector: nonfinite, stat: count, op: "==", value: 0}
"""

GATES_TEST = """
import pytest
from evals.testing import assert_gates

@pytest.mark.quant_regression
def test_gates(evals_run):
    assert_gates(evals_run)
"""

BASELINE_TEST = """
def test_baseline(evals_run, evals_baseline):
    evals_baseline(evals_run)
"""


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("EVALS_CACHE_DIR", str(tmp_path / "cache"))
    pytester.makeini("[pytest]\nevals_suite = suite.yaml\naddopts = -p no:cacheprovider --strict-markers\n")
    return pytester


def suite(pytester: pytest.Pytester, psnr_min: float) -> None:
    pytester.path.joinpath("suite.yaml").write_text(MINI_SUITE.replace("PSNR_MIN", str(psnr_min)))


def test_a_passing_regression_test(project: pytest.Pytester) -> None:
    suite(project, 30)
    project.makepyfile(test_quant=GATES_TEST)
    project.runpytest().assert_outcomes(passed=1)


def test_a_failing_one_explains_itself(project: pytest.Pytester) -> None:
    suite(project, 200)
    project.makepyfile(test_quant=GATES_TEST)
    result = project.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*1 gate(s) failed in suite 'mini':*",
            "*fp8-e4m3-rowwise: psnr mean >= 200: psnr mean = *, needs >= 200*",
            "*worst samples by PSNR:*",
            "*fp8-e4m3-rowwise cube-s0 (psnr *images/fp8-e4m3-rowwise/cube-s0.png*",
            "*run directory: *mini*",
        ]
    )


def test_baselines_are_created_checked_and_regenerated(project: pytest.Pytester) -> None:
    suite(project, 30)
    project.makepyfile(test_baseline=BASELINE_TEST)
    baseline = project.path / "tests" / "baselines" / "mini-fp8-e4m3-rowwise.json"

    first = project.runpytest()
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*no baseline yet: wrote*mini-fp8-e4m3-rowwise.json*"])
    data = json.loads(baseline.read_text())
    assert set(data["policies"]["fp8-e4m3-rowwise"]) >= {"psnr_mean", "ssim_mean", "nonfinite_count"}

    project.runpytest().assert_outcomes(passed=1)  # same model, same seeds: same numbers

    data["policies"]["fp8-e4m3-rowwise"]["psnr_mean"] += 3.0  # beyond the 2 dB another machine may move it
    baseline.write_text(json.dumps(data))
    moved = project.runpytest()
    moved.assert_outcomes(failed=1)
    moved.stdout.fnmatch_lines(["*metrics moved from the baseline*", "*fp8-e4m3-rowwise.psnr_mean: baseline *"])
    obtained = baseline.with_suffix(".obtained.json")
    assert obtained.is_file()

    project.runpytest("--evals-regen").assert_outcomes(passed=1)
    assert json.loads(baseline.read_text())["policies"] == json.loads(obtained.read_text())["policies"]
    project.runpytest().assert_outcomes(passed=1)


def test_the_example_file_runs_and_gpu_tests_skip_on_cpu(project: pytest.Pytester) -> None:
    import torch

    suite(project, 30)
    project.makepyfile(test_example=(REPO / "examples" / "test_quant_regression.py").read_text())
    result = project.runpytest()
    if torch.cuda.is_available():
        result.assert_outcomes(passed=4, failed=1)  # the baseline test writes its file first
    else:
        result.assert_outcomes(passed=2, failed=1, skipped=1)
        result.stdout.fnmatch_lines(["*no baseline yet*"])


def test_assert_images_close_names_each_image() -> None:
    import torch

    from evals.testing import assert_images_close

    ref = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cand = ref.clone()
    cand[1] = (cand[1] + 0.2).clamp(0, 1)
    scores = assert_images_close(ref, ref, psnr_min=60)
    assert scores["psnr"] == [float("inf"), float("inf")]
    with pytest.raises(AssertionError, match=r"image 1: psnr \d+\.?\d*, needs >= 30") as info:
        assert_images_close(ref, cand, psnr_min=30)
    assert "image 0" not in str(info.value)
    uint8 = (ref.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    assert_images_close(uint8, uint8, ssim_min=0.99)  # HWC uint8 arrays work too


def test_worst_samples_put_nan_first_whatever_the_direction() -> None:
    import math

    from evals.testing import worst_samples
    from tests.test_records import record

    recs = [record("p", f"s{i}-s0", v) for i, v in enumerate([40.0, math.nan, 30.0, 50.0])]
    assert [r.sample_id for r in worst_samples(recs, "psnr")] == ["s1-s0", "s2-s0", "s0-s0"]
    lpips = [
        r.__class__(**{**r.__dict__, "metrics": {"lpips": v}})
        for r, v in zip(recs, [0.1, math.nan, 0.3, 0.2], strict=True)
    ]
    assert [r.sample_id for r in worst_samples(lpips, "lpips", 2)] == ["s1-s0", "s2-s0"]


def test_golden_tolerances_hold_machine_jitter_and_nothing_more() -> None:
    """A golden figure may move as far as another machine's arithmetic moves it (twice the measured
    jitter), and no further; figures with no measured jitter keep the call's tolerance."""
    from evals.testing import _differences

    base = {"p": {"psnr_mean": 32.0, "step_error_mean": 0.16, "lpips_mean": 0.1, "nonfinite_count": 0.0}}

    def moved(**changes: float) -> list[str]:
        return _differences(base, {"p": {**base["p"], **changes}}, 1e-3, 1e-4)

    assert moved(psnr_mean=30.5) == [] and moved(step_error_mean=0.1615) == []
    assert moved(psnr_mean=29.5) and moved(step_error_mean=0.163) and moved(lpips_mean=0.1002)
    assert moved(nonfinite_count=1.0)
