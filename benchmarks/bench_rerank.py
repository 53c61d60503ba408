"""Geometric-verification speed: ms per (query, candidate) pair for ~1000 x 1000 descriptors.

Compares, on the same pairs:
  official  — scipy cKDTree nearest neighbours (distance_upper_bound 0.9) + skimage.measure.ransac(AffineTransform,
              3 samples, 10 px, 1000 trials), the official ``MatchFeatures`` recipe;
  d2r       — ``d2r.rerank.geometric_verification`` (BLAS matching + numba RANSAC kernel, all 1000 trials);
  usac      — the same with ``method: usac`` (mutual NN + ratio test, OpenCV MAGSAC++, affine and homography).
and each half apart (matching: cKDTree vs BLAS; RANSAC: skimage vs numba on the same putative matches).

Pairs: ``--source synthetic`` (default; clustered 128-D descriptors so that many nearest neighbours fall under 0.9,
plus a known affine inlier set) or ``--source dev`` (RootSIFT from OpenCV SIFT, 1000 per image, on real photo pairs
of ../shared/data/instance_bench_dev, read in place).

    PYTHONPATH=. python benchmarks/bench_rerank.py [--pairs 20] [--skimage-pairs 5] [--source synthetic|dev]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

from d2r.features.base import LocalFeatures
from d2r.kernels.ransac import ransac_affine
from d2r.query.verify import RerankConfig, geometric_verification, putative_matches


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_pairs(n_pairs, n=1000, dim=128, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(64, dim)))

    def desc(m):
        return _unit(centres[rng.integers(0, 64, m)] + rng.normal(0, 0.065, (m, dim)))

    def feats(loc, d):
        k = len(loc)
        return LocalFeatures(loc.astype(np.float32), np.ones(k, np.float32), np.ones(k, np.float32), d)

    a = np.array([[0.9, -0.2], [0.15, 1.05]])
    q_loc = rng.uniform([0, 0], [1024, 768], (n, 2))
    q_desc = desc(n)
    query = feats(q_loc, q_desc)
    cands = []
    for _ in range(n_pairs):
        n_in = int(rng.integers(20, 200))
        c_desc = desc(n)
        c_loc = rng.uniform([0, 0], [1024, 768], (n, 2))
        c_desc[:n_in] = _unit(q_desc[:n_in] + rng.normal(0, 0.01, (n_in, dim)))
        c_loc[:n_in] = np.linalg.solve(a, (q_loc[:n_in] - [30, 10]).T).T
        cands.append(feats(c_loc, c_desc))
    return query, cands


def dev_pairs(n_pairs, root):
    import cv2
    import pickle

    g = pickle.loads((root / "gnd.pkl").read_bytes())
    sift = cv2.SIFT_create(nfeatures=1000)

    def rootsift(name):
        img = cv2.imread(str(root / name), cv2.IMREAD_GRAYSCALE)
        kp, d = sift.detectAndCompute(img, None)
        d = np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-12))
        loc = np.array([k.pt for k in kp], np.float32)
        k = len(kp)
        return LocalFeatures(loc, np.ones(k, np.float32), np.ones(k, np.float32), _unit(d))

    qname = g["qimlist"][0]
    query = rootsift(qname)
    cands = [rootsift(g["imlist"][i]) for i in range(n_pairs)]
    return query, cands


def official_pair(query, cand):
    from scipy.spatial import cKDTree
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    t0 = time.perf_counter()
    _, nn = cKDTree(cand.descriptors).query(query.descriptors, distance_upper_bound=0.9)
    keep = nn != len(cand)
    src, dst = cand.locations[nn[keep]].astype(float), query.locations[keep].astype(float)
    t1 = time.perf_counter()
    inliers = 0
    if len(src) > 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, inl = ransac((src, dst), AffineTransform, min_samples=3, residual_threshold=10.0, max_trials=1000, rng=0)
        inliers = 0 if inl is None else int(inl.sum())
    return inliers, t1 - t0, time.perf_counter() - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--skimage-pairs", type=int, default=5, help="pairs timed with the official recipe (slow)")
    ap.add_argument("--source", choices=("synthetic", "dev"), default="synthetic")
    dev_root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instance_bench_dev"
    ap.add_argument("--dev-root", type=Path, default=dev_root)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    query, cands = synthetic_pairs(args.pairs) if args.source == "synthetic" else dev_pairs(args.pairs, args.dev_root)
    n_feat = float(np.mean([len(c) for c in cands]))
    geometric_verification(query, cands[:2], RerankConfig(workers=1))  # compile

    from scipy.spatial import cKDTree
    from threadpoolctl import threadpool_limits

    res = {"source": args.source, "pairs": len(cands), "query_features": len(query), "candidate_features": n_feat}

    def timed(fn):
        """(best wall s, CPU s of that run) over the repeats."""
        best = (np.inf, np.inf)
        for _ in range(args.repeats):
            w, c = time.perf_counter(), time.process_time()
            fn()
            best = min(best, (time.perf_counter() - w, time.process_time() - c))
        return best

    per = 1000.0 / len(cands)
    # d2r end to end: 1 thread everywhere (BLAS too), then 2 workers
    with threadpool_limits(1):
        w, c = timed(lambda: geometric_verification(query, cands, RerankConfig(workers=1)))
    res["d2r_ms_per_pair_1thread"], res["d2r_cpu_ms_per_pair_1thread"] = w * per, c * per
    w, _ = timed(lambda: geometric_verification(query, cands, RerankConfig(workers=2)))
    res["d2r_ms_per_pair_workers2"] = w * per
    counts = geometric_verification(query, cands, RerankConfig(workers=1))
    # method "usac": mutual NN + ratio test, OpenCV MAGSAC++ (affine / homography)
    for model in ("affine", "homography"):
        cfg = RerankConfig(method="usac", model=model, workers=1)
        with threadpool_limits(1):
            w, c = timed(lambda: geometric_verification(query, cands, cfg))
        res[f"usac_{model}_ms_per_pair_1thread"], res[f"usac_{model}_cpu_ms_per_pair"] = w * per, c * per
    res["usac_affine_inliers"] = geometric_verification(query, cands, RerankConfig(method="usac", workers=1)).tolist()

    # the halves, single-threaded: matching (BLAS vs cKDTree) and RANSAC (numba vs skimage below)
    with threadpool_limits(1):
        matches = [putative_matches(query.descriptors, c.descriptors, 0.9) for c in cands]
        w, _ = timed(lambda: [putative_matches(query.descriptors, c.descriptors, 0.9) for c in cands])
        res["blas_match_ms_per_pair"] = w * per
        w, _ = timed(lambda: [cKDTree(c.descriptors).query(query.descriptors, distance_upper_bound=0.9) for c in cands])
        res["ckdtree_match_ms_per_pair"] = w * per
    res["putative_matches_mean"] = float(np.mean([len(m[0]) for m in matches]))
    pairs = [(c.locations[ii].astype(float), query.locations[qi].astype(float)) for c, (qi, ii) in zip(cands, matches)]
    w, _ = timed(lambda: [ransac_affine(s, d, 1000, 10.0, np.uint64(0)) for s, d in pairs if len(s) >= 4])
    res["numba_ransac_ms_per_pair"] = w * per

    k = min(args.skimage_pairs, len(cands))
    with threadpool_limits(1):
        c0 = time.process_time()
        off = [official_pair(query, c) for c in cands[:k]]
        res["official_cpu_ms_per_pair"] = 1000 * (time.process_time() - c0) / k
    res["official_match_ms_per_pair"] = 1000 * float(np.mean([o[1] for o in off]))
    res["skimage_ransac_ms_per_pair"] = 1000 * float(np.mean([o[2] for o in off]))
    res["official_ms_per_pair"] = res["official_match_ms_per_pair"] + res["skimage_ransac_ms_per_pair"]
    res["speedup_wall_1thread"] = res["official_ms_per_pair"] / res["d2r_ms_per_pair_1thread"]
    res["speedup_cpu_1thread"] = res["official_cpu_ms_per_pair"] / res["d2r_cpu_ms_per_pair_1thread"]
    res["inliers_d2r_vs_official"] = [[int(counts[i]), off[i][0]] for i in range(k)]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
