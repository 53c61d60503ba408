"""Inlier counts of verified pairs on the dev photos, split by ground truth: how many chance inliers do
non-matching pairs reach?  Calibrates ``rerank.min_inliers`` of the "usac" verification.

For every query, the top ``--top`` database images of a finished run (``RUN/ranks.npy``, junk for the Medium
protocol skipped) are verified with ``rerank.method: usac``; the counts of positives (easy / hard) and of
non-matching images (neither positive nor junk in any protocol) are summarised, with the false-promotion rate
P(inliers >= T | non-matching) for each T.

    PYTHONPATH=. python benchmarks/calibrate_inliers.py --run runs/dev/base --cache runs/dev/cache
    PYTHONPATH=. python benchmarks/calibrate_inliers.py --run runs/dev/base --cache runs/dev/cache \
        --correspondences hamming --codebook runs/dev/cache/k8192.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from d2r.features.base import whole_image
from d2r.codebook import Codebook
from d2r.eval.revisitop import load_gnd
from d2r.features.store import FeatureStore
from d2r.query.verify import RerankConfig, geometric_verification


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="the bench cache holding the db-* feature store")
    ap.add_argument("--gnd", type=Path, default=Path("../shared/data/instance_bench_dev/gnd.pkl"))
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--model", default="affine")
    ap.add_argument("--correspondences", choices=("ratio", "hamming"), default="ratio")
    ap.add_argument("--query-assignments", type=int, default=1,
                    help="hamming: query-side multiple assignment")
    ap.add_argument("--codebook", type=Path, help="the run's codebook (needed by --correspondences hamming)")
    args = ap.parse_args()
    g = load_gnd(args.gnd)
    ranks = np.load(args.run / "ranks.npy")
    store_path = json.loads((args.run / "metrics.json").read_text())["notes"]["database_extraction"].get("store")
    store = FeatureStore.open(store_path) if store_path else FeatureStore.open(sorted(args.cache.glob("db-*"))[0])
    self_ids = g.query_db_ids()
    cfg = RerankConfig(method="usac", model=args.model, workers=2, correspondences=args.correspondences,
                       query_assignments=args.query_assignments)
    book = Codebook.load(args.codebook) if args.codebook else None
    counts = {"easy": [], "hard": [], "negative": []}
    for q in range(g.num_queries):
        gt = g.gnd[q]
        easy, hard, junk = set(gt.easy.tolist()), set(gt.hard.tolist()), set(gt.junk.tolist()) | {int(self_ids[q])}
        cands = [int(i) for i in ranks[q][: args.top + 1] if i >= 0 and int(i) not in junk][: args.top]
        query = whole_image(store.get(g.qimlist[q]))
        inl = geometric_verification(query, [whole_image(store.get(g.imlist[i])) for i in cands], cfg, book)
        for i, n in zip(cands, inl.tolist()):
            counts["easy" if i in easy else "hard" if i in hard else "negative"].append(n)
    out = {}
    for k, v in counts.items():
        v = np.asarray(v)
        out[k] = {"pairs": int(v.size), "percentiles_50_90_99_99.9": np.percentile(v, [50, 90, 99, 99.9]).tolist(),
                  "max": int(v.max()) if v.size else None}
    neg = np.asarray(counts["negative"])
    out["false_promotion_rate"] = {t: float((neg >= t).mean()) for t in (4, 5, 6, 7, 8, 10, 12, 15, 20)}
    for k in ("easy", "hard"):
        v = np.asarray(counts[k])
        out[f"{k}_promoted"] = {t: float((v >= t).mean()) for t in (4, 5, 6, 7, 8, 10, 12, 15, 20)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
