"""The global index: equal to a brute-force scan after random add / remove / save / reopen sequences,
crash-safe commits, pinned readers, damaged files named in one line, and the faiss IVF-PQ option."""

import json

import numpy as np
import pytest

from d2r.globaldesc import index as gindex
from d2r.globaldesc.index import GlobalIndex
from d2r.globaldesc.search import exact_top_k
from d2r.storage import DamagedError, TierPolicy

SMALL_MERGES = TierPolicy(factor=2, floor_bytes=64, max_segments=3)


class Twin:
    """What the index should hold: live (id, vector) in insertion order."""

    def __init__(self):
        self.rows = []

    def add(self, ids, vecs):
        self.rows += list(zip(ids.tolist(), vecs))

    def remove(self, ids):
        drop = set(ids.tolist())
        self.rows = [r for r in self.rows if r[0] not in drop]

    def search(self, q, k):
        ids = np.array([r[0] for r in self.rows], np.int64)
        v = np.array([r[1] for r in self.rows], np.float64).reshape(-1, q.shape[1])
        out_i = np.full((q.shape[0], k), -1, np.int64)
        out_s = np.full((q.shape[0], k), -np.inf)
        for j in range(q.shape[0]):
            s = v @ q[j]
            order = np.argsort(-s, kind="stable")[:k]  # ties by insertion order
            out_i[j, :order.size], out_s[j, :order.size] = ids[order], s[order]
        return out_i, out_s


def int_vectors(rng, n, d):
    """Small integers: every inner product is exact in float32 and float16, so ties are real ties."""
    return rng.integers(-3, 4, size=(n, d)).astype(np.float32)


def check_equal(idx, twin, rng, d, k):
    q = int_vectors(rng, 5, d)
    got_i, got_s = idx.search(q, k)
    want_i, want_s = twin.search(q, k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s.astype(np.float32))
    assert len(idx) == len(twin.rows)
    np.testing.assert_array_equal(idx.ids(), [r[0] for r in twin.rows])


@pytest.mark.parametrize("dtype, seed", [("float32", 0), ("float32", 1), ("float16", 2)])
def test_random_add_remove_save_reopen_equals_brute_force(tmp_path, dtype, seed):
    rng = np.random.default_rng(seed)
    d = 6
    idx = GlobalIndex.create(tmp_path / "g", d, dtype, policy=SMALL_MERGES)
    twin, next_id, removed_ids = Twin(), 0, []
    for step in range(40):
        op = rng.choice(["add", "add", "remove", "save", "reopen", "readd"])
        if op == "add":
            n = int(rng.integers(1, 30))
            ids = np.arange(next_id, next_id + n, dtype=np.int64) * 7 - 50  # negative and sparse ids too
            next_id += n
            v = int_vectors(rng, n, d)
            idx.add(ids, v)
            twin.add(ids, v)
        elif op == "readd" and removed_ids:
            ids = np.array(removed_ids[:3], np.int64)
            del removed_ids[:3]
            v = int_vectors(rng, ids.size, d)
            idx.add(ids, v)
            twin.add(ids, v)
        elif op == "remove" and twin.rows:
            live = np.array([r[0] for r in twin.rows])
            ids = rng.choice(live, size=min(int(rng.integers(1, 8)), live.size), replace=False)
            assert idx.remove(ids) == ids.size
            twin.remove(ids)
            removed_ids += ids.tolist()
        elif op == "save":
            idx.save()
        elif op == "reopen":
            idx.save()
            idx.close()
            idx = GlobalIndex.open(tmp_path / "g", writable=True, policy=SMALL_MERGES)
        check_equal(idx, twin, rng, d, k=int(rng.integers(1, 25)))
        seen = np.arange(next_id, dtype=np.int64) * 7 - 50  # every id ever added: live, removed, pending
        probe = np.concatenate([rng.choice(seen, 30) if next_id else seen, rng.integers(-60, 7 * next_id, 10)])
        live = {int(r[0]) for r in twin.rows}
        assert idx.contains(probe).tolist() == [int(i) in live for i in probe] == [int(i) in idx for i in probe]
    idx.save()
    idx.close()
    reader = GlobalIndex.open(tmp_path / "g")
    check_equal(reader, twin, rng, d, k=len(twin.rows) + 3)  # padding past the live count
    assert reader.check() == []
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert len(m["segments"]) <= 3  # the merge policy ran


