"""Time a whole suite run twice, as a user sees it (issue #7's evaluation targets).

The first run generates the reference images and fills an empty reference cache and MLflow store;
the second reads the references from that cache. Each run is a fresh `evals run` process; its wall
time is measured from outside, its parts come from the run's timings.json. Prints one row per run,
the second run's share of the first, and the share of the wall time that scoring, detectors and
logging add (the worker's `waiting` plus the final summary, reports and MLflow logging).

    python benchmarks/suite_runs.py suites/sd35-quick.yaml --model random:sd35-medium [evals run args]

Before the timed runs one process imports everything once, so that neither run pays for compiling
.py files to bytecode (a normal installation has done that; where site-packages is read-only and
holds no bytecode, also set PYTHONPYCACHEPREFIX to a writable folder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("startup", "generation", "waiting", "finishing", "metrics", "detectors", "writing")


def timed_run(suite: Path, work: Path, extra: list[str]) -> tuple[float, dict[str, float]]:
    runs = work / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    command = [sys.executable, "-m", "evals", "run", str(suite), "--runs-dir", str(runs)]
    command += ["--cache-dir", str(work / "cache"), "--no-progress", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)  # MLflow store: work/mlflow.db
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: the gates failed, which random weights may well do
        sys.exit(f"evals run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    (run_dir,) = set(runs.iterdir()) - before
    return wall, json.loads((run_dir / "timings.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path)
    args, extra = parser.parse_known_args()
    suite = args.suite.resolve()
    warm = "import evals.cli, evals.runner, evals.tracking, evals.models.sources, diffusers, transformers, mlflow"
    subprocess.run([sys.executable, "-c", warm], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [(name, *timed_run(suite, work, extra)) for name in ("first", "second")]
    print(f"suite {suite.name}, evals run {' '.join(extra)}")
    print("| run | wall s | " + " | ".join(PARTS) + " | added by scoring + logging |")
    print("|---" * (len(PARTS) + 3) + "|")
    for name, wall, parts in rows:
        added = parts.get("waiting", 0.0) + parts.get("finishing", 0.0)
        cells = " | ".join(f"{parts.get(p, 0.0):.1f}" for p in PARTS)
        print(f"| {name} | {wall:.1f} | {cells} | {added:.1f} s ({added / wall:.1%}) |")
    print(f"second run / first run: {rows[1][1] / rows[0][1]:.1%} of the wall time")
    for name, _, parts in rows:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if "." in k)
        print(f"{name} run, steps of startup and finishing (s): {steps}")
    print("(metrics, detectors and writing run beside generation in a worker thread: only `waiting` and")
    print(" `finishing` add to the wall time)")


if __name__ == "__main__":
    main()
