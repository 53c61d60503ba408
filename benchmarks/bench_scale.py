"""An ASMK* index at scale: build by many small saves (tiered streaming merges), then search.

    PYTHONPATH=. python benchmarks/bench_scale.py words --out benchmarks/results/scale_words.json      # measure word counts
    PYTHONPATH=. python benchmarks/bench_scale.py build --images 100000 --dir /tmp/scale --words benchmarks/results/scale_words.json
    PYTHONPATH=. python benchmarks/bench_scale.py search --dir /tmp/scale --warm     # search a kept index (build --keep)
    PYTHONPATH=. python benchmarks/bench_scale.py kernel                            # the scan kernel alone, format 2 vs 3

``words``: RootSIFT (1,000 features max, the default) on the dev photos; a K = 65,536 codebook is a quick k-means
stand-in: 65,536 descriptors sampled from the first half of the photos (the k-means initialisation, no Lloyd
iterations); the other half is assigned (MA 1) and the distinct words per image are recorded. Sampled centroids
spread like the data, so collisions are roughly those of a trained codebook; real k-means would merge a few more.

``build``: synthetic aggregated ASMK* records (K = 65,536, D = 128): per image a distinct-word count drawn from the
measured distribution, words drawn from a Zipf distribution whose skew (K Σ p²) equals the measured one, random 128-bit signatures; added with
``add_aggregated`` and ``save`` every ``--save-every`` images (default tiered policy: factor 10, 1 MiB floor). Then
``--queries`` aggregated queries (copies of indexed images with 30 % of their words replaced) and ``--raw-queries``
searches from raw descriptors (1,000 random 128-D unit vectors: assignment to 65,536 words + aggregation + scan).

Printed (JSON): build s/image, bytes written by the process (/proc/self/io write_bytes) ÷ final index bytes (write
amplification), peak RSS (VmRSS sampled every 20 ms, and its anonymous part RssAnon: memory-mapped index pages are
file cache the kernel can drop) during build, merges and search, index bytes per posting entry, search p50/p95.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

K, D = 65_536, 128


def measure_words(args) -> None:
    import d2r
    from d2r.features import RootSIFT
    from d2r.features.image import list_images

    images = [p for _, p in list_images(Path(args.photos) / "images")]
    rng = np.random.default_rng(0)
    rng.shuffle(images)
    images = images[: args.photos_max]
    half = len(images) // 2
    ext = RootSIFT()
    feats = [ext.extract(p).descriptors for p in images]
    train = np.concatenate(feats[:half])
    pick = rng.choice(train.shape[0], K, replace=train.shape[0] < K)
    book = d2r.Codebook(train[pick] + 1e-4 * rng.standard_normal((K, D)).astype(np.float32))
    counts, features = [], []
    df = np.zeros(K, np.int64)
    for x in feats[half:]:
        features.append(int(x.shape[0]))
        words = np.unique(book.assign(x)[:, 0]) if x.shape[0] else np.zeros(0, np.int64)
        counts.append(int(words.shape[0]))
        df[words] += 1
    c = np.array(counts)
    # Skew of the word distribution: K Σ_w λ_w² / (Σ_w λ_w)² for per-word rates λ (1 when uniform), estimated
    # without the Poisson noise of few images by Σ df (df - 1) in place of Σ df².
    out = {"k": K, "codebook": f"{K} sampled RootSIFT descriptors of {half} dev photos (k-means initialisation)",
           "images": len(counts), "distinct_words": counts, "features": features,
           "mean": float(c.mean()), "median": float(np.median(c)), "p5": float(np.percentile(c, 5)),
           "p95": float(np.percentile(c, 95)), "mean_features": float(np.mean(features)),
           "word_skew": float(K * (df * (df - 1)).sum() / max(df.sum(), 1) ** 2)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("distinct_words", "features")}))


class Sampler:
    """Peak VmRSS / RssAnon per phase, sampled every 20 ms in a thread."""

    def __init__(self):
        self.phase = "setup"
        self.peaks: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self):
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:")):
                    key, value = line.split(":")
                    fields[key] = int(value.split()[0]) * 1024
        p = self.peaks.setdefault(self.phase, {"rss": 0, "anon": 0})
        p["rss"] = max(p["rss"], fields.get("VmRSS", 0))
        p["anon"] = max(p["anon"], fields.get("RssAnon", 0))

    def stop(self):
        self._stop.set()
        self._thread.join()


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes:")).split()[1])


def index_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the files the current manifest references, bytes of the whole folder)."""
    m = json.loads((path / "manifest.json").read_text())
    live = sum(f["size"] for s in m["segments"] for f in s["files"].values())
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return live, total


