"""Near-duplicate detection on the dev photos: planted copies (resized 0.25–2×, JPEG quality 10–95, crops to
70 %, rotations ±5°, contrast, noise) of some photos among the other photos as distractors; precision and
recall of the pairs found by image-match's rule (the peer package itself, when ``--peer PYTHON`` has it) and
by d2r's signature index (same rule: a shared word, normalised distance < threshold), and images/s; with
``--second-opinion``, also of `d2r duplicates` on an engine: the signature pairs plus, for every image no
signature pair reached, its ASMK* + verification hits with at least ``rerank.min_inliers`` inliers (an engine of
the shipped defaults built over the same images, written losslessly as PNG, codebook trained on them).

    python -m benchmarks.bench_duplicates [--originals 60] [--copies 5] [--max-side 640] [--peer PYTHON]
        [--second-opinion] [--json F]

A pair is correct when both images come from the same original (original–copy or copy–copy); recall is over all
such pairs, also per kind of change (original–copy pairs). Distractors that are themselves near-duplicates of
each other (frames of one ScanNet scene) count against precision.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks._record import header, write_json
from d2r.duplicates.find import find_duplicates
from d2r.duplicates.index import SignatureIndex
from d2r.engine import Engine
from d2r.engine.config import EngineConfig
from d2r.duplicates.signature import DEFAULT, signature_of_pixels, words
from d2r.features.image import load_image

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "instance_bench_dev" / "images"
KINDS = ("resize", "jpeg", "crop", "rotate", "contrast", "noise")


def change(a: np.ndarray, kind: str, rng) -> tuple[np.ndarray, str]:
    """One planted copy of ``a`` and a description of the change."""
    h, w = a.shape[:2]
    if kind == "resize":
        s = float(np.exp(rng.uniform(np.log(0.25), np.log(2.0))))
        return cv2.resize(a, (max(8, int(w * s)), max(8, int(h * s))), interpolation=cv2.INTER_AREA if s < 1
                          else cv2.INTER_CUBIC), f"resize {s:.2f}"
    if kind == "jpeg":
        q = int(rng.integers(10, 96))
        buf = cv2.imencode(".jpg", cv2.cvtColor(a, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])[1]
        return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), f"jpeg q{q}"
    if kind == "crop":
        keep = float(rng.uniform(0.7, 0.98))
        ch, cw = int(h * keep), int(w * keep)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return np.ascontiguousarray(a[y:y + ch, x:x + cw]), f"crop {keep:.2f}"
    if kind == "rotate":
        deg = float(rng.uniform(-5, 5))
        m = cv2.getRotationMatrix2D((w / 2, h / 2), deg, 1.0)
        return cv2.warpAffine(a, m, (w, h), borderMode=cv2.BORDER_CONSTANT), f"rotate {deg:+.1f}"
    if kind == "contrast":
        gain, bias = float(rng.uniform(0.6, 1.4)), float(rng.uniform(-30, 30))
        return np.clip(a.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8), f"contrast {gain:.2f}"
    sigma = float(rng.uniform(3, 15))
    noisy = a.astype(np.float32) + rng.normal(0, sigma, a.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8), f"noise {sigma:.1f}"


def build(originals: int, copies: int, max_side: int, seed: int):
    """(images, source of each: the row of its original (an original's own row; −1: distractor), kind of
    each ('' for originals and distractors))."""
    rng = np.random.default_rng(seed)
    files = sorted(p for p in DEV.rglob("*") if p.is_file())
    chosen = set(rng.choice(len(files), size=min(originals, len(files)), replace=False).tolist())
    images, source, kinds = [], [], []
    for k, f in enumerate(files):
        a = load_image(f, max_side=max_side)
        row = len(images)
        images.append(a)
        source.append(row if k in chosen else -1)
        kinds.append("")
        if k in chosen:
            for kind in rng.choice(KINDS, size=copies, replace=copies > len(KINDS)):
                b, _ = change(a, str(kind), rng)
                images.append(np.ascontiguousarray(b))
                source.append(row)
                kinds.append(str(kind))
    return images, np.array(source), kinds


def score(pairs_a, pairs_b, source, kinds) -> dict:
    src = np.asarray(source)
    correct = (src[pairs_a] >= 0) & (src[pairs_a] == src[pairs_b])
    groups = {}
    for i, s in enumerate(src.tolist()):
        if s >= 0:
            groups.setdefault(s, []).append(i)
    true_pairs = sum(len(g) * (len(g) - 1) // 2 for g in groups.values())
    found = {(int(a), int(b)) for a, b, c in zip(pairs_a, pairs_b, correct) if c}
    found |= {(b, a) for a, b in found}
    out = {"pairs": int(len(pairs_a)), "precision": float(correct.mean()) if len(pairs_a) else 1.0,
           "recall": len(found) / 2 / max(true_pairs, 1), "recall_by_change": {}}
    for kind in KINDS:
        copies = [i for i, k in enumerate(kinds) if k == kind]
        hit = [(int(src[i]), i) in found for i in copies]  # original (its file index == its row) found
        out["recall_by_change"][kind] = round(float(np.mean(hit)), 3) if hit else None
    return out


def second_opinion(images, source, kinds, threshold: float) -> dict:
    """`d2r duplicates ENGINE`'s rule: signature pairs, then verified ASMK* hits for the images left alone."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        names = [f"{i:05d}" for i in range(len(images))]
        for name, a in zip(names, images):
            cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(a, cv2.COLOR_RGB2BGR))
        t = time.perf_counter()
        engine = Engine.create(Path(tmp) / "engine", EngineConfig())
        engine.index(folder, progress=False)
        index_s = time.perf_counter() - t
        t = time.perf_counter()
        report = find_duplicates([(n, folder / f"{n}.png") for n in names], threshold, engine=engine,
                                 second_opinion=True, progress=False)
        find_s = time.perf_counter() - t
    row = {n: i for i, n in enumerate(names)}
    a = np.array([row[p.a] for p in report.pairs], np.int64)
    b = np.array([row[p.b] for p in report.pairs], np.int64)
    verified = sum(p.rule == "verified" for p in report.pairs)
    return dict(score(a, b, source, kinds), verified_pairs=int(verified), index_s=round(index_s, 1),
                find_s=round(find_s, 1), signatures_per_s=round(len(images) / find_s, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--originals", type=int, default=60)
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--max-side", type=int, default=640, help="photos read at this longest side (memory)")
    ap.add_argument("--threshold", type=float, default=DEFAULT.threshold)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer", help="a Python with image-match 1.1.2 (the peer's own rule and timing)")
    ap.add_argument("--second-opinion", action="store_true",
                    help="also the engine's ASMK* + verification second opinion (builds an engine: minutes)")
    ap.add_argument("--json", help="write the results here ('-': stdout)")
    args = ap.parse_args()
    images, source, kinds = build(args.originals, args.copies, args.max_side, args.seed)
    rows = {}
    t = time.perf_counter()
    sigs = np.stack([signature_of_pixels(a) for a in images])
    sig_s = time.perf_counter() - t
    index = SignatureIndex()
    index.add(np.arange(len(images)), sigs)
    t = time.perf_counter()
    a, b, _ = index.pairs(args.threshold)
    pair_s = time.perf_counter() - t
    rows["d2r"] = dict(score(a, b, source, kinds), signatures_per_s=round(len(images) / sig_s, 1),
                       pairs_s=round(pair_s, 3))
    if args.peer:
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(Path(tmp) / "in.npz", **{f"image_{i}": x for i, x in enumerate(images)})
            subprocess.run([args.peer, str(REPO / "tests" / "image_match_peer.py"), str(Path(tmp) / "in.npz"),
                            str(Path(tmp) / "out.npz")], check=True)
            out = np.load(Path(tmp) / "out.npz")
        w = out["words"]
        share = (w[:, None, :] == w[None, :, :]).any(axis=2)  # image-match's candidates: a word in common
        ok = np.triu(share & (out["distances"] < args.threshold), k=1)
        pa, pb = np.nonzero(ok)
        rows["image-match"] = dict(score(pa, pb, source, kinds),
                                   signatures_per_s=round(len(images) / float(out["seconds"]), 1),
                                   same_signatures=bool((out["signatures"] == sigs).all()),
                                   same_words=bool((w == words(sigs)).all()))
    if args.second_opinion:
        rows["d2r + second opinion"] = second_opinion(images, source, kinds, args.threshold)
    result = {"header": header(), "images": len(images), "originals": int(args.originals),
              "copies_per_original": args.copies, "threshold": args.threshold, "rows": rows}
    print(f"{len(images)} images ({args.originals} originals × {args.copies} copies among distractors), "
          f"threshold {args.threshold}")
    kinds = " | ".join(f"recall {k}" for k in KINDS)
    print(f"| rule | pairs | precision | recall | {kinds} | signatures/s |")
    print("|---|---|---|---|" + "---|" * len(KINDS) + "---|")
    for name, r in rows.items():
        rec = r["recall_by_change"]
        by = " | ".join("-" if rec[k] is None else f"{rec[k]:.2f}" for k in KINDS)
        print(f"| {name} | {r['pairs']} | {r['precision']:.3f} | {r['recall']:.3f} | {by} | "
              f"{r['signatures_per_s']} |")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
