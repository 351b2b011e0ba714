"""Every detector's findings on the labelled images (256 and 512 px) and a few odd ones (NaN, Inf,
tiny, black, over-range), to check that a change to the detectors keeps what they find.

    python benchmarks/detector_findings.py dump before.json      # at the old commit (this file copied there)
    python benchmarks/detector_findings.py dump after.json
    python benchmarks/detector_findings.py compare before.json after.json

Only `run_detectors` and `benchmarks.labelled_images` are used, which older commits have too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.labelled_images import clean_set, defect_set
from evals.detectors import DETECTORS, run_detectors


def images() -> list[tuple[str, np.ndarray]]:
    items = [(i.name, i.image) for size in (256, 512) for i in [*clean_set(size), *defect_set(size)]]
    rng = np.random.default_rng(0)
    half_nan = np.full((40, 72, 3), np.nan)
    half_nan[:, :30] = 0.5
    noise = rng.random((64, 48, 3))
    items += [
        ("half-nan", half_nan),
        ("inf-specks", np.where(rng.random((64, 48, 3)) > 0.99, np.inf, noise)),
        ("tiny", rng.random((12, 20, 3))),
        ("black", np.zeros((64, 64, 3))),
        ("over-range", np.ones((33, 65, 3)) * 1.2),
    ]
    return items


def dump(out: Path) -> None:
    from tqdm import tqdm

    found = {}
    for name, image in tqdm(images(), unit="image"):
        findings = run_detectors(image, list(DETECTORS))
        found[f"{name}{image.shape}"] = {d: f.to_dict() for d, f in findings.items()}
    out.write_text(json.dumps(found, indent=0))
    print(f"{len(found)} images -> {out}")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    if a.keys() != b.keys():
        print("the two files hold different images")
        return 2
    flips, worst = [], {}
    for image in a:
        for detector, old in a[image].items():
            new = b[image][detector]
            if old["flagged"] != new["flagged"]:
                flips.append(f"{image} {detector}: {old['flagged']} -> {new['flagged']}")
            error = abs(old["score"] - new["score"]) / max(abs(old["score"]), 1e-12)
            worst[detector] = max(worst.get(detector, 0.0), error)
    print(f"{len(a)} images, {len(flips)} flags changed")
    print("\n".join(flips))
    print("largest relative score change per detector: " + ", ".join(f"{d} {e:.1e}" for d, e in worst.items()))
    return 1 if flips else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dump").add_argument("out", type=Path)
    both = sub.add_parser("compare")
    both.add_argument("before", type=Path)
    both.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
