"""Core kernel speed: assignment, aggregation and similarity, d2r vs plain numpy, K = 65,536, D = 128.

    python benchmarks/bench_core.py [--images 20] [--k 65536] [--json]
    python benchmarks/bench_core.py --assign-grid [--threads 2] [--m 1 5]
    python benchmarks/bench_core.py --cutover [--ks 1024 8192] [--ns 64 128 256 512 1024 2048]

Prints ms per image for assignment (and for the distance GEMM alone, the floor), ms per image for ASMK* and
R-ASMK* (5 regions) aggregation after assignment, and µs per similarity pair, each next to a plain-numpy version
of the same computation. ``--assign-grid`` instead prints ``Codebook.assign`` next to faiss ``IndexFlatL2.search``
(same k, same thread count for BLAS, numba and faiss's OpenMP) for n ∈ {50, 150, 1000, 10000} descriptors and
K ∈ {1024, 8192, 65536} words (random unit vectors, D = 128; best of interleaved repeats). ``--cutover`` times
``Codebook.assign`` on the calling thread (BLAS at one thread, d2r's small-input path) against the threaded path
(``numba.get_num_threads()`` Python threads, BLAS at one thread each) and against the calling thread with BLAS at
its own thread count (what small inputs did before), per n × K, to place
``_PARALLEL_MIN_ROWS`` / ``_PARALLEL_MIN_PAIRS`` (d2r.codebook.codebook).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import d2r
from d2r.aggregate import Aggregator, similarity


def timeit(fn, repeat):
    fn()  # warm-up (numba compilation, BLAS threads)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def numpy_assign(x, c, c_sq):
    d = c_sq[None, :] - 2 * x @ c.T
    return np.argpartition(d, 0, axis=1)[:, :1]


def numpy_asmk_star(x, c, words, counts=None):
    """The same aggregation in plain numpy (np.add.at on a sparse set of words)."""
    flat = words[:, 0]
    uniq, inv = np.unique(flat, return_inverse=True)
    if counts is None:
        sums = np.zeros((uniq.size, c.shape[1]))
        np.add.at(sums, inv, x - c[flat])
    else:
        sums = np.zeros((uniq.size, c.shape[1]))
        start = 0
        for n in counts:
            part = np.zeros_like(sums)
            np.add.at(part, inv[start:start + n], x[start:start + n] - c[flat[start:start + n]])
            sums += part / np.sqrt(max((part * part).sum(), 1e-12))
            start += n
        sums /= len(counts)
    norms = np.linalg.norm(sums, axis=1)
    keep = norms > 1e-6
    return uniq[keep], np.packbits(sums[keep] > 0, axis=1)


def numpy_similarity(wa, ba, wb, bb, dim):
    common, ia, ib = np.intersect1d(wa, wb, assume_unique=True, return_indices=True)
    h = np.unpackbits(ba[ia] ^ bb[ib], axis=1).sum(1)
    u = 1 - 2 * h / dim
    return float(np.where(u > 0, u ** 3, 0).sum() / np.sqrt(len(wa) * len(wb)))


def assign_grid(threads: int, ms=(1,), ns=(50, 150, 1000, 10000), ks=(1024, 8192, 65536), budget=1.5):
    """Markdown table rows: assignment d2r vs faiss IndexFlatL2.search, ms per call."""
    import faiss
    import numba
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    rows = []
    print("| n | K | k | d2r ms | faiss ms | d2r / faiss |")
    print("|---:|---:|---:|---:|---:|---:|")
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        with threadpool_limits(limits=threads):
            for K in ks:
                c = rng.standard_normal((K, 128)).astype(np.float32)
                c /= np.linalg.norm(c, axis=1, keepdims=True)
                book = d2r.Codebook(c)
                flat = faiss.IndexFlatL2(128)
                flat.add(c)
                for n in ns:
                    x = rng.standard_normal((n, 128)).astype(np.float32)
                    x /= np.linalg.norm(x, axis=1, keepdims=True)
                    for m in ms:
                        a, b = _interleaved(lambda: book.assign(x, m), lambda: flat.search(x, m), budget)
                        ours = book.assign(x, m)
                        same = np.array_equal(ours[:, 0], flat.search(x, m)[1][:, 0])
                        rows.append({"n": n, "k_words": K, "m": m, "d2r_ms": a * 1e3, "faiss_ms": b * 1e3,
                                     "nearest_equal_faiss": bool(same)})
                        print(f"| {n:,} | {K:,} | {m} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f}× |", flush=True)
    finally:
        numba.set_num_threads(previous)
    return rows


def _interleaved(fa, fb, budget):
    """Best time of each of two functions, in alternating blocks of calls (at least 3 calls each) for ``budget``
    seconds. Blocks, not single alternating calls: one library's OpenMP threads still spin-waiting after its call
    would otherwise slow the other library's first BLAS call down."""
    ta, tb = [], []
    t_end = time.perf_counter() + budget
    while len(ta) < 3 or time.perf_counter() < t_end:
        for f, ts in ((fa, ta), (fb, tb)):
            f()  # the block's warm-up call is not timed
            block_end = time.perf_counter() + budget / 8
            for _ in range(50):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
                if t > block_end:
                    break
        if len(ta) >= 400:
            break
    return min(ta), min(tb)


