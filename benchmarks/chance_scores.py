"""ASMK* similarities of the top-ranked images of a finished run, split by ground truth: the scale a fused
verification score (``rerank.fusion_weight``) has to match.

For every query, the run's index is searched again (top ``--top``, Medium junk skipped) and the scores of
positives and of non-matching images (neither positive nor junk) are summarised.

    PYTHONPATH=. python benchmarks/chance_scores.py --run runs/dev/base --cache runs/dev/cache
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from d2r.eval.revisitop import load_gnd
from d2r.features.base import whole_image
from d2r.features.store import FeatureStore
from d2r.index.database import Database


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (its index/ is searched)")
    ap.add_argument("--cache", type=Path, required=True, help="the bench cache holding the db-* feature store")
    ap.add_argument("--gnd", type=Path, default=Path("../shared/data/instance_bench_dev/gnd.pkl"))
    ap.add_argument("--top", type=int, default=100)
    args = ap.parse_args()
    g = load_gnd(args.gnd)
    stores = sorted(args.cache.glob("db-*"))
    if not stores:
        raise SystemExit(f"{args.cache}: no db-* feature store")
    store = FeatureStore.open(stores[0])
    db = Database.open(args.run / "index")
    pos, junk = g.protocol("medium", query_in_database=True)
    position = {n: i for i, n in enumerate(g.imlist)}
    pos_s, neg_s = [], []
    for qi, name in enumerate(g.qimlist):
        r = db.search(whole_image(store.get(name)).descriptors, top_k=args.top + 1)
        p, j = set(pos[qi].tolist()), set(junk[qi].tolist())
        for i, s in zip(r.ids.tolist(), r.scores.tolist()):
            k = position[i]
            if k not in j:
                (pos_s if k in p else neg_s).append(s)
    q = [50, 90, 99, 99.9, 100]
    print(f"positives ({len(pos_s)}): percentiles {q}: {np.percentile(pos_s, q).round(4).tolist()}")
    print(f"non-matching ({len(neg_s)}): percentiles {q}: {np.percentile(neg_s, q).round(4).tolist()}")


if __name__ == "__main__":
    main()
