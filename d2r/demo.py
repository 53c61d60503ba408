"""``d2r demo``: the whole engine, offline, on photos that ship inside installed packages.

Instances are photos bundled with scikit-image and scikit-learn (a Chinese temple, a rocket, a cat, ...). The
database holds each instance under synthetic changes (placed small inside an unrelated scene, seen from another
viewpoint, under other light) among distractors; queries are further changes (a cropped, occluded, re-lit view).
The demo trains a small RootSIFT codebook, indexes with R-ASMK* (whole image + keypoint-density regions),
searches every query with geometric re-ranking, prints the rankings and writes an HTML summary.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from d2r import _io
from d2r.engine import Engine
from d2r.engine.config import EngineConfig

log = logging.getLogger(__name__)

MAX_SIDE = 480


@dataclass
class DemoImage:
    name: str
    instance: str | None  # None for distractors
    pixels: np.ndarray


def _bundled() -> tuple[dict, dict]:
    """(instances, distractors): name -> RGB uint8, all from files inside installed packages."""
    from skimage import data as sk
    from sklearn.datasets import load_sample_image

    def rgb(a):
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        return np.ascontiguousarray(a[:, :, :3]).astype(np.uint8)

    instances = {
        "temple": load_sample_image("china.jpg"), "flower": load_sample_image("flower.jpg"),
        "astronaut": sk.astronaut(), "cat": sk.chelsea(), "coffee": sk.coffee(), "rocket": sk.rocket(),
        "galaxies": sk.hubble_deep_field(), "motorcycle": sk.stereo_motorcycle()[0], "coins": sk.coins(),
        "cameraman": sk.camera(),
    }
    distractors = {"brick": sk.brick(), "grass": sk.grass(), "gravel": sk.gravel(), "moon": sk.moon(),
                   "page": sk.page(), "text": sk.text(), "cells": sk.cell(), "horse": sk.horse().astype(np.uint8) * 255,
                   "retina": sk.retina(), "immunohisto": sk.immunohistochemistry(), "clock": sk.clock(),
                   "logo": sk.logo()}
    return ({k: _fit(rgb(v)) for k, v in instances.items()}, {k: _fit(rgb(v)) for k, v in distractors.items()},
            _fit(rgb(sk.stereo_motorcycle()[1])))


def _fit(a: np.ndarray, side: int = MAX_SIDE) -> np.ndarray:
    s = side / max(a.shape[:2])
    return cv2.resize(a, (round(a.shape[1] * s), round(a.shape[0] * s)), interpolation=cv2.INTER_AREA) if s < 1 else a


def _viewpoint(a, rng, strength=0.18):
    h, w = a.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    jitter = rng.uniform(-strength, strength, size=(4, 2)) * [w, h]
    dst = np.float32(src + jitter)
    dst -= dst.min(axis=0)
    size = (int(dst[:, 0].max()), int(dst[:, 1].max()))
    return cv2.warpPerspective(a, cv2.getPerspectiveTransform(src, dst), size, borderMode=cv2.BORDER_REFLECT)


def _light(a, gamma, gain):
    x = (a.astype(np.float32) / 255.0) ** gamma * np.asarray(gain, np.float32)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def _occlude(a, rng, fraction=0.2):
    a = a.copy()
    h, w = a.shape[:2]
    oh, ow = int(h * np.sqrt(fraction)), int(w * np.sqrt(fraction))
    y, x = rng.integers(0, h - oh), rng.integers(0, w - ow)
    a[y:y + oh, x:x + ow] = rng.integers(0, 255, size=3)
    return a


def _in_scene(a, background, rng, scale=0.55):
    canvas = cv2.resize(background, (MAX_SIDE, int(MAX_SIDE * 0.75)))
    small = cv2.resize(a, (int(a.shape[1] * scale), int(a.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    small = small[: canvas.shape[0], : canvas.shape[1]]
    y = rng.integers(0, canvas.shape[0] - small.shape[0] + 1)
    x = rng.integers(0, canvas.shape[1] - small.shape[1] + 1)
    canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
    return canvas


def _crop(a, rng, keep=0.7):
    h, w = a.shape[:2]
    ch, cw = int(h * keep), int(w * keep)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return cv2.resize(a[y:y + ch, x:x + cw], (int(cw * 1.3), int(ch * 1.3)))


def make_dataset(seed: int = 0) -> tuple[list[DemoImage], list[DemoImage]]:
    """(database, queries). Every query's instance appears in the database three or four times."""
    rng = np.random.default_rng(seed)
    instances, distractors, motorcycle_right = _bundled()
    backgrounds = list(distractors.values())
    database, queries = [], []
    for name, a in instances.items():
        database += [
            DemoImage(f"{name}-in-scene", name, _in_scene(a, backgrounds[rng.integers(len(backgrounds))], rng)),
            DemoImage(f"{name}-viewpoint", name, _viewpoint(a, rng)),
            DemoImage(f"{name}-dusk", name, _light(a, 1.7, (0.8, 0.75, 1.0))),
        ]
        query = _occlude(_light(_crop(a, rng), 0.7, (1.0, 1.0, 0.9)), rng)
        queries.append(DemoImage(f"query-{name}", name, query))
    database.append(DemoImage("motorcycle-other-camera", "motorcycle", motorcycle_right))
    for name, a in distractors.items():
        database.append(DemoImage(f"distractor-{name}", None, a))
        database.append(DemoImage(f"distractor-{name}-warped", None, _viewpoint(a, rng, 0.25)))
    return database, queries


