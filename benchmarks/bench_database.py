"""d2r's inverted-file database side by side with the reference ASMK implementation (PyPI ``asmk`` 0.1.1).

    python benchmarks/bench_database.py --mode full --images 10000 --k 4096 --queries 50
    python benchmarks/bench_database.py --mode synthetic-index --images 100000 --k 65536 --queries 50

Both libraries index the SAME data with the SAME codebook and the same settings: ASMK* (binary signatures),
α = 3, τ = 0 inclusive (asmk keeps u ≥ τ), MA 1 for the database and 5 for queries, no IDF and the score divided by
sqrt(|W_q||W_d|) — asmk 0.1.1 always normalises that way, and its shipped parameters use ``use_idf: False``
(``--idf`` switches both to idf² weighting; in full mode asmk then gets the whole database in one ``add``, all
descriptors in memory at once, since it updates its idf only for words present in the current call).

Modes:

- ``full``: deterministic synthetic "images" (clustered 128-D unit descriptors, 1,000 per image, generated in chunks
  so at most one chunk is in memory) go through each library's whole pipeline: assignment to the codebook (d2r's
  exact GEMM assignment / asmk's faiss IndexFlatL2), aggregation, inversion. Queries are noisy, partly resampled
  copies of database images, searched from raw descriptors.
- ``synthetic-index``: for scales where 1,000 descriptors × images cannot be generated and assigned in bounded time,
  the aggregated entries are generated directly (per image ~``--words-per-image`` distinct words drawn from a skewed
  word distribution, random 128-bit signatures; queries are noisy copies of database images plus extra words, as
  an MA-5 query has more words) and loaded into both inverted files; only query speed is measured. d2r gets a
  :class:`d2r.index.segment.Segment` built from the CSR arrays (d2r has no public way to add pre-aggregated
  records yet); asmk gets the same arrays through ``IVF.initialize_from_state`` (the state its cache files hold).

Each library runs in its own subprocess, one after the other, with ``--threads`` BLAS/OpenMP/numba threads each
(clean memory figures from /proc/self/status: RSS after set-up, peak to the end of the build, RSS of the built
index, peak during queries). Printed per library: build ms/image (full mode), query ms (total: assignment +
aggregation + scan + top-k; and scan alone on an aggregated query), bytes per posting entry (allocated), memory;
then top-100 overlap with asmk (strict; and counting as agreement
an id that sits at asmk's 100th score within 1e-5, i.e. a tie at the cut), the largest score difference over the
ids both return, and the speed-ups. Installs nothing: asmk and faiss-cpu must already be importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 128
PROTOTYPES = 8192  # centres of the descriptor distribution ("visual patterns"), shared by all images
SCENE = 256  # prototypes one image draws its descriptors from
NOISE = 0.05  # per-component std of the descriptor noise around its prototype
ZIPF = 0.8  # prototype popularity ∝ (rank + 20)^-ZIPF
TOP_K = 100
TIE_TOL = 1e-5


# ---- deterministic data ----------------------------------------------------------------------------------------
def _unit(x):
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _prototypes(seed):
    rng = np.random.default_rng([seed, 0])
    protos = _unit(rng.standard_normal((PROTOTYPES, DIM)).astype(np.float32))
    p = (np.arange(PROTOTYPES) + 20.0) ** -ZIPF
    return protos, np.cumsum(p / p.sum())


def make_codebook(seed, k, protos_cdf):
    """K centroids drawn from the descriptor distribution itself (what k-means converges towards)."""
    protos, cdf = protos_cdf
    rng = np.random.default_rng([seed, 1, k])
    idx = np.minimum(np.searchsorted(cdf, rng.random(k)), PROTOTYPES - 1)
    return _unit(protos[idx] + NOISE * rng.standard_normal((k, DIM)).astype(np.float32))


def image_descriptors(seed, i, n, protos_cdf):
    """(n, 128) float32 unit descriptors of database image ``i`` (a function of (seed, i) only)."""
    protos, cdf = protos_cdf
    rng = np.random.default_rng([seed, 2, i])
    scene = np.minimum(np.searchsorted(cdf, rng.random(SCENE)), PROTOTYPES - 1)
    which = scene[rng.integers(0, SCENE, n)]
    return _unit(protos[which] + NOISE * rng.standard_normal((n, DIM)).astype(np.float32))


def query_source(j, num_images):
    return (j * 7919 + 13) % num_images


def query_descriptors(seed, j, num_images, n, protos_cdf):
    """Query ``j``: 70% of its source image's descriptors slightly moved, 30% fresh ones from elsewhere."""
    x = image_descriptors(seed, query_source(j, num_images), n, protos_cdf)
    rng = np.random.default_rng([seed, 3, j])
    keep = rng.random(n) < 0.7
    x[keep] = _unit(x[keep] + 0.02 * rng.standard_normal((int(keep.sum()), DIM)).astype(np.float32))
    other = image_descriptors(seed, 10**9 + j, n, protos_cdf)
    x[~keep] = other[~keep]
    return x


