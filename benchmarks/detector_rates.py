"""False-positive rate and recall of the failure detectors on the labelled set of
`benchmarks/labelled_images.py`, with the default thresholds.

    python benchmarks/detector_rates.py [--size 256] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.labelled_images import clean_set, defect_set
from evals.detectors import DETECTORS, run_detectors


def measure(size: int) -> tuple[dict[str, list[str]], dict[tuple[str, str], list[bool]], int, float]:
    """False positives per detector (names of clean photos it flagged), hits per (defect, strength)."""
    names = list(DETECTORS)
    false_positives: dict[str, list[str]] = {n: [] for n in names}
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    start = time.perf_counter()
    clean = 0
    for item in clean_set(size):
        clean += 1
        for name, finding in run_detectors(item.image, names).items():
            if finding.flagged:
                false_positives[name].append(item.name)
    count = clean
    for item in defect_set(size):
        count += 1
        assert item.defect is not None
        hits[(item.defect, item.strength)].append(run_detectors(item.image, [item.defect])[item.defect].flagged)
    return false_positives, hits, clean, (time.perf_counter() - start) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="side of the square test images")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args()
    false_positives, hits, clean, seconds = measure(args.size)
    lines = [
        f"Clean photographs: {clean} ({args.size}x{args.size}); seconds per image and detector set: {seconds:.3f}",
        "",
        "| detector | false positives on clean photos |",
        "|---|---|",
    ]
    lines += [f"| {n} | {len(v)}/{clean}{' (' + ', '.join(v) + ')' if v else ''} |" for n, v in false_positives.items()]
    documents = [
        item.name
        for item in clean_set(args.size, documents=True)
        if any(f.flagged for f in run_detectors(item.image, list(DETECTORS)).values())
    ]
    lines += ["", f"Document scans flagged (text lines read as row banding): {', '.join(documents) or 'none'}"]
    lines += ["", "| defect | strength | recall |", "|---|---|---|"]
    for (defect, strength), flags in sorted(hits.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lines.append(f"| {defect} | {strength} | {sum(flags)}/{len(flags)} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
