"""Time the failure detectors on one batch, each alone and all six together, as a run calls them
(float32 images on the CPU, moved to the device by `detect_batch`).

    python benchmarks/detector_speed.py [--size 512] [--batch 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evals.detectors import DETECTORS, ImageBatch, detect_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = torch.as_tensor(rng.random((args.batch, args.size, args.size, 3)) * 0.8 + 0.1, dtype=torch.float32)

    def median_ms(work) -> float:
        work()  # warm-up: kernels, the blur matrices' cache
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            work()  # ends with the findings back on the CPU: synchronous
            times.append((time.perf_counter() - start) * 1000)
        return float(np.median(times))

    print(f"{args.batch} images of {args.size}x{args.size} on {args.device}, median of {args.repeats}:")
    for name, detector in DETECTORS.items():
        print(f"  {name}: {median_ms(lambda d=detector: d(ImageBatch(images.to(args.device)))):.1f} ms")
    total = median_ms(lambda: detect_batch(images.to(args.device), list(DETECTORS)))
    print(f"  all six: {total:.1f} ms ({total / args.batch:.1f} ms per image)")


if __name__ == "__main__":
    main()
