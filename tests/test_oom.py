"""CUDA out-of-memory during generation: the batch is halved and retried, the run says so, and the
results are those of a run that used the smaller batch from the start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evals.runner
from evals.cli import main
from tests.conftest import TEST_SUITES, write

FAST = ["--no-mlflow", "--no-progress", "--no-cache"]


def scores(runs: Path) -> list[tuple[str, dict]]:
    (run_dir,) = runs.iterdir()
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    return [(r["sample_id"], r["metrics"]) for r in records]


def test_out_of_memory_halves_the_batch_and_says_so(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    smoke = (TEST_SUITES / "smoke.yaml").read_text()
    assert "batch_size: 4" in smoke
    pairs = write(workdir / "pairs.yaml", smoke.replace("batch_size: 4", "batch_size: 2"))
    assert main(["run", str(pairs), *FAST, "--runs-dir", "pairs"]) == 0

    real_generate = evals.runner.generate
    calls: list[int] = []

    def two_images_fit(pipe, batch, gen):  # a GPU on which only two images fit at once
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(pipe, batch, gen)

    monkeypatch.setattr(evals.runner, "generate", two_images_fit)
    capsys.readouterr()
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), *FAST, "--runs-dir", "halved"]) == 0
    err = capsys.readouterr().err
    assert err.count("CUDA out of memory generating 4 images at once: halved to 2") == 1  # said once, kept
    assert calls.count(4) == 1 and calls.count(2) == 16  # 4 batches x (reference + candidate) x 2 halves
    (run_dir,) = (workdir / "halved").iterdir()
    assert "halved to 2" in (run_dir / "summary.md").read_text()
    assert scores(workdir / "halved") == scores(workdir / "pairs")


def test_out_of_memory_with_one_image_is_an_error(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def nothing_fits(pipe, batch, gen):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(evals.runner, "generate", nothing_fits)
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), *FAST]) == 3  # 4 -> 2 -> 1 -> gives up: the run broke
