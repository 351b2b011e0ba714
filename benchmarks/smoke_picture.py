"""The picture in docs/ci-gate.md: each smoke prompt's reference image (seed 0) with its case id.

    python benchmarks/smoke_picture.py RUN_DIR [--out docs/images/smoke-references.png] [--candidate POLICY]

RUN_DIR is any run of suites/smoke.yaml; with --candidate, each reference is shown beside that
candidate's image of the same sample.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SCALE = 2
LABEL = 14


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/images/smoke-references.png"))
    p.add_argument("--candidate", help="also show this candidate's image of each sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--columns", type=int, default=7)
    args = p.parse_args()
    records = [json.loads(line) for line in (args.run_dir / "records.jsonl").read_text().splitlines() if line]
    chosen = {}
    for r in records:
        wanted = not args.candidate or r["policy"] == args.candidate
        if r["seed"] == args.seed and r["case_id"] not in chosen and wanted:
            chosen[r["case_id"]] = r
    tiles = []
    for case_id, r in chosen.items():
        images = [Image.open(args.run_dir / r["reference_image"]).convert("RGB")]
        if args.candidate:
            images.append(Image.open(args.run_dir / r["image"]).convert("RGB"))
        w, h = images[0].width * SCALE, images[0].height * SCALE
        tile = Image.new("RGB", (w * len(images) + 2 * (len(images) - 1), h + LABEL), "white")
        for i, image in enumerate(images):
            tile.paste(image.resize((w, h), Image.NEAREST), (i * (w + 2), 0))
        ImageDraw.Draw(tile).text((2, h + 1), case_id, fill="black")
        tiles.append(tile)
    cols = min(args.columns, len(tiles))
    rows = -(-len(tiles) // cols)
    tw, th = tiles[0].size
    sheet = Image.new("RGB", (cols * (tw + 4), rows * (th + 4)), "white")
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        sheet.paste(tile, (c * (tw + 4), r * (th + 4)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"{args.out}: {len(tiles)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
