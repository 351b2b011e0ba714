"""What step error adds to a candidate's generation time: the teacher-forced transformer calls at the
recorded steps (and, once per candidate, the layer profile), against generating the same images.

In one process, as `evals run` does it: the reference pipeline records its trajectory while it makes
a batch; the candidate (blocks compiled on a GPU, as `compile: auto` does) makes the same batch; then
`teacher_forced` runs the candidate's transformer on the reference's inputs at the recorded steps.
Everything is warmed up once (compilation), then timed over `--repeats` batches.

    python benchmarks/step_error_overhead.py --model random:sd35-large --device cuda --steps 28 --recorded 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    import torch

    from evals.api import compile_mode
    from evals.candidates import build_candidate
    from evals.compiling import compile_blocks
    from evals.generation import generate
    from evals.models.precision import load_policy
    from evals.models.sources import load_source, resolved_dtype_name
    from evals.step_error.profile import profile
    from evals.step_error.steps import recorded_steps
    from evals.step_error.trajectory import recording, teacher_forced
    from evals.suite_types import Case, Generation, Sample

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd35-large")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--policy", default="fp8-e4m3-rowwise")
    parser.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--recorded", default="4", help="recorded steps: N or all (default 4)")
    parser.add_argument("--batch", type=int, default=2, help="images per pipeline call (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", default="auto", choices=("auto", "none", "blocks"))
    args = parser.parse_args()

    dtype = resolved_dtype_name("auto", args.device)
    model = load_source(args.model, dtype, args.device, drop_t5=True)
    gen = Generation(args.size, args.size, args.steps, 4.5, args.batch, 77)
    cand = build_candidate(model, load_policy(args.policy), gen)
    if compile_mode(args.compile, args.device) == "blocks":
        compile_blocks(cand.pipeline.transformer)
    recorded = "all" if args.recorded == "all" else int(args.recorded)
    steps = recorded_steps(recorded, args.steps)
    batch = [Sample(Case(f"c{i}", f"a photo of object number {i} on a table", (i,)), i) for i in range(args.batch)]
    with recording(model.pipeline.transformer, steps, gen.guidance, len(batch)) as out:
        generate(model.pipeline, batch, gen)
    traj = out[0]

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        _sync(args.device)
        start = time.perf_counter()
        fn()
        _sync(args.device)
        return time.perf_counter() - start

    generate(cand.pipeline, batch, gen)  # warm-up: compilation
    teacher_forced(cand.pipeline.transformer, traj)
    gen_s = min(timed(lambda: generate(cand.pipeline, batch, gen)) for _ in range(args.repeats))
    step_s = min(timed(lambda: teacher_forced(cand.pipeline.transformer, traj)) for _ in range(args.repeats))
    profile_s = timed(lambda: profile(model.pipeline.transformer, cand.pipeline.transformer, traj, len(steps) // 2))
    errors = teacher_forced(cand.pipeline.transformer, traj).relative
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{args.model}, {args.policy}, {args.size}x{args.size}, {args.steps} steps, {args.batch} images per call, "
        f"{name}, torch {torch.__version__}"
    )
    print("| recorded steps | candidate images s | step error s | overhead | layer profile s (once) | step error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {len(steps)} of {args.steps} | {gen_s:.2f} | {step_s:.2f} | {100 * step_s / gen_s:.1f}% "
        f"| {profile_s:.2f} | {float(errors.mean()):.4f} |"
    )


if __name__ == "__main__":
    main()