def synthetic_index(seed, num_images, k, words_per_image, query_words, num_queries, out_dir, chunk=2000):
    """Write the aggregated inverted file directly (CSR by word) plus aggregated queries into ``out_dir``."""
    rng_w = np.random.default_rng([seed, 4])
    p = (rng_w.permutation(k) + 20.0) ** -ZIPF  # skewed word frequencies, popular words spread over the ids
    cdf = np.cumsum(p / p.sum())
    words_parts, counts = [], []
    for start in range(0, num_images, chunk):
        b = min(chunk, num_images - start)
        rng = np.random.default_rng([seed, 5, start])
        for row in _draw(cdf, rng, (b, 3 * words_per_image)):
            w = _first_distinct(row, words_per_image)
            counts.append(w.shape[0])
            words_parts.append(w)
    item_words = np.asarray(counts, np.uint32)
    words = np.concatenate(words_parts)
    del words_parts
    e = words.shape[0]
    order = np.argsort(words, kind="stable")
    offsets = np.zeros(k + 1, np.int64)
    np.cumsum(np.bincount(words, minlength=k), out=offsets[1:])
    items = np.repeat(np.arange(num_images, dtype=np.uint32), item_words.astype(np.int64))[order]
    np.save(out_dir / "offsets.npy", offsets)
    np.save(out_dir / "items.npy", items)
    np.save(out_dir / "item_words.npy", item_words)
    rng = np.random.default_rng([seed, 6])
    bits = np.lib.format.open_memmap(out_dir / "bits.npy", "w+", np.uint8, (e, DIM // 8))
    for s in range(0, e, 1 << 24):
        bits[s:s + (1 << 24)] = rng.integers(0, 256, (min(1 << 24, e - s), DIM // 8), np.uint8)
    # queries: a database image's words with 10% of the bits flipped (u ≈ 0.8), plus extra words drawn alike
    starts = np.concatenate([[0], np.cumsum(item_words.astype(np.int64))])
    inverse = np.empty(e, np.int64)
    inverse[order] = np.arange(e)  # position of image-ordered entry t in the word-sorted arrays
    del order
    qw, qb, qn = [], [], []
    for j in range(num_queries):
        rng = np.random.default_rng([seed, 7, j])
        src = query_source(j, num_images)
        pos = inverse[starts[src]:starts[src + 1]]
        own_w = words[starts[src]:starts[src + 1]]
        own_b = np.asarray(bits[pos])
        flip = np.packbits(rng.random((own_b.shape[0], DIM)) < 0.1, axis=1)
        extra = _draw(cdf, rng, (1, 3 * query_words))[0]
        extra = extra[~np.isin(extra, own_w)]
        extra = _first_distinct(extra, max(query_words - own_w.shape[0], 0))
        w = np.concatenate([own_w, extra])
        b = np.concatenate([own_b ^ flip, rng.integers(0, 256, (extra.shape[0], DIM // 8), np.uint8)])
        o = np.argsort(w)
        qw.append(w[o])
        qb.append(b[o])
        qn.append(w.shape[0])
    np.savez(out_dir / "queries.npz", words=np.concatenate(qw), bits=np.concatenate(qb), counts=np.array(qn))
    bits.flush()
    imbalance = k * float(np.square(np.diff(offsets).astype(np.float64)).sum()) / max(float(e) ** 2, 1.0)
    return {"entries": int(e), "words_per_image": float(item_words.mean()), "query_words": float(np.mean(qn)),
            "imbalance_factor": imbalance}


def _draw(cdf, rng, shape):
    """Words drawn independently from the skewed distribution ``cdf``: uint32 array of ``shape``."""
    return np.minimum(np.searchsorted(cdf, rng.random(shape)), cdf.shape[0] - 1).astype(np.uint32)


def _first_distinct(row, n):
    """The first ``n`` distinct values of ``row`` in draw order (no bias towards small ids), sorted."""
    _, first = np.unique(row, return_index=True)
    return np.sort(row[np.sort(first)[:n]])


def load_queries(path):
    z = np.load(path / "queries.npz")
    bounds = np.concatenate([[0], np.cumsum(z["counts"])])
    return [(z["words"][a:b], z["bits"][a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


# ---- measurement helpers ---------------------------------------------------------------------------------------
def memory_mb(field):
    """VmRSS (current) or VmHWM (peak since start or the last :func:`reset_peak`) of this process, in MB.
    (``ru_maxrss`` is not used: Linux carries it over from the parent across fork + exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the next phase's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def summarize(times):
    t = np.asarray(times) * 1e3
    return {"mean_ms": float(t.mean()), "median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90))}


def chunks(num_images, per_chunk):
    for start in range(0, num_images, per_chunk):
        yield start, min(start + per_chunk, num_images)


# ---- d2r side --------------------------------------------------------------------------------------------------
def side_d2r(args, work):
    from d2r import Database
    from d2r.aggregate import Aggregated, Aggregator
    from d2r.codebook import Codebook
    from d2r.index.database import DatabaseConfig
    from d2r.index.segment import Segment

    res = {"side": "d2r"}
    if args.mode == "full":
        pc = _prototypes(args.seed)
        book = Codebook(make_codebook(args.seed, args.k, pc))
    else:
        book = Codebook(np.load(work / "centroids.npy"))
    db_args = dict(kernel="asmk_star", tau_inclusive=True, num_assignments=1, query_num_assignments=5,
                   normalize=True, idf=args.idf)
    res["rss_setup_mb"] = memory_mb("VmRSS")
    if args.mode == "full":
        db = Database.create(None, book, **db_args)
        build = 0.0
        for a, b in chunks(args.images, args.chunk):
            batch = [(i, image_descriptors(args.seed, i, args.descriptors, pc), None) for i in range(a, b)]
            t = time.perf_counter()
            db.add_batch(batch, chunk_descriptors=len(batch) * args.descriptors)
            build += time.perf_counter() - t
            del batch
        t = time.perf_counter()
        info = db.info(files=False)  # builds the posting lists of the added images (done lazily otherwise)
        build += time.perf_counter() - t
        res["build_ms_per_image"] = build / args.images * 1e3
        queries = [query_descriptors(args.seed, j, args.images, args.descriptors, pc) for j in range(args.queries)]
    else:
        t = time.perf_counter()
        n = args.images
        seg = Segment(np.arange(n).astype(str), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                      np.load(work / "item_words.npy"), np.load(work / "offsets.npy"), np.load(work / "items.npy"),
                      np.load(work / "bits.npy"))
        seg.validate(work, "asmk_star", "aggregation", args.k, DIM)
        config = DatabaseConfig(alpha=3.0, tau=0.0, **db_args)
        db = Database(None, book, config, [seg], np.zeros(n, bool), 0, "int")
        info = db.info(files=False)
        res["load_s"] = time.perf_counter() - t
        queries = [Aggregated("asmk_star", DIM, args.k, words=w, bits=b) for w, b in load_queries(work)]
    res["bytes_per_entry"] = info["bytes_per_entry"]
    res["entries"] = info["counts"]["entries"]
    res["peak_build_mb"] = memory_mb("VmHWM")
    res["rss_built_mb"] = memory_mb("VmRSS")
    reset_peak()

    agg = Aggregator(book, "asmk_star", 5)
    prepared = queries if args.mode != "full" else None
    db.search(queries[0] if prepared else agg(queries[0]), TOP_K)  # warm-up: numba, caches
    t_prep, t_scan, ids, scores, qwords = [], [], [], [], []
    for q in queries:
        t = time.perf_counter()
        a = q if prepared else agg(q)
        t1 = time.perf_counter()
        r = db.search(a, TOP_K)
        t2 = time.perf_counter()
        t_prep.append(t1 - t)
        t_scan.append(t2 - t1)
        ids.append(np.asarray(r.ids, np.int64).tolist())
        scores.append(np.asarray(r.scores, np.float64).tolist())
        qwords.append(len(a.words))
    res["query_prepare"] = summarize(t_prep)
    res["query_scan"] = summarize(t_scan)
    res["query_total"] = summarize(np.add(t_prep, t_scan))
    res["query_words"] = float(np.mean(qwords))
    res["peak_query_mb"] = memory_mb("VmHWM")
    res["ids"], res["scores"] = ids, scores
    return res


# ---- asmk side -------------------------------------------------------------------------------------------------
def side_asmk(args, work):
    from asmk import asmk_method, codebook as asmk_codebook, index as asmk_index, inverted_file, kernel as asmk_kernel

    res = {"side": "asmk"}
    centroids = (make_codebook(args.seed, args.k, _prototypes(args.seed)) if args.mode == "full"
                 else np.load(work / "centroids.npy"))
    cdb = asmk_codebook.Codebook(asmk_index.initialize_index(gpu_id=None), size=args.k)
    cdb.index(np.ascontiguousarray(centroids, np.float32))
    params = {
        "build_ivf": {"kernel": {"binary": True}, "ivf": {"use_idf": args.idf},
                      "quantize": {"multiple_assignment": 1}, "aggregate": {}},
        "query_ivf": {"quantize": {"multiple_assignment": 5}, "aggregate": {}, "search": {"topk": TOP_K},
                      "similarity": {"similarity_threshold": 0.0, "alpha": 3.0}},
    }
    method = asmk_method.ASMKMethod(params, {}, codebook=cdb)
    res["rss_setup_mb"] = memory_mb("VmRSS")
    if args.mode == "full":
        pc = _prototypes(args.seed)
        builder = method.create_ivf_builder()
        build = 0.0
        # with idf, asmk must see every image in one add (it refreshes idf only for words of the current call)
        per_chunk = args.images if args.idf else args.chunk
        for a, b in chunks(args.images, per_chunk):
            vecs = np.concatenate([image_descriptors(args.seed, i, args.descriptors, pc) for i in range(a, b)])
            imids = np.repeat(np.arange(a, b), args.descriptors)
            t = time.perf_counter()
            builder.add(vecs, imids)
            build += time.perf_counter() - t
            del vecs, imids
        t = time.perf_counter()
        method = method.add_ivf_builder(builder)
        build += time.perf_counter() - t
        res["build_ms_per_image"] = build / args.images * 1e3
        ivf = method.inverted_file
        queries = [query_descriptors(args.seed, j, args.images, args.descriptors, pc) for j in range(args.queries)]
    else:
        t = time.perf_counter()
        offsets = np.load(work / "offsets.npy")
        items = np.load(work / "items.npy").astype(np.int64)  # asmk's own add stores int64 image ids
        bits = np.load(work / "bits.npy").view(np.uint32)  # 4 × uint32 per signature; same Hamming distances
        item_words = np.load(work / "item_words.npy")
        vecs, imids = [], []
        for w in range(args.k):
            a, b = offsets[w], offsets[w + 1]
            vecs.append(bits[a:b] if b > a else None)
            imids.append(items[a:b] if b > a else None)
        counts = np.diff(offsets).astype(np.int32)
        if args.idf:
            idf = (np.log(args.images / np.maximum(counts, 1)) ** 2).astype(np.float32)
            norm = np.bincount(items, weights=np.repeat(idf, counts).astype(np.float64), minlength=args.images)
        else:
            idf = np.ones(args.k, np.float32)
            norm = item_words.astype(np.float64)
        state = {"type": "IVF", "params": {"use_idf": args.idf},
                 "state": {"norm_factor": norm, "n_images": args.images, "ivf_vecs": vecs, "ivf_image_ids": imids,
                           "counts": counts, "idf": idf, "imid_offset": 0}}
        ivf = inverted_file.IVF.initialize_from_state(state)
        res["load_s"] = time.perf_counter() - t
        queries = [(b.view(np.uint32), w.astype(np.int64)) for w, b in load_queries(work)]
    kern = asmk_kernel.ASMKKernel(cdb, binary=True)
    allocated = sum(a.nbytes for a in ivf.ivf_vecs if a is not None)
    allocated += sum(a.nbytes for a in ivf.ivf_image_ids if a is not None)
    res["entries"] = int(ivf.counts.sum())
    res["bytes_per_entry"] = allocated / max(res["entries"], 1)
    res["peak_build_mb"] = memory_mb("VmHWM")
    res["rss_built_mb"] = memory_mb("VmRSS")
    reset_peak()

    sim = params["query_ivf"]["similarity"]

    def similarity_func(*x):
        return kern.similarity(*x, **sim)

    def prepare(x):
        quantized = cdb.quantize(x, multiple_assignment=5)
        return kern.aggregate_image(*quantized)

    prepared = args.mode != "full"
    first = queries[0] if prepared else prepare(queries[0])
    ivf.search(*first, similarity_func=similarity_func, topk=TOP_K)  # warm-up
    t_prep, t_scan, ids, scores, qwords = [], [], [], [], []
    for q in queries:
        t = time.perf_counter()
        a = q if prepared else prepare(q)
        t1 = time.perf_counter()
        ranks, sc = ivf.search(*a, similarity_func=similarity_func, topk=TOP_K)
        t2 = time.perf_counter()
        t_prep.append(t1 - t)
        t_scan.append(t2 - t1)
        ids.append(np.asarray(ranks, np.int64).tolist())
        scores.append(np.asarray(sc, np.float64).tolist())
        qwords.append(len(a[1]))
    res["query_prepare"] = summarize(t_prep)
    res["query_scan"] = summarize(t_scan)
    res["query_total"] = summarize(np.add(t_prep, t_scan))
    res["query_words"] = float(np.mean(qwords))
    res["peak_query_mb"] = memory_mb("VmHWM")
    res["ids"], res["scores"] = ids, scores
    return res


# ---- comparison ------------------------------------------------------------------------------------------------
def compare(d2r_res, asmk_res):
    strict, ties, diffs, top1 = [], [], [], []
    for di, ds, ai, as_ in zip(d2r_res["ids"], d2r_res["scores"], asmk_res["ids"], asmk_res["scores"]):
        k = min(len(di), len(ai))
        a_set = set(ai[:k])
        common = [i for i in di[:k] if i in a_set]
        strict.append(len(common) / max(k, 1))
        cut = as_[k - 1] if k else 0.0
        d_score = dict(zip(di, ds))
        agree = sum(1 for i in di[:k] if i in a_set or abs(d_score[i] - cut) <= TIE_TOL)
        ties.append(agree / max(k, 1))
        a_score = dict(zip(ai, as_))
        diffs.append(max((abs(d_score[i] - a_score[i]) for i in common), default=0.0))
        top1.append(bool(di and ai and di[0] == ai[0]))
    return {"overlap_mean": float(np.mean(strict)), "overlap_min": float(np.min(strict)),
            "overlap_ties_mean": float(np.mean(ties)), "overlap_ties_min": float(np.min(ties)),
            "max_score_diff": float(np.max(diffs)), "top1_agreement": float(np.mean(top1))}


def run_side(side, args, work):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    out = work / f"{side}.json"
    cmd = [sys.executable, __file__, "--side", side, "--work", str(work)] + args.passthrough
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("full", "synthetic-index"), default="full")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--descriptors", type=int, default=1000, help="descriptors per image (full mode)")
    p.add_argument("--words-per-image", type=int, default=1000, help="distinct words per image (synthetic-index)")
    p.add_argument("--query-words", type=int, default=3000, help="distinct words per query (synthetic-index)")
    p.add_argument("--chunk", type=int, default=200, help="images generated and added at once (full mode)")
    p.add_argument("--idf", action="store_true", help="idf² word weights in both libraries")
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/numba threads per library")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the temporary data go (synthetic-index: ~25 B per entry); default: the "
                   "system temporary directory")
    p.add_argument("--sides", default="d2r,asmk", help="comma-separated: d2r, asmk")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--save", help="also write the JSON summary to this file")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    if args.side:  # child process: one library
        work = Path(args.work)
        res = (side_d2r if args.side == "d2r" else side_asmk)(args, work)
        (work / f"{args.side}.json").write_text(json.dumps(res))
        return 0

    args.passthrough = _strip(argv, {"--json"}, {"--save", "--workdir"})
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - {"d2r", "asmk"}:
        p.error(f"--sides: expected a comma-separated subset of d2r,asmk, got {args.sides!r}")
    missing = [m for m in (["asmk", "faiss"] if "asmk" in sides else []) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench_database: {', '.join(missing)} not installed (pip install faiss-cpu asmk==0.1.1), or run "
              "with --sides d2r", file=sys.stderr)
        return 2
    summary = {"mode": args.mode, "images": args.images, "k": args.k, "queries": args.queries,
               "threads": args.threads, "idf": args.idf}
    with tempfile.TemporaryDirectory(prefix="bench_database_", dir=args.workdir) as tmp:
        work = Path(tmp)
        if args.mode == "synthetic-index":
            t = time.perf_counter()
            np.save(work / "centroids.npy", make_codebook(args.seed, args.k, _prototypes(args.seed)))
            summary["data"] = synthetic_index(args.seed, args.images, args.k, args.words_per_image,
                                              args.query_words, args.queries, work)
            summary["data"]["generate_s"] = time.perf_counter() - t
        results = {s: run_side(s, args, work) for s in sides}
    if "d2r" in results and "asmk" in results:
        summary["agreement"] = compare(results["d2r"], results["asmk"])
        summary["speedup_scan"] = results["asmk"]["query_scan"]["mean_ms"] / results["d2r"]["query_scan"]["mean_ms"]
        summary["speedup_total"] = (results["asmk"]["query_total"]["mean_ms"]
                                    / results["d2r"]["query_total"]["mean_ms"])
        if args.mode == "full":
            summary["speedup_build"] = results["asmk"]["build_ms_per_image"] / results["d2r"]["build_ms_per_image"]
    for s, r in results.items():
        summary[s] = {k: v for k, v in r.items() if k not in ("ids", "scores", "side")}
    if args.save:
        Path(args.save).write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_table(summary, sides)
    return 0


def _strip(argv, flags, options):
    """argv without the parent-only ``flags`` and ``options`` (with their values)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags or a.split("=")[0] in options:
            skip = a in options
        else:
            out.append(a)
    return out


def print_table(summary, sides):
    print(f"mode={summary['mode']} images={summary['images']} K={summary['k']} queries={summary['queries']} "
          f"threads={summary['threads']} idf={summary['idf']}")
    if "data" in summary:
        d = summary["data"]
        print(f"synthetic index: {d['entries']} entries, {d['words_per_image']:.1f} words/image, "
              f"{d['query_words']:.1f} words/query, imbalance {d['imbalance_factor']:.2f}, "
              f"generated in {d['generate_s']:.1f} s")
    rows = [("build ms/image", lambda r: r.get("build_ms_per_image")),
            ("query ms total (mean)", lambda r: r["query_total"]["mean_ms"]),
            ("query ms scan (mean)", lambda r: r["query_scan"]["mean_ms"]),
            ("query ms scan (median)", lambda r: r["query_scan"]["median_ms"]),
            ("words per query", lambda r: r["query_words"]),
            ("posting entries", lambda r: r["entries"]),
            ("bytes per entry", lambda r: r["bytes_per_entry"]),
            ("RSS after set-up MB", lambda r: r["rss_setup_mb"]),
            ("peak RSS to end of build MB", lambda r: r["peak_build_mb"]),
            ("RSS when built MB", lambda r: r["rss_built_mb"]),
            ("peak RSS during queries MB", lambda r: r["peak_query_mb"]),
            ("load s (synthetic-index)", lambda r: r.get("load_s"))]
    print(f"{'':28s}" + "".join(f"{s:>14s}" for s in sides))
    for name, get in rows:
        cells = []
        for s in sides:
            v = get(summary[s])
            cells.append(f"{'n/a':>14s}" if v is None else f"{v:14.3f}" if isinstance(v, float) else f"{v:>14}")
        print(f"{name:28s}" + "".join(cells))
    if "agreement" in summary:
        a = summary["agreement"]
        print(f"top-{TOP_K} overlap with asmk: mean {a['overlap_mean']:.4f} min {a['overlap_min']:.4f} | "
              f"counting ties at the cut: mean {a['overlap_ties_mean']:.4f} min {a['overlap_ties_min']:.4f} | "
              f"max score diff {a['max_score_diff']:.2e} | top-1 agreement {a['top1_agreement']:.3f}")
        line = f"speed-up d2r vs asmk: query scan {summary['speedup_scan']:.1f}x, query total " \
               f"{summary['speedup_total']:.1f}x"
        if "speedup_build" in summary:
            line += f", build {summary['speedup_build']:.1f}x"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
