"""Time to a verdict on the release suite `sd35-core` (204 samples at 1024x1024, 28 steps), measured
on the first N of its cases and projected to the whole suite, on one GPU and on several under
torchrun (each process generates its share of the samples; docs/running.md, "Several GPUs").

Each run is a fresh `evals run` process (benchmarks/suite_runs.py): the first with an empty reference
cache, the second reading the references the first stored. The projection takes each run's startup
and finishing as they were and scales generation (with the scoring beside it) by the samples:

    full = startup + finishing + generation * 204 / N,   on G GPUs: generation * ceil(204 / G) / N

Metrics whose weights are not on the machine are left out with `--metrics` (LPIPS and CLIP score run
beside generation in a worker thread; their share is in `waiting`); step error, which needs no
weights, stays with its gates.

With `--floor`, `evals bench --cuda-graph` first times one transformer step of the reference and of
the candidate (blocks compiled, one image per step call: batch 2 with guidance), and each run is set
beside its compute floor: 28 steps of each per sample for a first run, of the candidate alone with
the reference cached; `+ screening` adds the candidate's teacher-forced steps (3 more per sample).

    python benchmarks/time_to_verdict.py --cases 8 --metrics psnr,ssim --model random:sd35-large --floor
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.suite_runs import timed_run

SCREENING_STEPS = 3
"""sd35-core records 4 steps; the first is also the candidate's own first step, which its generation
takes from screening, so screening adds 3 candidate steps a sample to the images' 28."""
CORE = Path(__file__).resolve().parents[1] / "suites" / "sd35-core.yaml"


def subset_suite(cases: int, metrics: list[str] | None, folder: Path) -> tuple[Path, int, int]:
    """sd35-core with its first `cases` cases (and only `metrics`): (file, samples in it, in the whole)."""
    suite = yaml.safe_load(CORE.read_text())
    seeds = len(suite["seeds"])
    total = len(suite["cases"]) * seeds
    suite["cases"] = suite["cases"][:cases]
    if metrics:
        metrics = [
            *metrics,
            *(["step_error"] if "step_error" in suite["metrics"] and "step_error" not in metrics else []),
        ]
        suite["metrics"] = metrics
        suite["gates"] = [g for g in suite["gates"] if "metric" not in g or g["metric"].split("_delta")[0] in metrics]
    path = folder / "sd35-core-subset.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path, len(suite["cases"]) * seeds, total


def floor_step_ms(model: str, work: Path) -> tuple[float, float]:
    """(reference, candidate) transformer step in ms, replayed from a CUDA graph (`evals bench`)."""
    out = work / "bench.json"
    command = [sys.executable, "-m", "evals", "bench", "--model", model, "--policy", "fp8-e4m3-rowwise"]
    command += ["--resolution", "1024", "--batch", "2", "--cuda-graph", "--no-mlflow", "--json", str(out)]
    command += ["--runs-dir", str(work / "bench-runs")]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"evals bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads(out.read_text())["results"]
    return results[0]["step_ms"], results[1]["step_ms"]


def steady_projection(wall: float, batch_timings: dict[str, list[float]], batches: int) -> float:
    """The whole suite's wall time: this run's, plus its median batch (screening and images, the
    first batch of each left out: it compiles and warms up) for each batch it did not run."""
    more = 0.0
    for phase in ("screening", "images"):
        times = batch_timings.get(phase, [])[1:] or batch_timings.get(phase, [])
        if times:
            more += statistics.median(times) * (batches - len(batch_timings[phase]))
    return wall + more


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="the first N cases of sd35-core (default 8)")
    parser.add_argument("--metrics", help="comma-separated metrics to keep (default: the suite's)")
    parser.add_argument("--gpus", type=int, default=8, help="project to this many GPUs too (default 8)")
    parser.add_argument("--floor", action="store_true", help="time the compute floor first (`evals bench`, GPU)")
    parser.add_argument("--floor-ms", help="REF,CAND: the floor's step times, measured before (skips the bench)")
    parser.add_argument("--compare-launched", action="store_true", help="a third run: cached, without CUDA graphs")
    args, extra = parser.parse_known_args()
    if args.cases < 1:
        sys.exit("--cases must be at least 1")
    metrics = args.metrics.split(",") if args.metrics else None
    core = yaml.safe_load(CORE.read_text())
    batch, steps = core["generation"]["batch_size"], core["generation"]["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = extra[extra.index("--model") + 1] if "--model" in extra else "random:sd35-large"
        floor = tuple(float(v) for v in args.floor_ms.split(",")) if args.floor_ms else None
        floor = floor_step_ms(model, work) if args.floor else floor
        suite, samples, total = subset_suite(args.cases, metrics, work)
        plan = [("first", extra), ("second (reference cache)", extra)]
        if args.compare_launched:  # the same cached run with every kernel launched, no CUDA graph
            plan.append(("second, launched (--no-cuda-graph)", [*extra, "--no-cuda-graph"]))
        rows = []
        for name, arguments in plan:
            wall, parts = timed_run(suite, work, arguments)
            last = max((work / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
            per_batch = json.loads((last / "batch_timings.json").read_text())
            rows.append((name, wall, parts, steady_projection(wall, per_batch, math.ceil(total / batch))))
        verdict = json.loads((last / "verdict.json").read_text())["results"]
    print(f"sd35-core, first {args.cases} cases ({samples} of {total} samples), evals run {' '.join(extra)}")
    for name, _, parts, _ in rows:
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print("gates of the last run: " + "; ".join(f"{r['gate']}: {r['actual']:.4g} {r['status']}" for r in verdict))
    print(f"| run | measured s | whole suite, 1 GPU | {args.gpus} GPUs | floor | ratio | floor + screening | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, wall, parts, whole), first in zip(rows, (True, False, False), strict=False):
        fixed = parts.get("startup", 0.0) + parts.get("finishing", 0.0)
        several = fixed + (whole - fixed) * math.ceil(total / args.gpus) / total
        cells = ["", "", "", ""]
        if floor is not None:  # 28 steps of each image; screening adds SCREENING_STEPS candidate steps
            ref_ms, cand_ms = floor
            base = total * steps * ((ref_ms if first else 0.0) + cand_ms) / 1000
            screened = base + total * SCREENING_STEPS * cand_ms / 1000
            cells = [f"{base / 60:.1f} min", f"{whole / base:.2f}x", f"{screened / 60:.1f} min"]
            cells.append(f"{whole / screened:.2f}x")
        print(f"| {name} | {wall:.1f} | {whole / 60:.1f} min | {several / 60:.1f} min | {' | '.join(cells)} |")
    if floor is not None:
        print(
            f"floor: evals bench --cuda-graph, one image per step call: reference {floor[0]:.1f} ms, "
            f"candidate {floor[1]:.1f} ms a step; screening {SCREENING_STEPS} more candidate steps a sample"
        )


if __name__ == "__main__":
    main()
