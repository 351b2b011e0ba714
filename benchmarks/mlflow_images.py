"""What logging one sample's images to MLflow costs the tracker's worker: the reference image, the
candidate image and its comparison grid, at a suite's image size, through the tracker
(`evals/tracking.py`: the run directory's PNGs copied, the grid encoded at a fast PNG level) against
`MlflowClient.log_image` for the same three images (what the tracker did before). A local sqlite
store in a temporary folder; photographs from scikit-image.

    python benchmarks/mlflow_images.py [--size 512] [--samples 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.labelled_images import photo
from evals.reports.images import comparison_grid
from evals.rundir import load_png
from evals.tracking import MlflowTracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, image in (("ref", photo("astronaut", args.size)), ("cand", photo("coffee", args.size))):
            Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{name}.png")
        ref, cand = folder / "ref.png", folder / "cand.png"
        tracker = MlflowTracker(f"sqlite:///{folder / 'mlflow.db'}")
        tracker.start_run("bench", "images", {}, {})
        tracker.start_candidate("fp8", {})
        client, run, child = tracker.client, tracker.parent_id, tracker.candidate_ids["fp8"]
        assert run is not None

        def through_tracker(i: int) -> None:
            tracker.log_reference_image(f"s{i}", ref)
            tracker.log_candidate_image("fp8", f"s{i}", cand, ref)

        def through_log_image(i: int) -> None:
            reference, candidate = load_png(ref), load_png(cand)
            client.log_image(run, reference, key=f"m{i}", step=0)
            client.log_image(child, candidate, key=f"m{i}", step=0)
            client.log_image(child, comparison_grid(reference, candidate), key=f"grid-m{i}", step=0)

        for name, log in (("tracker", through_tracker), ("MlflowClient.log_image", through_log_image)):
            log(-1)  # warm: imports, first writes
            start = time.perf_counter()
            for i in range(args.samples):
                log(i)
            ms = (time.perf_counter() - start) / args.samples * 1000
            print(f"{name:24s} {ms:6.1f} ms per sample ({args.size}x{args.size}: reference, candidate, grid)")


if __name__ == "__main__":
    main()
