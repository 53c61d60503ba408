"""Inlier counts of true vs false pairs on the dev photos with RootSIFT, for several putative-match distances.

0.9 is the official (DELF) threshold; RootSIFT descriptors are non-negative, so nearly every nearest neighbour
falls under it and chance affine models collect ~10 inliers. Prints, per distance, the inliers of one positive per
sampled easy query and the median / max over distractor pairs.

    PYTHONPATH=. python benchmarks/sweep_rerank_distance.py [--queries 8] [--distractors 5]
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np

from d2r.features.base import LocalFeatures
from d2r.query.verify import RerankConfig, geometric_verification


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--distractors", type=int, default=5)
    ap.add_argument("--distances", type=float, nargs="+", default=[0.9, 0.7, 0.6, 0.5, 0.4])
    dev_root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instance_bench_dev"
    ap.add_argument("--dev-root", type=Path, default=dev_root)
    args = ap.parse_args()

    import cv2

    root = args.dev_root
    g = pickle.loads((root / "gnd.pkl").read_bytes())
    sift = cv2.SIFT_create(nfeatures=1000)
    cache: dict[str, LocalFeatures] = {}

    def rootsift(name):
        if name not in cache:
            img = cv2.imread(str(root / name), cv2.IMREAD_GRAYSCALE)
            kp, d = sift.detectAndCompute(img, None)
            d = np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-12))
            d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
            k = len(kp)
            loc = np.array([p.pt for p in kp], np.float32).reshape(k, 2)
            cache[name] = LocalFeatures(loc, np.ones(k, np.float32), np.ones(k, np.float32), d)
        return cache[name]

    rng = np.random.default_rng(0)
    distractors = [j for j, n in enumerate(g["imlist"]) if "/dis_" in n]
    easy = [i for i, e in enumerate(g["gnd"]) if len(e["easy"])]
    queries = rng.choice(easy, min(args.queries, len(easy)), replace=False)
    negs = rng.choice(distractors, min(args.distractors, len(distractors)), replace=False)
    out = []
    for dist in args.distances:
        pos, neg = [], []
        for i in queries:
            q = rootsift(g["qimlist"][i])
            cands = [rootsift(g["imlist"][g["gnd"][i]["easy"][0]])] + [rootsift(g["imlist"][j]) for j in negs]
            r = geometric_verification(q, cands, RerankConfig(descriptor_distance=dist))
            pos.append(int(r[0]))
            neg.extend(int(x) for x in r[1:])
        out.append({"distance": dist, "positives": sorted(pos), "distractor_median": float(np.median(neg)),
                    "distractor_max": max(neg)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
