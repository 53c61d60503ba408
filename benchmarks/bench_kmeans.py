"""k-means for codebooks: d2r (Lloyd, mini-batch) side by side with faiss and scikit-learn, same data, same
number of iterations, same kind of init (k random points), on the same cores.

Data: ``--n`` random-but-clustered 128-D descriptors (a mixture of ``--modes`` Gaussians of random spread,
rows L2-normalised like SIFT/DELF descriptors), or real descriptors from ``--descriptors FILE.npy``.
Reported per method: wall seconds of the fit, the inertia the method reports (d2r and faiss: at the assignment
step of the last iteration), and — unless ``--no-eval`` — the inertia of the final centroids evaluated exactly
with d2r's assignment (the fair comparison; not timed). faiss is optional (``pip install faiss-cpu`` in the
benchmark environment only). Example:

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/bench_kmeans.py --k 1024 --iterations 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def clustered(n: int, dim: int, modes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((modes, dim)).astype(np.float32)
    spread = rng.uniform(0.3, 1.0, modes).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    step = 1 << 17
    for s in range(0, n, step):
        m = min(step, n - s)
        z = rng.integers(0, modes, m)
        block = centres[z] + spread[z, None] * rng.standard_normal((m, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:s + m] = block
    return out


def exact_inertia(x, centroids) -> float:
    from d2r.codebook import Codebook
    from d2r.kernels.kmeans import assigned_sq_distances

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    labels = Codebook(c.copy()).assign(x)[:, 0]
    return float(assigned_sq_distances(x, c, labels).sum())


def run_d2r(x, k, it, seed, method, batch):
    from d2r.codebook import train_codebook

    book, info = train_codebook(x, k, iterations=it, init="random", method=method, seed=seed,
                                batch_size=batch, progress=False)
    return book.centroids, info["final_inertia"], info["iterations"]


def run_faiss(x, k, it, seed, method, batch):
    import faiss

    faiss.omp_set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    km = faiss.Kmeans(x.shape[1], k, niter=it, seed=seed, max_points_per_centroid=1 << 30, verbose=False)
    km.train(x)
    return km.centroids, float(km.obj[-1]), len(km.obj)


def run_sklearn(x, k, it, seed, method, batch):
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if method == "minibatch":
        km = MiniBatchKMeans(k, init="random", n_init=1, max_iter=it, batch_size=batch, random_state=seed,
                             tol=0.0, max_no_improvement=None, compute_labels=False)
        km.fit(x)
        return km.cluster_centers_, None, km.n_iter_
    km = KMeans(k, init="random", n_init=1, max_iter=it, tol=0.0, algorithm="lloyd", random_state=seed)
    km.fit(x)
    return km.cluster_centers_, float(km.inertia_), km.n_iter_


METHODS = {
    "d2r-lloyd": (run_d2r, "lloyd"),
    "d2r-minibatch": (run_d2r, "minibatch"),
    "faiss": (run_faiss, "lloyd"),
    "sklearn-kmeans": (run_sklearn, "lloyd"),
    "sklearn-minibatch": (run_sklearn, "minibatch"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--modes", type=int, default=20_000, help="Gaussian modes of the synthetic data")
    p.add_argument("--descriptors", help="real (N, D) float32 .npy instead of synthetic data")
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int,
                   help="mini-batch size for both mini-batch methods (max(8192, 2k))")
    p.add_argument("--no-eval", action="store_true", help="skip the exact evaluation of final inertia")
    p.add_argument("--jsonl", help="append one JSON line per method to this file")
    args = p.parse_args(argv)

    if args.descriptors:
        from d2r._validate import as_descriptors

        x = as_descriptors(np.load(args.descriptors), name=args.descriptors)
        data = args.descriptors
    else:
        x = clustered(args.n, args.dim, args.modes, args.seed)
        data = f"synthetic n={args.n} dim={args.dim} modes={args.modes} seed={args.seed}"
    batch = args.batch_size or max(8192, 2 * args.k)
    print(f"# data: {data}, N={x.shape[0]}, D={x.shape[1]}; k={args.k}, iterations={args.iterations}, "
          f"threads={os.environ.get('OMP_NUM_THREADS', '?')}, cpus={os.cpu_count()}", flush=True)
    if any(m.startswith("d2r") for m in args.methods.split(",")):  # compile the numba kernels before timing
        run_d2r(x[:2000].copy(), 16, 2, 0, "lloyd", 512)
        run_d2r(x[:2000].copy(), 16, 1, 0, "minibatch", 512)
    print(f"{'method':<18} {'seconds':>9} {'iters':>5} {'reported inertia':>17} {'final inertia':>15}",
          flush=True)
    for name in args.methods.split(","):
        fn, method = METHODS[name]
        try:
            t = time.perf_counter()
            centroids, reported, iters = fn(x, args.k, args.iterations, args.seed, method, batch)
            seconds = time.perf_counter() - t
        except ImportError as exc:
            print(f"{name:<18} skipped ({exc})", flush=True)
            continue
        final = None if args.no_eval else exact_inertia(x, centroids)
        rep = f"{reported:.6g}" if reported is not None else "-"
        fin = f"{final:.6g}" if final is not None else "-"
        print(f"{name:<18} {seconds:9.1f} {iters:5d} {rep:>17} {fin:>15}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"method": name, "k": args.k, "n": int(x.shape[0]), "dim": int(x.shape[1]),
                                    "iterations": args.iterations, "iterations_run": int(iters),
                                    "seconds": round(seconds, 2), "reported_inertia": reported,
                                    "final_inertia": final, "data": data, "batch_size": batch}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