def cutover(ns, ks, budget):
    """Rows {n, k, pairs, <path>_ms (median), <path>_best_ms} for the paths serial / threaded / blas_threads, from
    interleaved blocks: the best time is the machine's speed, the median what a user sees on a loaded machine."""
    import d2r.codebook.codebook as cb
    from d2r._threads import one_blas_thread

    rng = np.random.default_rng(0)
    rows = []
    saved = cb._PARALLEL_MIN_PAIRS, cb._PARALLEL_MIN_ROWS
    try:
        for k in ks:
            c = rng.standard_normal((k, 128)).astype(np.float32)
            book = d2r.Codebook(c / np.linalg.norm(c, axis=1, keepdims=True))
            for n in ns:
                x = rng.standard_normal((n, 128)).astype(np.float32)

                def run(threshold, limit=True):
                    def f():
                        cb._PARALLEL_MIN_PAIRS = cb._PARALLEL_MIN_ROWS = threshold
                        if limit:
                            return book.assign(x)
                        dots = (x - book._mean) @ book._centred_t  # the old serial path's GEMM, BLAS as set
                        return dots
                    return f

                times = {"serial": [], "threaded": [], "blas_threads": []}
                fns = {"serial": run(1 << 62), "threaded": run(0), "blas_threads": run(1 << 62, limit=False)}
                t_end = time.perf_counter() + budget
                while time.perf_counter() < t_end or len(times["serial"]) < 5:
                    for name, f in fns.items():
                        f()
                        for _ in range(5):
                            t = time.perf_counter()
                            f()
                            times[name].append(time.perf_counter() - t)
                rows.append({"n": n, "k": k, "pairs": n * k,
                             **{f"{name}_ms": 1e3 * float(np.median(v)) for name, v in times.items()},
                             **{f"{name}_best_ms": 1e3 * float(np.min(v)) for name, v in times.items()}})
    finally:
        cb._PARALLEL_MIN_PAIRS, cb._PARALLEL_MIN_ROWS = saved
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cutover", action="store_true", help="serial vs threaded assignment by input size only")
    p.add_argument("--assign-grid", action="store_true", help="assignment vs faiss table only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", type=int, nargs="+", default=[1], help="nearest words (faiss k) for --assign-grid")
    p.add_argument("--ns", type=int, nargs="+", default=[50, 150, 1000, 10000], help="--assign-grid descriptors")
    p.add_argument("--ks", type=int, nargs="+", default=[1024, 8192, 65536], help="--assign-grid words")
    p.add_argument("--budget", type=float, default=1.5, help="--assign-grid seconds per cell")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.cutover:
        rows = cutover(args.ns, args.ks, args.budget)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        print("| n | K | n·K | calling thread, BLAS 1: best / median ms | threaded: best / median ms "
              "| GEMM alone, BLAS as configured: best / median ms |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            cells = " | ".join(f"{r[f'{p}_best_ms']:.3f} / {r[f'{p}_ms']:.3f}"
                               for p in ("serial", "threaded", "blas_threads"))
            print(f"| {r['n']} | {r['k']} | {r['pairs']:,} | {cells} |")
        return
    if args.assign_grid:
        rows = assign_grid(args.threads, tuple(args.m), tuple(args.ns), tuple(args.ks), args.budget)
        if args.json:
            print(json.dumps(rows, indent=2))
        return
    rng = np.random.default_rng(0)
    D = 128
    c = rng.standard_normal((args.k, D)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    xs = []
    for _ in range(args.images):
        x = rng.standard_normal((args.features, D)).astype(np.float32)
        xs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    book = d2r.Codebook(c)
    c_sq = (c * c).sum(1)
    rep = 3
    res = {}
    res["assign_ms"] = timeit(lambda: [book.assign(x) for x in xs], rep) / len(xs) * 1e3
    res["gemm_only_ms"] = timeit(lambda: [x @ c.T for x in xs], rep) / len(xs) * 1e3
    res["numpy_assign_ms"] = timeit(lambda: [numpy_assign(x, c, c_sq) for x in xs], rep) / len(xs) * 1e3
    words = [book.assign(x) for x in xs]
    agg = Aggregator(book, "asmk_star")
    counts = np.array([args.features // 2] + [args.features // 8] * 4)
    counts[0] += args.features - counts.sum()
    res["asmk_star_ms"] = timeit(lambda: [agg(x, assignments=w) for x, w in zip(xs, words)], rep) / len(xs) * 1e3
    res["r_asmk_star_5_regions_ms"] = timeit(
        lambda: [agg(x, regions=counts, assignments=w) for x, w in zip(xs, words)], rep) / len(xs) * 1e3
    res["numpy_asmk_star_ms"] = timeit(lambda: [numpy_asmk_star(x, c, w) for x, w in zip(xs, words)],
                                       rep) / len(xs) * 1e3
    res["numpy_r_asmk_star_5_regions_ms"] = timeit(
        lambda: [numpy_asmk_star(x, c, w, counts) for x, w in zip(xs, words)], rep) / len(xs) * 1e3
    # Similarity on related images (shared words): the second image is a noisy copy of the first.
    a = agg(xs[0])
    noisy = xs[0] + 0.05 * rng.standard_normal(xs[0].shape).astype(np.float32)
    b = agg(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
    pairs = 2000
    res["common_words"] = int(np.intersect1d(a.words, b.words).size)
    res["similarity_us"] = timeit(lambda: [similarity(a, b) for _ in range(pairs)], rep) / pairs * 1e6
    res["numpy_similarity_us"] = timeit(
        lambda: [numpy_similarity(a.words, a.bits, b.words, b.bits, D) for _ in range(pairs)], rep) / pairs * 1e6
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"K={args.k} D={D} N={args.features}/image, {args.images} images")
        print(f"assignment      d2r {res['assign_ms']:8.2f} ms/image   numpy {res['numpy_assign_ms']:8.2f}   "
              f"(GEMM alone {res['gemm_only_ms']:.2f}; ratio {res['assign_ms'] / res['gemm_only_ms']:.2f}x)")
        print(f"ASMK*           d2r {res['asmk_star_ms']:8.3f} ms/image   numpy {res['numpy_asmk_star_ms']:8.3f}")
        print(f"R-ASMK* (5 reg) d2r {res['r_asmk_star_5_regions_ms']:8.3f} ms/image   numpy "
              f"{res['numpy_r_asmk_star_5_regions_ms']:8.3f}")
        print(f"similarity      d2r {res['similarity_us']:8.2f} µs/pair    numpy {res['numpy_similarity_us']:8.2f} "
              f"({res['common_words']} common words)")


if __name__ == "__main__":
    main()
