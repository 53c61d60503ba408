"""Write the on-disk fixture of tests/test_storage_compat.py with the d2r of commit a0fe626 (the last release
before the one storage layer): a feature store and two databases, plus the results that d2r gave on them.

    rm -rf /tmp/d2r-a0fe626 && mkdir /tmp/d2r-a0fe626 && git archive a0fe626 | tar -x -C /tmp/d2r-a0fe626
    PYTHONPATH=/tmp/d2r-a0fe626 python tests/data/release_a0fe626/make.py tests/data/release_a0fe626

Everything is synthetic (seeded) and small (D = 8, K = 16). The store has nine flushes, so a compaction retired
eight shards (the old ``retired`` list), a recorded failure and a removed (masked) image; the databases have two
segments and a removal table each. ``expected.json`` holds what the old code read and searched: per image a
BLAKE2b of its feature arrays, per query the ranked ids and the scores as ``float.hex`` (bit for bit).
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

import d2r
from d2r.features import FeatureStore, LocalFeatures, RegionFeatures
from d2r.index import Database

INFO = {"name": "toy", "config": {}, "fingerprint": "fp-toy", "dim": 8}


def features(rng, regions: bool):
    n = int(rng.integers(4, 12))
    f = LocalFeatures(rng.random((n, 2), np.float32) * 100, rng.random(n, np.float32), rng.random(n, np.float32),
                      rng.standard_normal((n, 8)).astype(np.float32))
    if not regions:
        return f
    k = n // 2
    return RegionFeatures(f, np.array([n - k, k]), rng.random((2, 4)).astype(np.float32) * 50, np.array([-1, 0]),
                          rng.random(2).astype(np.float32))


def local(feats) -> LocalFeatures:
    return feats.features if isinstance(feats, RegionFeatures) else feats


def digest(feats) -> str:
    """BLAKE2b of every array of an image's features, in a fixed order (the store's content, bit for bit)."""
    h = hashlib.blake2b(digest_size=16)
    f = local(feats)
    parts = [f.locations, f.scales, f.scores, f.descriptors]
    if isinstance(feats, RegionFeatures):
        parts += [feats.counts, feats.boxes, feats.box_ids, feats.box_scores]
    h.update(type(feats).__name__.encode())
    for a in parts:
        h.update(str(a.dtype).encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def ranking(result) -> dict:
    return {"ids": [str(i) for i in result.ids], "scores": [float(s).hex() for s in result.scores]}


def main(out: Path) -> None:
    print(f"writing {out} with {d2r.__file__}", file=sys.stderr)
    shutil.rmtree(out / "store", ignore_errors=True)
    shutil.rmtree(out / "index_asmk_star", ignore_errors=True)
    shutil.rmtree(out / "index_asmk", ignore_errors=True)
    rng = np.random.default_rng(20260)
    expected = {"made_by": "d2r a0fe626", "store": {}, "databases": {}}

    # the store: nine flushes (the eighth triggers a compaction that retires eight shards)
    store = FeatureStore.create(out / "store", INFO)
    for flush in range(9):
        for j in range(2):
            image_id = f"img{flush}-{j}"
            store.add(image_id, features(rng, regions=(flush + j) % 3 == 0))
        store.flush()
    store.add_failure("broken", "DecodeError: truncated file")
    store.remove(["img2-1"])
    store.close()
    reader = FeatureStore.open(out / "store")
    expected["store"] = {"ids": reader.ids(), "failures": reader.failures,
                         "features": {i: digest(reader.get(i)) for i in reader.ids()}}

    # two databases built from the stored features (two segments, a removal table each)
    cents = rng.standard_normal((16, 8)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    queries = rng.standard_normal((3, 20, 8)).astype(np.float32)
    np.save(out / "queries.npy", queries)
    for name, kw in (("index_asmk_star", {"kernel": "asmk_star", "mode": "search"}),
                     ("index_asmk", {"kernel": "asmk", "mode": "aggregation", "idf": True})):
        db = Database.create(out / name, d2r.Codebook(cents), **kw)
        ids = reader.ids()
        for half in (ids[: len(ids) // 2], ids[len(ids) // 2:]):
            for image_id in half:
                f = reader.get(image_id)
                regions = f.counts if isinstance(f, RegionFeatures) else None
                db.add(image_id, local(f).descriptors, regions)
            db.save()
        db.remove(ids[3])
        db.save()
        db.close()
        db = Database.open(out / name)
        expected["databases"][name] = {
            "ids": [str(i) for i in db.ids()],
            "queries": [ranking(db.search(q, top_k=8)) for q in queries],
            "stored": [ranking(db.search(local(reader.get(i)).descriptors, top_k=8)) for i in ids[:3]],
        }
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    for p in out.rglob(".lock"):
        p.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
