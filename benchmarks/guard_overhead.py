"""What the guard (evals.guard) costs an image that passes: the same calls with and without it,
interleaved, and the detectors alone on a decoded batch (the only work the guard adds: it decodes
the latents itself, as the pipeline would, so that NaN and Inf are still visible).

    python benchmarks/guard_overhead.py                       # tiny model, CPU, 64x64, 4 steps
    python benchmarks/guard_overhead.py --device cuda --model random:sd35-large --size 1024 --steps 28

Prints milliseconds per image (medians over the calls whose images all passed; CPU seconds of the
process on the CPU, wall time on a GPU) and the difference; calls with a retried image are counted
and left out (a retry is the guard working, not its overhead).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from evals.guard import DEFAULT_DETECTORS, Guard, guarded


def _timed(work: Callable[[], Any], device: str) -> float:
    """Wall seconds on a GPU (synchronized); on the CPU the process's CPU seconds, which other work on
    a shared machine disturbs far less than the wall clock."""
    if not device.startswith("cuda"):
        start = time.process_time()
        work()
        return time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="model source, as `evals run --model` takes it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-sequence-length", type=int, default=77, help="T5 tokens (the pipeline's default is 256)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--detectors", nargs="+", default=list(DEFAULT_DETECTORS))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier figures on a shared machine)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from evals.models.sources import load_source, resolved_dtype_name

    dtype = resolved_dtype_name(args.dtype, args.device)
    pipe = load_source(args.model, dtype, args.device).pipeline
    pipe.set_progress_bar_config(disable=True)
    guarded_pipe = guarded(pipe, args.detectors)
    from evals.suite import load_suite

    cases = load_suite("smoke").cases  # prompts whose reference images pass the detectors
    prompts = [cases[i % len(cases)].prompt for i in range(args.batch)]
    settings = dict(
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=4.5,
        max_sequence_length=args.max_sequence_length,
    )

    def call(p: Any, seed: int) -> Any:
        generators = [torch.Generator().manual_seed(seed + i) for i in range(args.batch)]
        return p(prompt=prompts, generator=generators, output_type="pil", **settings)

    plain, guard_times, retried = [], [], 0
    call(pipe, 0), call(guarded_pipe, 0)  # warm-up: kernels, caches
    for repeat in range(args.repeats):  # interleaved, so that a drifting machine affects both alike
        seed = 1000 * repeat
        alone = _timed(partial(call, pipe, seed), args.device)
        behind = _timed(partial(call, guarded_pipe, seed), args.device)
        flagged = sum(o.tries > 0 for o in guarded_pipe.last_outcomes)
        retried += flagged
        if not flagged:  # an overhead is measured on images that pass; a retry is another cost
            plain.append(alone)
            guard_times.append(behind)
    if not plain:
        raise SystemExit("every call had a flagged image: no overhead to measure (try other prompts or seeds)")

    # The detectors alone, on a decoded batch of this size, as the guard runs them.
    decoded = torch.rand(args.batch, 3, args.size, args.size, device=args.device) * 0.8 + 0.1
    guard = Guard(args.detectors)
    guard.flags(decoded)
    detector_times = [_timed(lambda: guard.flags(decoded), args.device) for _ in range(args.repeats)]

    def per_image_ms(times: list[float]) -> float:
        return float(np.median(times)) * 1000 / args.batch

    base, with_guard, detectors = per_image_ms(plain), per_image_ms(guard_times), per_image_ms(detector_times)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    clock = f"CPU time, {args.threads} thread(s)" if args.device == "cpu" else "wall time"
    print(
        f"{args.model} on {args.device} ({name}), {dtype}, {args.batch} images of {args.size}x{args.size}, "
        f"{args.steps} steps, {clock}, detectors {', '.join(args.detectors)}; "
        f"medians of the {len(plain)} of {args.repeats} calls whose images all passed"
    )
    print(f"  pipeline alone:      {base:9.2f} ms/image")
    print(f"  behind the guard:    {with_guard:9.2f} ms/image")
    print(f"  difference:          {with_guard - base:+9.2f} ms/image ({(with_guard - base) / base:+.2%})")
    print(f"  detectors alone:     {detectors:9.2f} ms/image ({detectors / base:.2%} of the pipeline's time)")
    if retried:
        print(f"  note: {retried} images were flagged and made again; their calls are left out of the medians")


if __name__ == "__main__":
    main()