def entry_bytes(path: Path) -> dict:
    """Bytes per posting entry of the current generation's segment files: all files (``bytes_per_entry``), and
    the posting files alone (``items.npy`` + ``bits.npy``: 2 B id + 16 B signature in format version 3)."""
    m = json.loads((path / "manifest.json").read_text())
    entries = sum(int(s["entries"]) for s in m["segments"])
    live = sum(f["size"] for s in m["segments"] for f in s["files"].values())
    post = sum(s["files"][f]["size"] for s in m["segments"] for f in ("items.npy", "bits.npy"))
    return {"format_version": m["format_version"], "bytes_per_entry": round(live / max(entries, 1), 3),
            "posting_bytes_per_entry": round(post / max(entries, 1), 3)}


def build(args) -> None:
    import d2r
    from d2r.aggregate import Aggregated
    from d2r.index import Database

    dist = np.array(json.loads(Path(args.words).read_text())["distinct_words"])
    dist = dist[dist > 0]
    rng = np.random.default_rng(args.seed)
    ranks = np.arange(1, K + 1, dtype=np.float64)
    skew = json.loads(Path(args.words).read_text()).get("word_skew", 1.0)
    lo, hi = 0.0, 2.0  # Zipf exponent whose K Σ p² equals the measured skew
    for _ in range(50):
        mid = (lo + hi) / 2
        p = ranks ** -mid
        lo, hi = (mid, hi) if K * (p * p).sum() / p.sum() ** 2 < skew else (lo, mid)
    zipf = lo
    p = ranks ** -zipf
    cdf = np.cumsum(p[rng.permutation(K)])
    cdf /= cdf[-1]
    nbits = D // 8

    def records(n):
        counts = rng.choice(dist, n)
        draws = np.searchsorted(cdf, rng.random(int(counts.sum() * 1.3) + 64))
        out, pos = [], 0
        for c in counts:
            w = np.unique(draws[pos:pos + int(c * 1.3) + 4])[:c]
            pos += int(c * 1.3) + 4
            out.append(Aggregated("asmk_star", D, K, words=w.astype(np.uint32),
                                  bits=rng.integers(0, 256, (w.shape[0], nbits), dtype=np.uint8)))
        return out

    path = Path(args.dir)
    if path.exists():
        shutil.rmtree(path)
    cents = rng.standard_normal((K, D)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    book = d2r.Codebook(cents)
    sampler = Sampler()
    db = Database.create(path, book)
    db.lock()
    merge = db._merge

    def timed_merge(*a):
        before, sampler.phase = sampler.phase, "merge"
        t = time.perf_counter()
        try:
            merge(*a)
        finally:
            sampler.phase = before
            db.merge_stats["merge_seconds"] = db.merge_stats.get("merge_seconds", 0.0) + time.perf_counter() - t

    db._merge = timed_merge
    sampler.phase = "build"
    w0 = written_bytes()
    t0 = time.perf_counter()
    keep = []  # a few indexed records to query with
    for start in range(0, args.images, args.save_every):
        batch = records(min(args.save_every, args.images - start))
        for i, r in enumerate(batch):
            db.add_aggregated(start + i, r)
        per_batch = -(-args.queries * args.save_every // args.images)  # queries spread over the whole build
        keep.extend(batch[:per_batch])
        db.save()
        if not args.quiet and (start // args.save_every) % 10 == 0:
            print(f"{start + len(batch)} images, {len(db._segments)} segments, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    build_s = time.perf_counter() - t0
    written = written_bytes() - w0
    live, total = index_bytes(path)
    entries = db.info(files=False)["counts"]["entries"]
    segments = len(db._segments)
    stats = dict(db.merge_stats)
    db.close()

    sampler.phase = "open"
    t = time.perf_counter()
    db = Database.open(path)  # validates every segment (offsets, item ids: a pass over items.npy)
    open_s = time.perf_counter() - t
    sampler.phase = "search"
    queries = []
    for r in keep[: args.queries]:
        w = r.words.copy()
        swap = rng.random(w.shape[0]) < 0.3
        w[swap] = np.searchsorted(cdf, rng.random(int(swap.sum())))
        w, first = np.unique(w, return_index=True)
        bits = r.bits[first].copy()
        bits[swap[first]] = rng.integers(0, 256, (int(swap[first].sum()), nbits), dtype=np.uint8)
        queries.append(Aggregated("asmk_star", D, K, words=w.astype(np.uint32), bits=bits))
    if args.keep:  # the queries travel with the kept index, for `search` runs on later code
        np.savez(path.with_name(path.name + ".queries.npz"),
                 **{f"w{i}": q.words for i, q in enumerate(queries)},
                 **{f"b{i}": q.bits for i, q in enumerate(queries)})
    lat, raw = time_searches(db, queries, args.raw_queries, rng, sampler)
    sampler.stop()
    out = {
        "images": args.images, "save_every": args.save_every, "word_skew": skew, "zipf_exponent": round(zipf, 3), "K": K, "D": D, "entries": entries,
        "segments": segments, "build_seconds": round(build_s, 1),
        "build_ms_per_image": round(build_s / args.images * 1e3, 3),
        "merges": stats.get("merges", 0), "merge_seconds": round(stats.get("merge_seconds", 0.0), 1),
        "open_seconds": round(open_s, 2), "bytes_written": written, "index_bytes": live, "folder_bytes": total,
        "write_amplification": round(written / live, 2),
        **entry_bytes(path),
        "peak_rss_gb": {k: round(v["rss"] / 2**30, 2) for k, v in sampler.peaks.items()},
        "peak_anon_gb": {k: round(v["anon"] / 2**30, 2) for k, v in sampler.peaks.items()},
        **latency_figures(lat, raw, query_postings(db, queries)),
    }
    print(json.dumps(out, indent=1))
    if not args.keep:
        shutil.rmtree(path)


def time_searches(db, queries, raw_queries, rng, sampler):
    """Latencies (s) of aggregated queries, then of ``raw_queries`` searches from 1,000 raw descriptors."""
    db.search(queries[0], 100)  # caches (item tables) once, as a server would
    lat = []
    for q in queries:
        t = time.perf_counter()
        db.search(q, 100)
        lat.append(time.perf_counter() - t)
    raw = []
    sampler.phase = "search_raw"
    for _ in range(raw_queries):
        x = rng.standard_normal((1000, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = time.perf_counter()
        db.search(x, 100)
        raw.append(time.perf_counter() - t)
    return lat, raw


def latency_figures(lat, raw, postings=None) -> dict:
    """p50/p95 (ms); with ``postings`` (entries each aggregated query scans): their mean and the median
    time per posting entry over the queries (ns, whole search)."""
    ms = lambda v, q: round(float(np.percentile(v, q)) * 1e3, 2) if v else None  # noqa: E731
    out = {"search_ms": {"queries": len(lat), "p50": ms(lat, 50), "p95": ms(lat, 95)},
           "search_raw_ms": {"queries": len(raw), "p50": ms(raw, 50), "p95": ms(raw, 95)}}
    if postings:
        out["search_ms"]["postings_mean"] = int(np.mean(postings))
        per = np.median(np.array(lat) / np.array(postings))
        out["search_ms"]["ns_per_posting"] = round(float(per) * 1e9, 2)
    return out


def query_postings(db, queries) -> list[int]:
    """Posting entries each query's words hold over the index's segments."""
    from d2r.index.search import query_postings as count

    return [count(db._searchable(), q.words) for q in queries]


def search(args) -> None:
    """Search an index kept by ``build --keep`` with the queries saved beside it (latest search code)."""
    from d2r.aggregate import Aggregated
    from d2r.index import Database

    path = Path(args.dir)
    saved = np.load(path.with_name(path.name + ".queries.npz"))
    n = len(saved.files) // 2
    queries = [Aggregated("asmk_star", D, K, words=saved[f"w{i}"], bits=saved[f"b{i}"]) for i in range(n)]
    sampler = Sampler()
    sampler.phase = "open"
    t = time.perf_counter()
    db = Database.open(path)
    open_s = time.perf_counter() - t
    if args.warm:  # read every index file once: the figures of a server whose index sits in the page cache
        import re

        live = set(re.findall(r"seg-[0-9]+-[0-9a-f]+", (path / "manifest.json").read_text()))
        for f in sorted(path.rglob("*")):
            if f.is_file() and (f.parent == path or f.parent.name in live):  # not the kept older generations
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
    sampler.phase = "search"
    lat, raw = time_searches(db, queries[: args.queries], args.raw_queries, np.random.default_rng(args.seed), sampler)
    sampler.stop()
    out = {"images": len(db), **entry_bytes(path), "open_seconds": round(open_s, 2), "warm": args.warm,
           "peak_rss_gb": {k: round(v["rss"] / 2**30, 2) for k, v in sampler.peaks.items()},
           "peak_anon_gb": {k: round(v["anon"] / 2**30, 2) for k, v in sampler.peaks.items()},
           **latency_figures(lat, raw, query_postings(db, queries[: args.queries]))}
    print(json.dumps(out, indent=1))


def kernel(args) -> None:
    """The scan kernel alone on a synthetic in-RAM segment: the same postings as format 2 (uint32 ids, one
    block) and format 3 (uint16 ids in blocks of 65,536 items), one thread, interleaved runs."""
    from d2r.index.segment import num_blocks
    from d2r.kernels.binary import as_words64
    from tests.reference import scan_bits  # the whole-segment scan (reference entry point)

    rng = np.random.default_rng(args.seed)
    m, per, wq = args.items, args.postings, args.words
    full = np.concatenate([np.sort(rng.choice(m, per, replace=False)) for _ in range(wq)]).astype(np.uint32)
    e = full.shape[0]
    bits = as_words64(rng.integers(0, 256, (e, D // 8), dtype=np.uint8))
    words = np.repeat(np.arange(wq), per)
    blocks = num_blocks(m)
    layouts = {}
    for name, nb, ids in (("format 2", 1, full), ("format 3", blocks, (full & 0xFFFF).astype(np.uint16))):
        runs = words * nb + (full.astype(np.int64) >> 16 if nb > 1 else 0)
        off = np.zeros(wq * nb + 1, np.int64)
        np.cumsum(np.bincount(runs, minlength=wq * nb), out=off[1:])
        layouts[name] = (off, ids, nb)
    qw = np.arange(wq, dtype=np.uint32)
    qb = as_words64(rng.integers(0, 256, (wq, D // 8), dtype=np.uint8))
    times = {name: [] for name in layouts}
    ref = None
    for rep in range(args.repeats + 1):
        for name in (list(layouts) if rep % 2 else list(layouts)[::-1]):
            off, ids, nb = layouts[name]
            scores = np.zeros(m)
            t = time.perf_counter()
            scan_bits(qw, qb, off, ids, nb, bits, D, 3.0, 0.0, False, np.zeros(0), scores)
            if rep:  # the first round loads the kernels
                times[name].append(time.perf_counter() - t)
            ref = scores if ref is None else ref
            if not np.array_equal(scores, ref):
                raise SystemExit(f"{name}: scores differ between layouts")
    out = {"items": m, "entries": e, "query_words": wq, "blocks": blocks}
    for name, v in times.items():
        out[name] = {"median_ms": round(float(np.median(v)) * 1e3, 2), "min_ms": round(min(v) * 1e3, 2),
                     "ns_per_entry": round(float(np.median(v)) / e * 1e9, 3)}
    print(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("words")
    w.add_argument("--photos", default=os.path.join(os.environ.get("D2R_SHARED", "../shared"),
                                                    "data", "instance_bench_dev"))
    w.add_argument("--photos-max", type=int, default=120)
    w.add_argument("--out", required=True)
    b = sub.add_parser("build")
    b.add_argument("--images", type=int, default=100_000)
    b.add_argument("--save-every", type=int, default=1000)
    b.add_argument("--dir", required=True)
    b.add_argument("--words", required=True)
    b.add_argument("--queries", type=int, default=200)
    b.add_argument("--raw-queries", type=int, default=100)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--keep", action="store_true", help="keep the index folder")
    b.add_argument("--quiet", action="store_true")
    s = sub.add_parser("search", help="search an index kept by build --keep")
    s.add_argument("--dir", required=True)
    s.add_argument("--queries", type=int, default=200)
    s.add_argument("--raw-queries", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--warm", action="store_true", help="read the index files once before timing")
    k = sub.add_parser("kernel", help="the scan kernel alone on format-2 and format-3 postings")
    k.add_argument("--items", type=int, default=1_000_000)
    k.add_argument("--words", type=int, default=830)
    k.add_argument("--postings", type=int, default=28_800, help="postings per query word")
    k.add_argument("--repeats", type=int, default=10)
    k.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"words": measure_words, "build": build, "search": search, "kernel": kernel}[args.cmd](args)


if __name__ == "__main__":
    main()
