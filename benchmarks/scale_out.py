"""One suite run in one process and the same run under `torchrun` on N processes (issue #10): wall
times, the speed-up, and whether the two runs wrote the same records and the same image bytes.

    python benchmarks/scale_out.py suites/smoke.yaml --nproc 2
    python benchmarks/scale_out.py suites/sd35-quick.yaml --nproc 2 --model random:sd35-medium

Each run is a fresh process tree in its own folder (its own run directory and MLflow store) with the
reference cache off, so both generate every reference image. Under torchrun each process takes its
own GPU (NCCL) when there are GPUs; both runs get one CPU thread per process, as torchrun gives its
workers. Other arguments go to `evals run`. Exits 1 when the records or images differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(launcher: list[str], suite: Path, work: Path, extra: list[str]) -> float:
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [*launcher, "-m", "evals", "run", str(suite), "--runs-dir", "runs", "--no-cache", "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run([*command, *extra], cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    # 1 is also what the gates failing gives (random weights may well fail them): a run is finished
    # when it wrote its verdict.
    finished = [p for p in (work / "runs").glob("*/verdict.json")]
    if done.returncode not in (0, 1) or not finished:
        sys.exit(f"{' '.join(command[:6])} ... failed ({done.returncode}):\n{done.stderr[-5000:]}")
    return wall


def contents(runs: Path) -> tuple[list[dict], dict[str, str]]:
    """Records without their timing, and a digest of every image, of the one run under `runs`."""
    (run_dir,) = runs.iterdir()
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds_per_image")
    images = {
        p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run_dir / "images").rglob("*.png"))
    }
    return records, images


def timings(runs: Path) -> dict[str, float]:
    (run_dir,) = runs.iterdir()
    return json.loads((run_dir / "timings.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path)
    parser.add_argument("--nproc", type=int, default=2)
    args, extra = parser.parse_known_args()  # the rest goes to `evals run`
    suite = args.suite.resolve()
    warm = "import evals.cli, evals.runner, evals.tracking, evals.models.sources, diffusers, transformers, mlflow"
    subprocess.run([sys.executable, "-c", warm], check=True)  # bytecode compiled once, for neither run to pay
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    with tempfile.TemporaryDirectory() as tmp:
        one_wall = timed_run([sys.executable], suite, Path(tmp) / "one", extra)
        many_wall = timed_run(torchrun, suite, Path(tmp) / "many", extra)
        one, many = contents(Path(tmp) / "one" / "runs"), contents(Path(tmp) / "many" / "runs")
        one_parts, many_parts = timings(Path(tmp) / "one" / "runs"), timings(Path(tmp) / "many" / "runs")
    print(f"suite {suite.name}, evals run {' '.join(extra)}; {len(one[0])} records, {len(one[1])} images")
    print("| processes | wall s | startup | generation | finishing |")
    print("|---|---|---|---|---|")
    for n, wall, parts in ((1, one_wall, one_parts), (args.nproc, many_wall, many_parts)):
        cells = " | ".join(f"{parts.get(p, 0.0):.1f}" for p in ("startup", "generation", "finishing"))
        print(f"| {n} | {wall:.1f} | {cells} |")
    generation = one_parts["generation"] / many_parts["generation"]
    print(f"speed-up: {one_wall / many_wall:.2f}x wall, {generation:.2f}x generation")
    same_records, same_images = one[0] == many[0], one[1] == many[1]
    print(f"records equal: {same_records}; image bytes equal: {same_images}")
    if not (same_records and same_images):
        differing = [a["sample_id"] for a, b in zip(one[0], many[0], strict=False) if a != b][:5]
        print(f"first differing records: {differing}")
        sys.exit(1)


if __name__ == "__main__":
    main()
