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
the reference cached; `+ screening` adds the candidate's teacher-forced steps (4 per sample).

    python benchmarks/time_to_verdict.py --cases 8 --metrics psnr,ssim --model random:sd35-large --floor
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="the first N cases of sd35-core (default 8)")
    parser.add_argument("--metrics", help="comma-separated metrics to keep (default: the suite's)")
    parser.add_argument("--gpus", type=int, default=8, help="project to this many GPUs too (default 8)")
    parser.add_argument("--floor", action="store_true", help="time the compute floor first (`evals bench`, GPU)")
    parser.add_argument("--compare-launched", action="store_true", help="a third run: cached, without CUDA graphs")
    args, extra = parser.parse_known_args()
    if args.cases < 1:
        sys.exit("--cases must be at least 1")
    metrics = args.metrics.split(",") if args.metrics else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = extra[extra.index("--model") + 1] if "--model" in extra else "random:sd35-large"
        floor = floor_step_ms(model, work) if args.floor else None
        suite, samples, total = subset_suite(args.cases, metrics, work)
        names = ["first", "second (reference cache)"]
        rows = [(name, *timed_run(suite, work, extra)) for name in names]
        if args.compare_launched:  # the same cached run with every kernel launched, no CUDA graph
            rows.append(("second, launched (--no-cuda-graph)", *timed_run(suite, work, [*extra, "--no-cuda-graph"])))
        last = max((work / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        verdict = json.loads((last / "verdict.json").read_text())["results"]
        figures = [f"{r['gate']}: {r['actual']:.4g} {r['status']}" for r in verdict if r["policy"] != "noise-floor"]
    print(f"sd35-core, first {args.cases} cases ({samples} of {total} samples), evals run {' '.join(extra)}")
    print(f"| run | measured s | s per sample | projected {total} samples, 1 GPU | {args.gpus} GPUs |")
    print("|---|---|---|---|---|")
    for name, wall, parts in rows:
        fixed = parts.get("startup", 0.0) + parts.get("finishing", 0.0)
        per_sample = (wall - fixed) / samples
        one = fixed + per_sample * total
        several = fixed + per_sample * math.ceil(total / args.gpus)
        print(f"| {name} | {wall:.1f} | {per_sample:.2f} | {one / 60:.1f} min | {several / 60:.1f} min |")
    for name, _, parts in rows:
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    print("gates of the last run: " + "; ".join(figures))
    if floor is not None:
        ref_ms, cand_ms = floor
        steps = yaml.safe_load(CORE.read_text())["generation"]["steps"]
        screening = 4 * cand_ms / 1000  # the candidate's recorded steps, teacher-forced
        print(
            f"floor (evals bench --cuda-graph, 1 image per step call): reference {ref_ms:.1f} ms, "
            f"candidate {cand_ms:.1f} ms"
        )
        print("| run | s per sample | floor s per sample | ratio | floor + screening | ratio |")
        print("|---|---|---|---|---|---|")
        for (name, wall, parts), both in zip(rows, (True, False, False), strict=False):
            fixed = parts.get("startup", 0.0) + parts.get("finishing", 0.0)
            per_sample = (wall - fixed) / samples
            base = steps * ((ref_ms if both else 0.0) + cand_ms) / 1000
            print(
                f"| {name} | {per_sample:.2f} | {base:.2f} | {per_sample / base:.2f}x | {base + screening:.2f} | "
                f"{per_sample / (base + screening):.2f}x |"
            )
        for name, wall, parts in rows:
            fixed = parts.get("startup", 0.0) + parts.get("finishing", 0.0)
            print(f"{name}: whole suite projected {(fixed + (wall - fixed) / samples * total) / 60:.1f} min")


if __name__ == "__main__":
    main()