def test_add_and_remove_refuse_bad_input_without_changing_anything():
    idx = GlobalIndex(4)
    idx.add(np.array([1, 2]), np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(ValueError, match="already in the index"):
        idx.add(np.array([3, 2]), np.ones((2, 4)))
    with pytest.raises(ValueError, match="repeated"):
        idx.add(np.array([5, 5]), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(1, 4\)"):
        idx.add(np.array([9]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        idx.add(np.array([9]), np.full((1, 4), np.nan))
    with pytest.raises(KeyError, match="7"):
        idx.remove([1, 7])
    assert len(idx) == 2 and 1 in idx and 3 not in idx
    ids, scores = idx.search(np.array([1, 0, 0, 0], np.float32), 3)
    assert ids.tolist() == [1, 2, -1] and scores[0] == 1.0 and np.isneginf(scores[2])
    with pytest.raises(ValueError, match="top_k"):
        idx.search(np.ones(4), 0)
    with pytest.raises(ValueError, match="in-memory"):
        idx.save()
    np.testing.assert_array_equal(idx.vectors([2]), np.eye(4, dtype=np.float32)[1:2])


def test_a_failed_commit_keeps_the_previous_generation(tmp_path, monkeypatch):
    """A crash between writing a segment and the manifest: readers and the next open see the old generation;
    the orphan segment is collected by the next successful save."""
    rng = np.random.default_rng(5)
    idx = GlobalIndex.create(tmp_path / "g", 4)
    idx.add(np.arange(10), int_vectors(rng, 10, 4))
    idx.save()
    before = idx.search(np.ones(4, np.float32), 10)
    idx.add(np.arange(10, 20), int_vectors(rng, 10, 4))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(gindex.GENERATIONS), "commit", boom)  # the storage layer's commit point
    with pytest.raises(OSError, match="disk full"):
        idx.save()
    monkeypatch.undo()
    idx.close()
    segs = [p.name for p in (tmp_path / "g").iterdir() if p.name.startswith("seg-")]
    assert len(segs) == 2  # the orphan is on disk, not in the manifest
    again = GlobalIndex.open(tmp_path / "g", writable=True)
    assert len(again) == 10
    np.testing.assert_array_equal(again.search(np.ones(4, np.float32), 10)[0], before[0])
    again.add(np.array([99]), np.ones((1, 4)))
    again.save()
    assert len([p for p in (tmp_path / "g").iterdir() if p.name.startswith("seg-")]) == 2  # orphan gone


def test_a_reader_keeps_its_generation_while_the_writer_commits(tmp_path):
    rng = np.random.default_rng(6)
    w = GlobalIndex.create(tmp_path / "g", 4, policy=SMALL_MERGES)
    w.add(np.arange(20), int_vectors(rng, 20, 4))
    w.save()
    r = GlobalIndex.open(tmp_path / "g")
    q = int_vectors(rng, 3, 4)
    pinned = r.search(q, 5)
    w.remove(np.arange(0, 20, 2))
    w.add(np.arange(100, 130), int_vectors(rng, 30, 4))
    w.save()  # merges, a new removal table
    w.add(np.arange(200, 205), int_vectors(rng, 5, 4))
    w.save()
    for a, b in zip(r.search(q, 5), pinned):
        np.testing.assert_array_equal(a, b)
    r.refresh()
    assert len(r) == 45
    with pytest.raises(ValueError, match="read-only"):
        r.save()


def test_one_writer_at_a_time(tmp_path):
    w = GlobalIndex.create(tmp_path / "g", 3)
    with pytest.raises(Exception, match="another writer"):
        GlobalIndex.open(tmp_path / "g", writable=True)
    w.close()
    GlobalIndex.open(tmp_path / "g", writable=True).close()
    with pytest.raises(FileExistsError):
        GlobalIndex.create(tmp_path / "g", 3)


def saved(tmp_path, n=50, d=8):
    rng = np.random.default_rng(9)
    idx = GlobalIndex.create(tmp_path / "g", d)
    idx.add(np.arange(n), int_vectors(rng, n, d))
    idx.remove([3, 4])
    idx.save()
    idx.close()
    return tmp_path / "g"


def one_line_error(path, match):
    with pytest.raises(DamagedError) as exc:
        GlobalIndex.open(path)
    msg = str(exc.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_a_truncated_vector_file_is_named(tmp_path):
    path = saved(tmp_path)
    seg = next(path.glob("seg-*"))
    f = seg / "vectors.npy"
    f.write_bytes(f.read_bytes()[:-40])
    assert str(f) in one_line_error(path, "bytes, the manifest says")


def test_a_missing_segment_and_a_bad_manifest_are_named(tmp_path):
    path = saved(tmp_path)
    seg = next(path.glob("seg-*"))
    (seg / "ids.npy").unlink()
    assert str(seg / "ids.npy") in one_line_error(path, "missing")
    (path / "manifest.json").write_text("{not json")
    one_line_error(path, "unreadable manifest")
    (path / "manifest.json").write_text(json.dumps({"format": "d2r-database"}))
    one_line_error(path, "not a d2r global index")


def test_wrong_shapes_and_flipped_bytes(tmp_path):
    path = saved(tmp_path)
    seg = next(path.glob("seg-*"))
    f = seg / "vectors.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF  # same size, other content: found by the digest check
    f.write_bytes(bytes(raw))
    idx = GlobalIndex.open(path)
    problems = idx.check()
    assert problems == [f"{f}: content does not match its digest"]
    np.save(f, np.zeros((48, 7), np.float32))  # a valid .npy of the wrong shape (48 rows: 3, 4 never saved)
    m = json.loads((path / "manifest.json").read_text())
    m["segments"][0]["files"]["vectors.npy"]["size"] = f.stat().st_size
    (path / "manifest.json").write_text(json.dumps(m))
    assert str(f) in one_line_error(path, "expected float32 (48, 8)")


def test_exact_top_k_blocks_equal_one_stable_sort():
    rng = np.random.default_rng(1)
    x = int_vectors(rng, 1000, 5)
    q = int_vectors(rng, 4, 5)
    removed = rng.random(1000) < 0.2
    ids, scores = exact_top_k(q, x, 37, removed, block_rows=64)
    s = q @ x.T
    s[:, removed] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :37]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_array_equal(scores, np.take_along_axis(s, order, 1))


def test_faiss_ivfpq_recall_and_consistency(tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu not installed (the [faiss] extra)")
    rng = np.random.default_rng(0)
    d, n = 32, 4000
    centres = rng.normal(size=(64, d)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = GlobalIndex.create(tmp_path / "g", d)
    idx.add(np.arange(n), x)
    idx.save()
    idx.build_ann(nlist=32, m=8, nprobe=8, threads=1)
    idx.remove(np.arange(0, 100))
    idx.save()
    idx.add(np.arange(n, n + 50), x[:50])  # rows past the faiss index: scanned exactly
    q = x[rng.integers(100, n, 50)] + 0.05 * rng.normal(size=(50, d)).astype(np.float32)
    exact_i, _ = idx.search(q, 10, exact=True)
    ann_i, ann_s = idx.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ann_i, exact_i)])
    assert recall > 0.9, recall
    assert not np.isin(ann_i, np.arange(100)).any()  # removed rows never come back
    idx.save()
    idx.close()
    again = GlobalIndex.open(tmp_path / "g")
    np.testing.assert_array_equal(again.search(q, 10)[0], ann_i)  # the saved faiss file gives the same answer
    assert again.check() == []
