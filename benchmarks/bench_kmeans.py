"""k-means for codebooks: d2r (Lloyd, mini-batch) side by side with faiss and scikit-learn, same data, same
number of iterations, same kind of init (k random points), on the same cores.

Two modes. ``--store STORE --sizes 1024,8192`` (the codebook a user trains): the real ``d2r train-codebook
--store STORE --size K`` command (defaults: sample, seeding, 20 Lloyd iterations) against scikit-learn
``KMeans(init="k-means++")`` and ``MiniBatchKMeans`` (their defaults, ``random_state=0``) fitted on the SAME
sample (the bench draws it as the command does and checks the codebook's ``training_data_hash``); contenders
interleaved, ``--repeat`` rounds, threads pinned to ``--threads`` for all (NUMBA_NUM_THREADS / OMP / BLAS env
for the command, threadpoolctl for scikit-learn); final inertia of every result computed the same way (exact
nearest word, float64) on the whole sample; ``os.getloadavg()`` beside every run; ``--json`` prints the runs
and their summary as one JSON document. Example:

    PYTHONPATH=. python benchmarks/bench_kmeans.py --store /tmp/kmeans-store --sizes 1024,8192 --repeat 3 \
        --json > kmeans.json

The other mode (``--k``, below) compares fixed-iteration Lloyd / mini-batch runs on synthetic or given data.

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
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

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


# ---- --store: the train-codebook command vs scikit-learn on the same sample -----------------------------
def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _thread_env(threads: int) -> dict:
    names = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return dict(os.environ, **{name: str(threads) for name in names})


def run_d2r_command(store, k, out, threads, extra=()):
    """``python -m d2r train-codebook --store STORE --size K`` (defaults) as a user runs it: wall seconds of
    the whole command, its JSON summary, the codebook's centroids and metadata."""
    from d2r.codebook import Codebook

    cmd = [sys.executable, "-m", "d2r", "train-codebook", "--store", str(store), "--size", str(k), "--out",
           str(out), "--force", "--json", "--quiet", *extra]
    t = time.perf_counter()
    res = subprocess.run(cmd, env=_thread_env(threads), capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    summary = json.loads(res.stdout)
    book = Codebook.load(out)
    return seconds, summary, book


def run_sklearn_fit(x, k, threads, mini: bool):
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    km = MiniBatchKMeans(k, random_state=0) if mini else KMeans(k, init="k-means++", random_state=0)
    with threadpool_limits(limits=threads):
        t = time.perf_counter()
        km.fit(x)
        seconds = time.perf_counter() - t
    return seconds, km


def bench_store(args) -> dict:
    """Interleaved runs of the contenders on the store's default training sample: the JSON document."""
    from d2r.codebook.kmeans import _data_hash, load_training_descriptors

    def say(*a):
        print(*a, file=sys.stderr if args.json else sys.stdout, flush=True)

    x, meta = load_training_descriptors(store=args.store, progress=False)  # the command's defaults
    data_hash = _data_hash(x)
    sizes = [int(v) for v in args.sizes.split(",")]
    contenders = args.contenders.split(",")
    say(f"# sample: {x.shape[0]} x {x.shape[1]} descriptors of {meta['training_images']} images "
        f"({args.store}), hash {data_hash}; threads {args.threads}; load {_load()}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        # compile/load the numba kernels once (the cache is shared with the timed commands)
        run_d2r_command(args.store, 16, Path(tmp) / "warm.npz", args.threads)
        for rep in range(args.repeat):
            for k in sizes:
                order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
                for name in order:
                    before = _load()
                    row = {"contender": name, "k": k, "repeat": rep, "load_before": before}
                    if name == "d2r":
                        seconds, summary, book = run_d2r_command(args.store, k, Path(tmp) / "cb.npz",
                                                                 args.threads)
                        if book.metadata.get("training_data_hash") != data_hash:
                            raise RuntimeError("train-codebook trained on another sample than the bench's")
                        centroids = book.centroids
                        row.update(seconds=round(seconds, 2), train_seconds=summary["seconds"],
                                   iterations=summary["iterations"], init=book.metadata.get("init"))
                    else:
                        seconds, km = run_sklearn_fit(x, k, args.threads, mini=name == "sklearn-minibatch")
                        centroids = km.cluster_centers_
                        row.update(seconds=round(seconds, 2), iterations=int(km.n_iter_))
                    row["load_after"] = _load()
                    row["inertia"] = exact_inertia(x, centroids)
                    runs.append(row)
                    say(json.dumps(row))
    summary = []
    for k in sizes:
        for name in contenders:
            rs = [r for r in runs if r["k"] == k and r["contender"] == name]
            sec = sorted(r["seconds"] for r in rs)
            entry = {"contender": name, "k": k, "runs": len(rs), "seconds_min": sec[0],
                     "seconds_median": float(np.median(sec)), "inertia": rs[0]["inertia"],
                     "inertia_spread": max(r["inertia"] for r in rs) - min(r["inertia"] for r in rs)}
            if name == "d2r":
                tr = sorted(r["train_seconds"] for r in rs)
                entry.update(train_seconds_min=tr[0], train_seconds_median=float(np.median(tr)),
                             init=rs[0]["init"])
            summary.append(entry)
    for k in sizes:
        ref = next((e for e in summary if e["k"] == k and e["contender"] == "sklearn-kmeans"), None)
        for e in summary:
            if ref is not None and e["k"] == k:
                e["inertia_vs_sklearn_kmeans"] = e["inertia"] / ref["inertia"]
                e["seconds_median_vs_sklearn_kmeans"] = e["seconds_median"] / ref["seconds_median"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    import sklearn

    return {"store": str(args.store), "samples": int(x.shape[0]), "dim": int(x.shape[1]),
            "data_hash": data_hash, "threads": args.threads, "repeat": args.repeat, "commit": commit,
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus {platform.processor()}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sklearn": sklearn.__version__,
            "summary": summary, "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--modes", type=int, default=20_000, help="Gaussian modes of the synthetic data")
    p.add_argument("--descriptors", help="real (N, D) float32 .npy instead of synthetic data")
    p.add_argument("--store", help="feature store: time `d2r train-codebook` vs scikit-learn (see above)")
    p.add_argument("--sizes", default="1024,8192", help="--store: codebook sizes K (comma-separated)")
    p.add_argument("--contenders", default="d2r,sklearn-kmeans,sklearn-minibatch",
                   help="--store: which to run, interleaved")
    p.add_argument("--repeat", type=int, default=3, help="--store: rounds of all contenders")
    p.add_argument("--threads", type=int, default=2, help="--store: threads for every contender")
    p.add_argument("--json", action="store_true", help="--store: print one JSON document on stdout")
    p.add_argument("--k", type=int)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch-size", type=int,
                   help="mini-batch size for both mini-batch methods (max(8192, 2k))")
    p.add_argument("--no-eval", action="store_true", help="skip the exact evaluation of final inertia")
    p.add_argument("--jsonl", help="append one JSON line per method to this file")
    args = p.parse_args(argv)
    if args.store:
        doc = bench_store(args)
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            for e in doc["summary"]:
                print(json.dumps(e))
        return 0
    if args.k is None:
        p.error("give --k (or --store)")

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
