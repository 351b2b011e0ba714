"""One verdict on every machine: the CI gate's sound policies pass with the committed baselines under
another machine's arithmetic too. `ATEN_CPU_CAPABILITY=default` runs ATen's kernels without AVX2 or
AVX-512, as a CPU that lacks them would; it moved smoke samples by up to 9 dB before step error
carried the tight gates (docs/gate-evidence.md). The default arithmetic is checked by the mutation
suite's run of the same policies and by `nox -s eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SUITES

pytestmark = pytest.mark.slow


def test_smoke_passes_under_another_instruction_set(tmp_path: Path) -> None:
    from evals.suite import load_suite

    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, "-m", "evals", "run", str(SUITES / "smoke.yaml"), "--no-mlflow", "--no-progress"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    verdict = json.loads((run_dir / "verdict.json").read_text())
    failed = [f"{r['policy']}: {r['gate']} ({r['reason']})" for r in verdict["results"] if r["status"] == "fail"]
    assert done.returncode == 0 and verdict["passed"], f"failed under ATEN_CPU_CAPABILITY=default: {failed}"
    policies = {r["policy"] for r in verdict["results"]}
    assert policies == set(load_suite(SUITES / "smoke.yaml").policies)
    measured = [r for r in verdict["results"] if r["subject"] in ("step_error", "max_ratio")]
    assert measured and all(r["actual"] == r["actual"] for r in measured)  # step error gates ran, not NaN
