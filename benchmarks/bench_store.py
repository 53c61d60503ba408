"""Feature store figures: engine-like writing (a small flush every batch, size-based shards, tiered
compaction), write amplification, and random reads from 1 and several threads.

    python benchmarks/bench_store.py --images 2000 --features 300 --shard-mb 32 --batch 64 --threads 4

Synthetic features (D=128 float32, ``--features`` per image); prints one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2r.features import FeatureStore, LocalFeatures
from d2r.features.store import format as store_fmt  # its save_array writes every shard file


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--features", type=int, default=300, help="features per image")
    ap.add_argument("--shard-mb", type=float, default=32.0)
    ap.add_argument("--batch", type=int, default=64, help="images per flush (the engine's batch_size)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--reads", type=int, default=4000)
    ap.add_argument("--dir", help="work folder (default: a temporary one)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    n = f = args.features
    one = LocalFeatures(
        rng.random((n, 2), np.float32),
        rng.random(n, np.float32),
        rng.random(n, np.float32),
        rng.random((f, 128), np.float32),
    )
    written = {"bytes": 0}
    real = store_fmt.save_array

    def counting(path, array, **kw):
        out = real(path, array, **kw)
        written["bytes"] += out["size"]
        return out

    store_fmt.save_array = counting
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "store"
        info = {"name": "synthetic", "fingerprint": "bench", "dim": 128}
        t0 = time.perf_counter()
        with FeatureStore.create(path, info, shard_bytes=int(args.shard_mb * (1 << 20))) as store:
            for i in range(args.images):
                store.add(f"im{i:07d}", one)
                if (i + 1) % args.batch == 0:
                    store.flush()
        t_write = time.perf_counter() - t0
        reader = FeatureStore.open(path)
        final = sum(r["bytes"] for r in reader.manifest["shards"])
        ids = reader.ids()
        keys = [ids[j] for j in np.random.default_rng(1).integers(0, len(ids), args.reads)]
        reader.get(keys[0])
        t0 = time.perf_counter()
        for k in keys:
            reader.get(k)
        t_serial = time.perf_counter() - t0
        reader = FeatureStore.open(path)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(reader.get, keys, chunksize=64))
        t_threads = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_iter = sum(1 for _ in FeatureStore.open(path))
        t_iter = time.perf_counter() - t0
        t0 = time.perf_counter()
        damaged = reader.check()
        t_check = time.perf_counter() - t0
    store_fmt.save_array = real
    out = {
        "images": args.images,
        "features_per_image": f,
        "batch": args.batch,
        "shard_mb": args.shard_mb,
        "flushes": args.images // args.batch,
        "shards": reader.num_shards,
        "final_mb": round(final / 2**20, 1),
        "written_mb": round(written["bytes"] / 2**20, 1),
        "write_amplification": round(written["bytes"] / final, 2),
        "write_mb_per_s": round(written["bytes"] / 2**20 / t_write, 1),
        "get_per_s_1_thread": round(args.reads / t_serial),
        f"get_per_s_{args.threads}_threads": round(args.reads / t_threads),
        "iterate_images_per_s": round(n_iter / t_iter),
        "check_mb_per_s": round(final / 2**20 / t_check, 1),
        "damaged": len(damaged),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
