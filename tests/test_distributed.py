"""`torchrun -m evals run`: a 2-process gloo run on the CPU gives the records of a 1-process run,
and rank 0 alone writes the run directory and MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scale_out import contents
from tests.conftest import TEST_SUITES


def run_evals(launcher: list[str], workdir: Path, runs: str, *extra: str) -> subprocess.CompletedProcess[str]:
    # One thread per process in both runs: the thread count moves images by ~1e-6, enough to flip
    # an 8-bit pixel, and torchrun gives each worker one thread.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [*launcher, "-m", "evals", "run", str(TEST_SUITES / "smoke.yaml"), "--runs-dir", runs, "--no-progress"]
    return subprocess.run(
        [*command, *extra], cwd=workdir, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
def test_two_gloo_processes_give_the_records_of_one(workdir: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = run_evals(torchrun, workdir, "two", "--no-cache")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 processes)" in two.stderr
    assert two.stdout.count("verdict: PASSED") == 1  # rank 0 reports, the worker stays silent
    one = run_evals([sys.executable], workdir, "one", "--no-cache", "--no-mlflow")
    assert one.returncode == 0, one.stderr[-3000:]

    records_two, images_two = contents(workdir / "two")
    records_one, images_one = contents(workdir / "one")
    assert len(records_one) == 16 and len(images_one) == 32
    assert records_two == records_one  # same content, same order
    assert images_two == images_one

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (experiment,) = client.search_experiments(filter_string="name = 'smoke'")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # one parent and one candidate: the worker logged nothing
    assert {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.gpu
@pytest.mark.slow
def test_two_gpus_through_nccl_give_the_records_of_one(workdir: Path) -> None:
    """The same on two GPUs: each rank generates on its own GPU, and the scoring thread's gather goes
    through NCCL from that GPU (a fresh thread starts on cuda:0, which NCCL refused for rank 1)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = run_evals(torchrun, workdir, "two", "--no-cache", "--no-mlflow")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 processes)" in two.stderr
    one = run_evals([sys.executable], workdir, "one", "--no-cache", "--no-mlflow")
    assert one.returncode == 0, one.stderr[-3000:]
    records_two, images_two = contents(workdir / "two")
    records_one, images_one = contents(workdir / "one")
    assert len(records_one) == 16 and len(images_one) == 32
    assert records_two == records_one
    assert images_two == images_one
