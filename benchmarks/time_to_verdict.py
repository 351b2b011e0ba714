"""Time to a verdict on the release suite `sd35-core` (204 samples at 1024x1024, 28 steps), measured
on the first N of its cases and projected to the whole suite, on one GPU and on several under
torchrun (each process generates its share of the samples; docs/running.md, "Several GPUs").

Each run is a fresh `evals run` process (benchmarks/suite_runs.py): the first with an empty reference
cache, the second reading the references the first stored. The projection takes each run's startup
and finishing as they were and scales generation (with the scoring beside it) by the samples:

    full = startup + finishing + generation * 204 / N,   on G GPUs: generation * ceil(204 / G) / N

Metrics whose weights are not on the machine are left out with `--metrics` (LPIPS and CLIP score run
beside generation in a worker thread; their share is in `waiting`).

    python benchmarks/time_to_verdict.py --cases 8 --metrics psnr,ssim --model random:sd35-large
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.suite_runs import timed_run

CORE = Path(__file__).resolve().parents[1] / "suites" / "sd35-core.yaml"


def subset_suite(cases: int, metrics: list[str] | None, folder: Path) -> tuple[Path, int, int]:
    """sd35-core with its first `cases` cases (and only `metrics`): (file, samples in it, in the whole)."""
    suite = yaml.safe_load(CORE.read_text())
    seeds = len(suite["seeds"])
    total = len(suite["cases"]) * seeds
    suite["cases"] = suite["cases"][:cases]
    if metrics:
        suite["metrics"] = metrics
        suite["gates"] = [g for g in suite["gates"] if "metric" not in g or g["metric"].split("_delta")[0] in metrics]
    path = folder / "sd35-core-subset.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path, len(suite["cases"]) * seeds, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="the first N cases of sd35-core (default 8)")
    parser.add_argument("--metrics", help="comma-separated metrics to keep (default: the suite's)")
    parser.add_argument("--gpus", type=int, default=8, help="project to this many GPUs too (default 8)")
    args, extra = parser.parse_known_args()
    if args.cases < 1:
        sys.exit("--cases must be at least 1")
    metrics = args.metrics.split(",") if args.metrics else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        suite, samples, total = subset_suite(args.cases, metrics, work)
        rows = [(name, *timed_run(suite, work, extra)) for name in ("first", "second (reference cache)")]
    print(f"sd35-core, first {args.cases} cases ({samples} of {total} samples), evals run {' '.join(extra)}")
    print(f"| run | measured s | s per sample | projected {total} samples, 1 GPU | {args.gpus} GPUs |")
    print("|---|---|---|---|---|")
    for name, wall, parts in rows:
        fixed = parts.get("startup", 0.0) + parts.get("finishing", 0.0)
        per_sample = (wall - fixed) / samples
        one = fixed + per_sample * total
        several = fixed + per_sample * math.ceil(total / args.gpus)
        print(f"| {name} | {wall:.1f} | {per_sample:.2f} | {one / 60:.1f} min | {several / 60:.1f} min |")


if __name__ == "__main__":
    main()
