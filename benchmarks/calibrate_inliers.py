"""Inlier counts of verified pairs on the dev photos, split by ground truth: how many chance inliers do
non-matching pairs reach?  Calibrates ``rerank.min_inliers`` per feature type and verification method by the
project's rule: the smallest count above every chance count of the non-matching pairs (max + 1).

For every query, the top ``--top`` database images of a finished run's INITIAL ranking (``RUN/ranks_initial.npy``,
else ``ranks.npy``; Medium junk and the query itself skipped) are verified the way the run verifies
(``rerank`` of ``RUN/metrics.json``: method, ratio, LightGlue weights, model...). Counts the run already has come
from its pair cache (``notes.pair_counts``, see :mod:`d2r.bench.run`), so calibrating a LightGlue run costs nothing
beyond the run; the others are verified here and added to that cache. The counts of positives (easy / hard) and of
non-matching images (neither positive nor junk in any protocol) are summarised with the rate
P(inliers >= T) of each group for a few T and at the rule's threshold.

    PYTHONPATH=. python benchmarks/calibrate_inliers.py --run runs/learned/aliked_usac --top 100
    PYTHONPATH=. python benchmarks/calibrate_inliers.py --run runs/learned/aliked_lightglue --top 10 \
        --out runs/learned/calibration_aliked_lightglue.json
    # a run without verification, verified here with other options (no cache):
    PYTHONPATH=. python benchmarks/calibrate_inliers.py --run runs/dev/base --cache runs/dev/cache \
        --correspondences hamming --codebook runs/dev/cache/k8192.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.bench.run import PairCounts
from d2r.codebook import Codebook
from d2r.eval.revisitop import load_gnd
from d2r.features.base import whole_image
from d2r.features.store import FeatureStore
from d2r.query.config import RerankConfig
from d2r.query.order import candidates
from d2r.query.verify import verify_ids

THRESHOLDS = (4, 6, 8, 10, 12, 15, 20, 30, 40, 50, 60, 80, 100)


def rule(negative_counts) -> int:
    """The project's rule: the smallest inlier count above every chance count of the non-matching pairs."""
    return int(max(negative_counts, default=0)) + 1


def summarise(counts: dict) -> dict:
    """``counts``: {"easy" | "hard" | "negative": [inliers]} -> percentiles, maxima, the rule's threshold and
    the rate of each group at or above each threshold."""
    out = {}
    for k, v in counts.items():
        v = np.asarray(v)
        out[k] = {"pairs": int(v.size), "percentiles_50_90_99_99.9":
                  np.percentile(v, [50, 90, 99, 99.9]).tolist() if v.size else None,
                  "max": int(v.max()) if v.size else None}
    t_rule = rule(counts["negative"])
    out["min_inliers_by_rule"] = t_rule
    thresholds = sorted(set(THRESHOLDS) | {t_rule})
    for k, name in (("negative", "false_promotion_rate"), ("easy", "easy_promoted"), ("hard", "hard_promoted")):
        v = np.asarray(counts[k])
        out[name] = {t: float((v >= t).mean()) if v.size else None for t in thresholds}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished d2r bench revisitop run folder")
    ap.add_argument("--cache", type=Path, help="the bench cache holding the db-* feature store (default: the "
                                               "store the run names)")
    ap.add_argument("--gnd", type=Path, default=Path("../shared/data/instance_bench_dev/gnd.pkl"))
    ap.add_argument("--top", type=int, default=100, help="candidates per query (of the initial ranking)")
    ap.add_argument("--model", help="verify with this model instead of the run's (no cache)")
    ap.add_argument("--correspondences", choices=("ratio", "hamming"), help="... these correspondences")
    ap.add_argument("--query-assignments", type=int, help="hamming: query-side multiple assignment")
    ap.add_argument("--codebook", type=Path, help="the run's codebook (needed by --correspondences hamming)")
    ap.add_argument("--out", type=Path, help="also write the summary (and every pair's count) to this JSON")
    args = ap.parse_args(argv)
    metrics_path = args.run / "metrics.json"
    metrics = _io.read_json(metrics_path, {})
    if "config" not in metrics:
        sys.exit(f"{metrics_path}: not a finished d2r bench run")
    if metrics.get("dataset", {}).get("query_in_database") is False:
        sys.exit(f"{args.run}: queries were extracted separately; this script calibrates on queries that are "
                 "database images (their features are the database's)")
    notes = metrics.get("notes", {})
    store_path = notes.get("database_extraction", {}).get("store")
    if args.cache is not None:
        stores = sorted(args.cache.glob("db-*"))
        store_path = str(stores[0]) if stores and not store_path else store_path
    if not store_path:
        sys.exit(f"{metrics_path}: names no feature store; give --cache")
    store = FeatureStore.open(store_path)

    section = {k: v for k, v in metrics["config"]["rerank"].items() if k in RerankConfig.__dataclass_fields__}
    overrides = {k: v for k, v in (("model", args.model), ("correspondences", args.correspondences),
                                   ("query_num_assignments", args.query_assignments)) if v is not None}
    cfg = RerankConfig.from_dict({**section, **overrides, "enabled": True, "workers": 2}).check()
    # The run's cache holds pairs verified exactly this way only when nothing was overridden.
    pairs = PairCounts(notes["pair_counts"]) if notes.get("pair_counts") and not overrides else None
    book = Codebook.load(args.codebook) if args.codebook else None
    if cfg.correspondences == "hamming" and book is None:
        sys.exit("--correspondences hamming needs --codebook (the run's codebook)")

    g = load_gnd(args.gnd)
    ranks_path = args.run / "ranks_initial.npy"
    ranks = np.load(ranks_path if ranks_path.exists() else args.run / "ranks.npy")
    self_ids = g.query_db_ids()
    counts: dict = {"easy": [], "hard": [], "negative": []}
    per_pair = []
    verified_here = 0
    for q in range(g.num_queries):
        gt = g.gnd[q]
        easy, hard = set(gt.easy.tolist()), set(gt.hard.tolist())
        junk = set(gt.junk.tolist()) | {int(self_ids[q])}
        cands = candidates(ranks[q][ranks[q] >= 0], args.top, junk)
        name = g.qimlist[q]
        known = pairs.known(name) if pairs is not None else {}
        verified_here += sum(g.imlist[i] not in known for i in cands)
        query = whole_image(store.get(name))
        found = verify_ids(query, [g.imlist[i] for i in cands], lambda n: whole_image(store.get(n)), cfg, book,
                           known)
        if pairs is not None:
            pairs.update(name, known)
        for i in cands:
            n = int(found[g.imlist[i]])
            group = "easy" if i in easy else "hard" if i in hard else "negative"
            counts[group].append(n)
            per_pair.append([name, g.imlist[i], group, n])
    if pairs is not None:
        pairs.save()
    out = summarise(counts)
    out["run"] = str(args.run)
    out["verification"] = {k: v for k, v in cfg.to_dict().items() if k not in ("enabled", "workers")}
    out["top"] = args.top
    out["pairs_verified_here"] = verified_here
    print(json.dumps(out, indent=1))
    if args.out is not None:
        _io.write_json(args.out, {**out, "pairs": per_pair})


if __name__ == "__main__":
    main()
