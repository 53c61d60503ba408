"""Ray scale-out on this machine: extraction throughput with 1 vs 2 workers, sharded search against one index.

    PYTHONPATH=. python benchmarks/bench_distributed.py extract --photos 24 --delf-photos 2
    PYTHONPATH=. python benchmarks/bench_distributed.py search --images 100000 --dir /tmp/d2r-sharded

``extract``: the first ``--photos`` dev photos (``$D2R_SHARED/data/instance_bench_dev/images``), RootSIFT with
default settings, extracted by one process (``extract_to_store``, 1 thread) and by ``d2r.distributed.extract``
on a local Ray (2 CPUs) with 1 and 2 workers; then our ResNet50 DELF with random weights (7 scales, exported
as a SavedModel and loaded by path in each actor) on ``--delf-photos`` photos. Per run: wall seconds (actor
start-up and model loading included), images/s, the per-image extraction cost measured inside the workers,
the driver's own time (setup: extractor check, listing, store; commits per image) and the commits' share of
the wall time. With W workers on N nodes the
throughput is about W·N / (per-image cost) until the driver saturates at 1 / (driver seconds per image).

``search``: a synthetic ASMK* index (K = 65,536, D = 128; per image a distinct-word count drawn from the dev
photos' measured distribution ``benchmarks/results/scale_words.json``, Zipf-skewed words, random signatures),
built once as one index and once as 4 shards (contiguous blocks, the same records), then ``--queries`` queries
(indexed images with 30 % of their words replaced): top-100 of the sharded index (in-process threads, and Ray
actors) compared with the one index (ids and scores), latency p50/p95 of each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

K, D = 65_536, 128
SHARED = Path(os.environ.get("D2R_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def _photos(n: int) -> list[tuple[str, str]]:
    from d2r.features import list_images

    pairs = list_images(SHARED / "data" / "instance_bench_dev" / "images")
    if not pairs:
        raise SystemExit(f"no dev photos under {SHARED} (set D2R_SHARED)")
    return [(i, str(p)) for i, p in pairs[:n]]


def _ray_runs(pairs, root: Path, features, **kw) -> list[dict]:
    from d2r.distributed import extract

    out = []
    for workers in (1, 2):
        t = time.perf_counter()
        s = extract(pairs, root / f"{features}-ray{workers}", features, workers=workers, progress=False, **kw)
        wall = time.perf_counter() - t
        n = s["extracted"]
        out.append({"workers": workers, "images": n, "wall_s": round(wall, 2),
                    "images_per_s": round(n / wall, 3),
                    "per_image_worker_s": round(s["worker_seconds"] / n, 3),
                    "driver_setup_s": s["setup_seconds"], "driver_commit_s": s["driver_seconds"],
                    "driver_commit_per_image_s": round(s["driver_seconds"] / n, 4),
                    "driver_share": round(s["driver_seconds"] / wall, 4)})
    return out


def bench_extract(args) -> dict:
    import d2r.distributed as dist
    from d2r.build import extract_to_store
    from d2r.features import get_extractor

    pairs = _photos(args.photos)
    root = Path(tempfile.mkdtemp(prefix="d2r-bench-dist-"))
    result = {"photos": len(pairs)}
    try:
        t = time.perf_counter()
        extract_to_store(pairs, get_extractor("rootsift"), root / "one", workers=1, progress=False)
        wall = time.perf_counter() - t
        result["rootsift_one_process"] = {"images": len(pairs), "wall_s": round(wall, 2),
                                          "images_per_s": round(len(pairs) / wall, 3)}
        ray, started = dist.init(num_cpus=2)
        try:
            result["rootsift_ray"] = _ray_runs(pairs, root, "rootsift")
            if args.delf_photos:
                from d2r.features.delf import DELF, DELFConfig, build_delf_model

                model = root / "delf-random"
                cfg = DELFConfig(use_pca=False, max_features=1000)
                DELF.from_keras(model=build_delf_model("resnet50", weights=None), config=cfg).export(model)
                result["delf"] = {"model": "ResNet50 DELF, random weights, 7 scales, 1000 features, no PCA",
                                  "runs": _ray_runs(_photos(args.delf_photos), root, "delf", model=model,
                                                    options={"use_pca": False})}
        finally:
            if started:
                ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _records(rng, n, dist, cdf):
    from d2r.aggregate import Aggregated

    counts = rng.choice(dist, n)
    out = []
    for c in counts:
        words = np.unique(np.searchsorted(cdf, rng.random(int(c) * 2)))[:c]
        out.append(Aggregated("asmk_star", D, K, words=words.astype(np.uint32),
                              bits=rng.integers(0, 256, (words.shape[0], D // 8), dtype=np.uint8)))
    return out


def bench_search(args) -> dict:
    import d2r
    from d2r.aggregate import Aggregated
    from d2r.distributed import ShardedDatabase, shard_bounds
    from d2r.index import Database

    words = json.loads((Path(__file__).parent / "results" / "scale_words.json").read_text())["distinct_words"]
    dist = np.array([w for w in words if w > 0])
    rng = np.random.default_rng(args.seed)
    p = np.arange(1, K + 1, dtype=np.float64) ** -0.6
    cdf = np.cumsum(p[rng.permutation(K)])
    cdf /= cdf[-1]
    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    cents = rng.standard_normal((K, D)).astype(np.float32)
    book = d2r.Codebook(cents / np.linalg.norm(cents, axis=1, keepdims=True))
    one = Database.create(root / "one", book, idf=args.idf)
    shards = [Database.create(root / f"shard{s}", book, idf=args.idf) for s in range(4)]
    bounds = shard_bounds(args.images, 4)
    kept, entries = [], 0
    t = time.perf_counter()
    for start in range(0, args.images, args.chunk):
        recs = _records(rng, min(args.chunk, args.images - start), dist, cdf)
        for j, rec in enumerate(recs):
            i = start + j
            one.add_aggregated(i, rec)
            shards[int(np.searchsorted(bounds, i, side="right")) - 1].add_aggregated(i, rec)
            entries += rec.words.shape[0]
            if i % max(1, args.images // args.queries) == 0 and len(kept) < args.queries:
                kept.append(rec)
        one.save()
        for s in shards:
            s.save()
    build = time.perf_counter() - t
    for db in [one] + shards:
        db.close()
    queries = []
    for rec in kept:  # an indexed image with 30 % of its words replaced
        w = rec.words.copy()
        swap = rng.random(w.shape[0]) < 0.3
        w[swap] = rng.integers(0, K, int(swap.sum()))
        w, first = np.unique(w, return_index=True)
        queries.append(Aggregated("asmk_star", D, K, words=w.astype(np.uint32), bits=rec.bits[first]))

    def timed(db):
        db.search(queries[0], 100)  # warm caches
        lat, out = [], []
        for q in queries:
            t0 = time.perf_counter()
            out.append(db.search(q, 100))
            lat.append(time.perf_counter() - t0)
        lat = np.array(lat) * 1000
        return out, {"p50_ms": round(float(np.percentile(lat, 50)), 2),
                     "p95_ms": round(float(np.percentile(lat, 95)), 2)}

    single = Database.open(root / "one")
    ref, one_lat = timed(single)
    result = {"images": args.images, "posting_entries": entries, "idf": args.idf, "queries": len(queries),
              "build_s_both": round(build, 1), "one_index": one_lat}
    for name, kw in (("sharded_threads", {}), ("sharded_ray_actors", {"ray": True})):
        if kw:
            import d2r.distributed as dist_mod

            ray, started = dist_mod.init(num_cpus=2)
        with ShardedDatabase([root / f"shard{s}" for s in range(4)], **kw) as sharded:
            got, lat = timed(sharded)
        same = all(np.array_equal(np.asarray(a.ids), np.asarray(b.ids)) and np.array_equal(a.scores, b.scores)
                   for a, b in zip(ref, got))
        result[name] = dict(lat, identical_top100=bool(same))
        if kw and started:
            ray.shutdown()
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--photos", type=int, default=24)
    e.add_argument("--delf-photos", type=int, default=2)
    s = sub.add_parser("search")
    s.add_argument("--images", type=int, default=100_000)
    s.add_argument("--chunk", type=int, default=10_000, help="images per save")
    s.add_argument("--queries", type=int, default=100)
    s.add_argument("--idf", action="store_true")
    s.add_argument("--dir", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    out = bench_extract(args) if args.what == "extract" else bench_search(args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
