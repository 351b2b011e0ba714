"""Example quantization regression tests: copy this file into your project's tests.

Run with `pytest --evals-suite suites/smoke.yaml --evals-policy fp8-e4m3-rowwise`; the first run
writes tests/baselines/<suite>-<policy>.json and fails until you commit it; `--evals-regen` rewrites it.
"""

import pytest

from evals.testing import assert_gates, assert_images_close


@pytest.mark.quant_regression
def test_fp8_build_passes_the_suite_gates(evals_run):
    assert_gates(evals_run)


@pytest.mark.quant_regression
def test_fp8_metrics_match_the_golden_baseline(evals_run, evals_baseline):
    evals_baseline(evals_run)


@pytest.mark.quant_regression
def test_one_prompt_stays_close(reference_pipeline, candidate_pipeline):
    from evals.generation import generate
    from evals.suite_types import Case, Generation, Sample

    generation = Generation(height=64, width=64, steps=4, guidance=4.5, batch_size=2)
    batch = [Sample(Case("cube", "a red cube on a wooden table", (0, 1)), seed) for seed in (0, 1)]
    reference = generate(reference_pipeline.pipeline, batch, generation).clamp(0, 1)
    candidate = generate(candidate_pipeline("fp8-e4m3-rowwise").pipeline, batch, generation).clamp(0, 1)
    # rowwise FP8 on tiny: 32.7 and 31.5 dB, SSIM 0.937 and 0.946 for these two images
    assert_images_close(reference, candidate, psnr_min=25, ssim_min=0.9)


@pytest.mark.gpu
def test_runs_on_the_gpu_only_where_there_is_one(evals_run):
    import torch

    assert torch.cuda.is_available()
