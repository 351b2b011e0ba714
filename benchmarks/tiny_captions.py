"""Does the tiny model follow its captions? Colour words, day and night, and how far apart prompts are.

    python benchmarks/tiny_captions.py [--weights FILE] [--seeds 8] [--steps 8] [--guidance 4.5] [--grid out.png]

Prints three checks (the CPU tests in tests/test_tiny_model.py assert the same on fewer seeds):
- hue: "a large COLOUR circle on a white background" for six colours; the dominant hue of the
  saturated pixels must be nearest to that colour's;
- luma: the same scenes "at night" / "in the dark" against "by day" / "in bright daylight";
- distance: PSNR between images of different prompts made from the same seed (median).
"""

from __future__ import annotations

import argparse
import colorsys
import itertools
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.generation import generate
from evals.models.tiny import T5_TOKENS
from evals.models.tiny_data import COLOURS
from evals.suite_types import Case, Generation, Sample

HUES = ["red", "orange", "yellow", "green", "blue", "purple"]
SCENES = [
    "a large {c} circle on a white background",
    "a {c} square in the centre on a grey background",
    "a large {c} diamond on a black background",
]
NIGHT = ["a {c} triangle on a grey background, at night", "a {c} shop sign that reads OPEN, in the dark"]
DAY = ["a {c} triangle on a grey background, by day", "a {c} shop sign that reads OPEN, in bright daylight"]
DISTINCT = [
    "a large red circle on a white background",
    "a blue shop sign that reads STOP",
    "green hills by day",
    "fine vertical stripes in yellow and purple",
    "a rainy street at night lit by a single lamp",
    "a small white cross on the left on a black background",
]


def _hue(rgb: tuple[float, float, float]) -> float:
    return colorsys.rgb_to_hsv(*rgb)[0]


REFERENCE_HUES = {name: _hue(COLOURS[name]) for name in HUES}


def dominant_colour(image: np.ndarray) -> str | None:
    """Nearest named hue to the circular mean hue of the saturated, lit pixels (HWC floats 0..1)."""
    flat = image.reshape(-1, 3).astype(np.float64)
    mx, mn = flat.max(1), flat.min(1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0)
    keep = (sat > 0.35) & (mx > 0.2)
    if keep.sum() < 20:
        return None
    hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in flat[keep]])
    angle = np.angle(np.exp(2j * np.pi * hues).mean()) / (2 * np.pi) % 1.0

    def distance(name: str) -> float:
        d = abs(angle - REFERENCE_HUES[name])
        return min(d, 1 - d)

    return min(HUES, key=distance)


def luma(image: np.ndarray) -> float:
    return float((image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114).mean())


def images(pipe, prompts: list[str], seeds: list[int], gen: Generation) -> dict[tuple[str, int], np.ndarray]:
    samples = [Sample(Case(f"p{i}", p, (s,)), s) for i, p in enumerate(prompts) for s in seeds]
    out: dict[tuple[str, int], np.ndarray] = {}
    for start in range(0, len(samples), gen.batch_size):
        batch = samples[start : start + gen.batch_size]
        pixels = generate(pipe, batch, gen).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for sample, image in zip(batch, pixels, strict=True):
            out[(sample.case.prompt, sample.seed)] = image
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    a8, b8 = (np.round(a * 255), np.round(b * 255))
    mse = float(((a8 - b8) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def caption_checks(pipe, seeds: list[int], gen: Generation) -> dict[str, object]:
    hue_prompts = [s.format(c=c) for s in SCENES for c in HUES]
    got = images(pipe, hue_prompts, seeds, gen)
    hits = [dominant_colour(img) == next(c for c in HUES if f" {c} " in p) for (p, _), img in got.items()]
    night = images(pipe, [s.format(c=c) for s in NIGHT for c in HUES], seeds, gen)
    day = images(pipe, [s.format(c=c) for s in DAY for c in HUES], seeds, gen)
    distinct = images(pipe, DISTINCT, seeds, gen)
    pairs = [psnr(distinct[(a, s)], distinct[(b, s)]) for a, b in itertools.combinations(DISTINCT, 2) for s in seeds]
    return {
        "hue_accuracy": sum(hits) / len(hits),
        "night_luma": [luma(i) for i in night.values()],
        "day_luma": [luma(i) for i in day.values()],
        "distinct_psnr_median": statistics.median(pairs),
        "images": {**got, **night, **day, **distinct},
    }


def save_grid(pictures: list[np.ndarray], path: Path, columns: int = 8, scale: int = 2) -> None:
    from PIL import Image

    rows = -(-len(pictures) // columns)
    h, w, _ = pictures[0].shape
    canvas = np.ones((rows * (h + 2), columns * (w + 2), 3))
    for i, image in enumerate(pictures):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = image
    picture = Image.fromarray((canvas.clip(0, 1) * 255).round().astype(np.uint8))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, help="a tiny weights file (default: the committed one)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, nargs="+", default=[8])
    p.add_argument("--guidance", type=float, nargs="+", default=[4.5])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", type=Path, help="save the images of the last setting here")
    args = p.parse_args()
    from diffusers import StableDiffusion3Pipeline

    from evals.models.tiny import WEIGHTS_FILE, load_trained_components

    pipe = StableDiffusion3Pipeline(**load_trained_components(args.weights or WEIGHTS_FILE)).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    print("steps guidance  hue-acc  night-luma(max/mean)  day-luma(min/mean)  distinct-psnr-median")
    result: dict[str, object] = {}
    for steps, guidance in itertools.product(args.steps, args.guidance):
        gen = Generation(64, 64, steps, guidance, 16, T5_TOKENS)
        result = caption_checks(pipe, seeds, gen)
        night, day = result["night_luma"], result["day_luma"]
        print(
            f"{steps:5d} {guidance:8.1f}  {result['hue_accuracy']:7.3f}  {max(night):.3f}/{statistics.mean(night):.3f}"
            f"           {min(day):.3f}/{statistics.mean(day):.3f}          {result['distinct_psnr_median']:.1f} dB"
        )
    if args.grid:
        pictures = result["images"]
        save_grid([img for (_, s), img in pictures.items() if s == 0], args.grid)
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
