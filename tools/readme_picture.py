"""Render the README's picture of results: `d2r demo`'s rankings of three queries as one JPEG.

    python tools/readme_picture.py [--demo d2r-demo] [--out benchmarks/results/demo_results.jpg]

Runs the demo into ``--demo`` (or reuses it when it holds a finished demo index) and draws, for the queries of
the cat, the coffee cup and the motorcycle (photos bundled with scikit-image), the query and its top four hits:
green frame = the same instance, red = not, with the hit's id, score and verified inliers, and the regions the
index holds for it in yellow. Every pixel comes from scikit-image's bundled photos (the demo's two scikit-learn
photos are not among these queries; a hit derived from one would be drawn as a grey box).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from d2r import demo
from d2r.engine import Engine

QUERIES = ("query-cat", "query-coffee", "query-motorcycle")
NOT_SKIMAGE = ("temple", "flower")  # scikit-learn's sample photos: not redistributed in a picture
THUMB, PAD, CAPTION = 200, 8, 30


def _tile(path: Path, boxes, colour, caption: str, hide: bool) -> Image.Image:
    tile = Image.new("RGB", (THUMB, THUMB + CAPTION), "white")
    draw = ImageDraw.Draw(tile)
    if hide:
        draw.rectangle([0, 0, THUMB - 1, THUMB - 1], fill=(200, 200, 200))
        draw.text((10, THUMB // 2), "(scikit-learn photo)", fill="black")
    else:
        img = Image.open(path).convert("RGB")
        scale = min(THUMB / img.width, THUMB / img.height)
        small = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
        x0, y0 = (THUMB - small.width) // 2, (THUMB - small.height) // 2
        tile.paste(small, (x0, y0))
        for x1, y1, x2, y2 in boxes:
            draw.rectangle([x0 + x1 * scale, y0 + y1 * scale, x0 + x2 * scale, y0 + y2 * scale], outline="yellow",
                           width=2)
    if colour is not None:
        draw.rectangle([0, 0, THUMB - 1, THUMB - 1], outline=colour, width=5)
    for k, line in enumerate(caption.split("\n")[:2]):
        draw.text((4, THUMB + 2 + 13 * k), line, fill="black")
    return tile


def render(demo_dir: Path, out: Path, top: int = 4) -> Path:
    summary = demo.run(demo_dir, top_k=top, progress=False)
    engine = Engine.open(Path(summary["index"]))
    rows = [r for r in summary["results"] if r["query"] in QUERIES]
    sheet = Image.new("RGB", ((THUMB + PAD) * (top + 1) + PAD, (THUMB + CAPTION + PAD) * len(rows) + PAD), "white")
    for i, r in enumerate(rows):
        y = PAD + i * (THUMB + CAPTION + PAD)
        tiles = [_tile(demo_dir / "queries" / f"{r['query']}.jpg", [], (128, 128, 128), f"query\n{r['query']}",
                       False)]
        for h in r["hits"][:top]:
            caption = f"#{h['rank']} {h['image_id']}\ns={h['score']:.3f} inliers={h['inliers']}"
            tiles.append(_tile(demo_dir / "images" / f"{h['image_id']}.jpg", engine.boxes(h["image_id"]),
                               (40, 170, 40) if h["correct"] else (200, 30, 30), caption,
                               h["image_id"].startswith(NOT_SKIMAGE)))
        for j, tile in enumerate(tiles):
            sheet.paste(tile, (PAD + j * (THUMB + PAD), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    sheet.save(tmp, format="JPEG", quality=85, optimize=True)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=Path("d2r-demo"), help="the demo's folder (run or reused)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_results.jpg"))
    args = ap.parse_args(argv)
    print(render(args.demo, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
