"""`evals monitor`: a production log made by the trained tiny model through a policy passes the
smoke suite's gates; the same log with drift planted (images made by a worse policy) fails them; a
bad log line is exit 2 naming file and line, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evals.cli import main
from evals.monitor_log import read_log, sample_key, sampled
from evals.records import read_records
from evals.suite import load_suite
from tests.conftest import TEST_SUITES, write

SUITE = TEST_SUITES / "smoke.yaml"  # 64x64, 4 steps; psnr mean >= 30: e4m3-rowwise passes, e5m2-rowwise fails


def _production_log(folder: Path, model: Any, policy: str, black: str | None = None) -> Path:
    """A log of four of the smoke suite's prompts (seed 0) as production made them with `policy`;
    the image of case `black`, if named, replaced by a black frame."""
    import numpy as np

    from evals.candidates import build_candidate
    from evals.generation import generate, to_uint8
    from evals.models.precision import load_policy
    from evals.rundir import save_png

    suite = load_suite(SUITE)
    samples = [s for s in suite.samples() if s.seed == 0][:4]
    build = build_candidate(model, load_policy(policy), suite.generation)
    images = to_uint8(generate(build.pipeline, samples, suite.generation))
    lines = []
    for sample, image in zip(samples, images, strict=True):
        name = f"images/{sample.case.id}.png"
        save_png(folder / name, np.zeros_like(image) if sample.case.id == black else image)
        lines.append({"id": sample.case.id, "prompt": sample.case.prompt, "seed": 0, "image": name, "steps": 4})
    return write(folder / "generations.jsonl", "".join(json.dumps(line) + "\n" for line in lines))


def _monitor(log: Path, *extra: str) -> int:
    return main(["monitor", str(log), "--suite", str(SUITE), "--no-progress", *extra])


def test_an_undrifted_log_passes_and_planted_drift_fails(workdir: Path, tiny_model: Any) -> None:
    good = _production_log(workdir / "good", tiny_model, "fp8-e4m3-rowwise")
    assert _monitor(good, "--no-mlflow", "--sample-count", "3") == 0
    (run_dir,) = (workdir / "runs").iterdir()
    records = list(read_records(run_dir / "records.jsonl"))
    entries = read_log(good, load_suite(SUITE))
    # Every logged image is checked; the three with the smallest keys are compared with the reference.
    assert len(records) == 4 and all(r.detectors for r in records)
    chosen = {e.id for e in sorted(entries, key=sample_key)[:3]}
    assert {r.case_id for r in records if r.metrics} == chosen
    assert all((run_dir / r.reference_image).is_file() == (r.case_id in chosen) for r in records)
    assert (run_dir / "report.html").is_file()

    unsampled = sorted(entries, key=sample_key)[-1].id
    drifted = _production_log(workdir / "drifted", tiny_model, "fp8-e5m2-rowwise", black=unsampled)
    assert _monitor(drifted, "--sample-count", "3") == 1  # with MLflow, as a suite run logs
    (drift_dir,) = {p for p in (workdir / "runs").iterdir() if p != run_dir}
    results = json.loads((drift_dir / "verdict.json").read_text())["results"]
    failed = {(r["subject"], r["stat"]): r for r in results}
    assert failed["psnr", "mean"]["status"] == "fail" and failed["ssim", "mean"]["status"] == "fail"
    # The black frame is found although its entry is not sampled: detectors see every image.
    assert failed["black_frame", "count"]["status"] == "fail" and failed["black_frame", "count"]["actual"] == 1
    assert json.loads((drift_dir / "mlflow.json").read_text())["complete"] is True


def test_sampling_is_deterministic_and_follows_the_entries(tmp_path: Path) -> None:
    suite = load_suite(SUITE)
    (tmp_path / "a.png").write_bytes(b"")
    lines = [{"id": f"req-{i}", "prompt": f"prompt {i}", "seed": i, "image": "a.png"} for i in range(200)]
    log = write(tmp_path / "log.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    entries = read_log(log, suite)
    rate = sampled(entries, rate=0.25)
    assert 25 < len(rate) < 75  # about a quarter
    assert sampled(list(reversed(entries)), rate=0.25) == rate  # not the log's order
    assert sampled(entries[:100], rate=0.25) == {e for e in rate if int(e.split("-")[1]) < 100}
    assert len(sampled(entries, count=10)) == 10 and sampled(entries, count=10) <= sampled(entries, count=20)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"prompt": "a cat", "seed": 1, "image": "a.png"}\n{"prompt": "a dog", "seed": -1, "image": "a.png"}', ":2: "),
        ('{"prompt": "a cat", "seed": 1}', ":1: bad log line"),
        ('{"prompt": "a cat", "seed": 1, "image": "missing.png"}', ":1: image 'missing.png': no such file"),
        ('{"prompt": "a cat", "seed": 1, "image": "a.png", "height": 50}', ":1: bad log line"),
        ("not json", ":1: bad log line"),
        ('{"id": "../x", "prompt": "a cat", "seed": 1, "image": "a.png"}', ":1: "),
        ('{"id": "a", "prompt": "a", "seed": 1, "image": "a.png"}\n{"id": "a", "prompt": "b", "seed": 2, '
         '"image": "a.png"}', ":2: id 'a' is also on line 1"),
    ],
)  # fmt: skip
def test_a_bad_log_line_is_exit_2_naming_file_and_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], line: str, expected: str
) -> None:
    (workdir / "a.png").write_bytes(b"")
    log = write(workdir / "log.jsonl", line + "\n")
    assert _monitor(log, "--no-mlflow") == 2
    assert f"{log}{expected}" in capsys.readouterr().err
    assert not (workdir / "runs").exists()