def _write_jpeg(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(a, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError(f"{path}: could not write image")


def run(out: Path, top_k: int = 5, progress: bool = True, seed: int = 0) -> dict:
    """Build the demo under ``out`` (images/, queries/, index/, summary.html) and return its results."""
    out = Path(out)
    timings = {}
    t0 = time.perf_counter()
    database, queries = make_dataset(seed)
    for item in database:
        _write_jpeg(out / "images" / f"{item.name}.jpg", item.pixels)
    for item in queries:
        _write_jpeg(out / "queries" / f"{item.name}.jpg", item.pixels)
    timings["make_images_s"] = time.perf_counter() - t0

    config = EngineConfig.from_dict({
        "features": {"name": "rootsift", "options": {"max_features": 1000}},
        "regions": {"proposer": "density", "max_boxes": 3},
        "codebook": {"size": 512, "iterations": 10, "seed": seed},
        "index": {"kernel": "asmk_star", "mode": "aggregation"},
    })
    index_dir = out / "index"
    engine = Engine.open(index_dir) if (index_dir / "engine.json").exists() else Engine.create(index_dir, config)
    t = time.perf_counter()
    report = engine.index(out / "images", progress=progress)
    timings["index_s"] = time.perf_counter() - t

    instance_of = {d.name: d.instance for d in database}
    results = []
    t = time.perf_counter()
    for q in queries:
        ts = time.perf_counter()
        hits = engine.search(out / "queries" / f"{q.name}.jpg", top_k=top_k)
        results.append({"query": q.name, "instance": q.instance, "seconds": time.perf_counter() - ts,
                        "hits": [dict(h.to_dict(), correct=instance_of.get(h.image_id) == q.instance)
                                 for h in hits]})
    timings["search_s"] = time.perf_counter() - t
    relevant = {q.name: sum(1 for d in database if d.instance == q.instance) for q in queries}
    precision = [sum(h["correct"] for h in r["hits"][:3]) / min(3, relevant[r["query"]]) for r in results]
    summary = {
        "out": str(out), "index": str(index_dir), "html": str(out / "summary.html"),
        "database_images": len(database), "queries": len(queries), "indexed": len(report.indexed),
        "failed": report.failed, "mean_precision_at_3": float(np.mean(precision)),
        "top1_correct": int(sum(r["hits"][0]["correct"] for r in results if r["hits"])),
        "timings": {k: round(v, 2) for k, v in timings.items()}, "results": results,
    }
    _write_html(out / "summary.html", out, results, engine)
    return summary


def _thumb_html(rel: str, boxes, label: str, ok: bool | None) -> str:
    colour = "#2a2" if ok else "#c22" if ok is not None else "#888"
    overlay = "".join(f'<div class="box" data-box="{",".join(f"{v:.0f}" for v in box)}"></div>' for box in boxes)
    return (f'<figure style="border:3px solid {colour}"><div class="wrap"><img src="{html.escape(rel)}">{overlay}'
            f'</div><figcaption>{html.escape(label)}</figcaption></figure>')


def _write_html(path: Path, out: Path, results: list, engine) -> None:
    rows = []
    for r in results:
        cells = [_thumb_html(f"queries/{r['query']}.jpg", [], r["query"], None)]
        for h in r["hits"]:
            label = f"#{h['rank']} {h['image_id']} s={h['score']:.3f} inl={h['inliers']}"
            cells.append(_thumb_html(f"images/{h['image_id']}.jpg", engine.boxes(h["image_id"]), label, h["correct"]))
        rows.append(f"<div class='row'>{''.join(cells)}</div>")
    page = f"""<!doctype html><meta charset="utf-8"><title>d2r demo</title>
<style>body{{font-family:sans-serif}} .row{{display:flex;gap:8px;margin:10px 0}}
figure{{margin:0;width:190px}} .wrap{{position:relative}} img{{width:100%;display:block}}
.box{{position:absolute;border:2px solid yellow}} figcaption{{font-size:11px}}</style>
<h1>d2r demo — R-ASMK* + geometric re-ranking</h1>
<p>First column: query. Then the top hits (green: same instance, red: not), with the regions the index holds for them in yellow.
Index: {html.escape(str(engine.path))}</p>
{''.join(rows)}
<script>for(const b of document.querySelectorAll('.box')){{const i=b.parentElement.querySelector('img');const f=()=>{{
const [x1,y1,x2,y2]=b.dataset.box.split(',').map(Number);const s=i.width/i.naturalWidth;
Object.assign(b.style,{{left:x1*s+'px',top:y1*s+'px',width:(x2-x1)*s+'px',height:(y2-y1)*s+'px'}});}};
i.complete?f():i.addEventListener('load',f);}}</script>"""
    _io.write_bytes(path, page.encode())


def print_summary(summary: dict) -> None:
    for r in summary["results"]:
        print(f"\nquery {r['query']}  ({r['seconds'] * 1000:.0f} ms)")
        for h in r["hits"]:
            mark = "✓" if h["correct"] else "✗"
            inl = "-" if h["inliers"] < 0 else h["inliers"]
            print(f"  {h['rank']:>2}. {mark} {h['image_id']:<32} score {h['score']:8.4f}  inliers {inl}")
    t = summary["timings"]
    print(f"\n{summary['top1_correct']}/{summary['queries']} queries have the right instance first; "
          f"mean precision@3 {summary['mean_precision_at_3']:.2f}")
    print(f"images {t['make_images_s']:.1f} s, indexing {summary['indexed']} images {t['index_s']:.1f} s, "
          f"{summary['queries']} searches {t['search_s']:.1f} s")
    print(f"index:   {summary['index']}\nsummary: {summary['html']}")
