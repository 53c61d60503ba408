"""Small searches under load (issue 23 item 13): ``Database.search`` of 150-descriptor queries from raw
descriptors (assignment + aggregation + scan + top-100), default thread settings, 1,000 synthetic images of
300 descriptors, ASMK*; prints one JSON line (median / best / mean ms over 3 × 50 queries).

    PYTHONPATH=. python benchmarks/bench_small_search.py [K]

Run it from two checkouts in turn (``PYTHONPATH=<checkout>``) to compare them on the same machine and load.
"""

import json
import sys
import time

import numpy as np

import d2r
from d2r import Codebook, Database


def main() -> None:
    rng = np.random.default_rng(0)
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    c = rng.standard_normal((k, 128)).astype(np.float32)
    book = Codebook(c / np.linalg.norm(c, axis=1, keepdims=True))
    db = Database.create(None, book, kernel="asmk_star")
    protos = rng.standard_normal((4096, 128)).astype(np.float32)

    def image():
        x = protos[rng.integers(0, 4096, 300)] + 0.05 * rng.standard_normal((300, 128)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db.add_batch((i, image(), None) for i in range(1000))
    queries = [image()[:150] for _ in range(50)]
    db.search(queries[0])  # kernels loaded, caches built
    times = []
    for _ in range(3):
        for q in queries:
            t = time.perf_counter()
            db.search(q, top_k=100)
            times.append(time.perf_counter() - t)
    ms = 1e3 * np.asarray(times)
    print(json.dumps({"code": d2r.__file__, "K": k, "median_ms": float(np.median(ms)), "best_ms": float(ms.min()),
                      "mean_ms": float(ms.mean())}))


if __name__ == "__main__":
    main()
