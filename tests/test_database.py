"""Database search equals brute-force d2r.similarity; persistence, removal, compaction and crash safety."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import d2r
from d2r.aggregate import Aggregator, similarity
from d2r.index import Database
from d2r._lock import LockedError
from d2r.index import MergePolicy
from d2r.engine import Engine
from tests.corpus import CODEBOOK, write_photos


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _images(rng, cents, count, regional):
    """Random images; some share structure with the query (noisy copies) so scores vary; some are empty."""
    d = cents.shape[1]
    base = _unit(rng, 60, d)
    out = []
    for i in range(count):
        n = int(rng.choice([0, 5, 40, 120])) if i % 7 else 0
        x = _unit(rng, n, d)
        if i % 3 == 0 and n:
            k = min(n, 30)
            x[:k] = base[:k] + 0.1 * rng.standard_normal((k, d)).astype(np.float32)
        regions = None
        if regional and n:
            cut = np.sort(rng.integers(0, n + 1, size=2))
            regions = [cut[0], 0, cut[1] - cut[0], n - cut[1]]
        elif regional:
            regions = [0]
        out.append((f"im{i}", x, regions))
    query = np.concatenate([base[:40] + 0.05 * rng.standard_normal((40, d)).astype(np.float32), _unit(rng, 20, d)])
    return out, query


def _brute_force(images, query, cents, cfg, idf=None):
    agg = Aggregator(cents, cfg["kernel"], cfg["num_assignments"])
    qagg = Aggregator(cents, cfg["kernel"], cfg["query_num_assignments"])
    q = qagg(query)
    kw = dict(alpha=cfg["alpha"], tau=cfg["tau"], normalize=cfg["normalize"], tau_inclusive=cfg["tau_inclusive"],
              idf=idf)
    scores = {}
    for image_id, x, regions in images:
        if cfg["mode"] == "aggregation":
            scores[image_id] = similarity(q, agg(x, regions), **kw)
        elif regions is None:
            scores[image_id] = similarity(q, agg(x), **kw)
        else:
            scores[image_id] = max(similarity(q, r, **kw) for r in agg.per_region(x, regions))
    return scores


CONFIGS = [
    dict(kernel=k, mode=m, normalize=n, tau_inclusive=inc, tau=t, alpha=a, num_assignments=ma,
         query_num_assignments=qma, idf=idf)
    for k, m, n, inc, t, a, ma, qma, idf in [
        ("asmk_star", "aggregation", True, False, 0.0, 3.0, 1, 1, False),
        ("asmk_star", "aggregation", False, True, 0.0, 3.0, 1, 3, False),
        ("asmk_star", "search", True, True, 0.0, 3.0, 1, 1, False),
        ("asmk_star", "search", False, False, 0.25, 2.0, 2, 1, False),
        ("asmk", "aggregation", True, False, 0.0, 3.0, 1, 1, False),
        ("asmk", "search", False, True, 0.1, 3.0, 1, 2, False),
        ("asmk_star", "aggregation", True, False, 0.0, 3.0, 1, 1, True),
        ("asmk", "search", True, False, 0.0, 3.0, 1, 1, True),
        ("vlad", "aggregation", True, False, 0.0, 3.0, 1, 1, False),
        ("vlad", "search", True, False, 0.0, 3.0, 2, 1, False),
    ]
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("seed,regional", [(0, False), (1, True), (2, True)])
def test_search_equals_brute_force(cfg, seed, regional):
    rng = np.random.default_rng(seed)
    k, d = (32, 8) if cfg["kernel"] == "vlad" else (int(rng.choice([16, 128])), int(rng.choice([8, 16, 128])))
    cents = _unit(rng, k, d)
    images, query = _images(rng, cents, 40, regional)
    db = Database.create(None, d2r.Codebook(cents), **cfg)
    half = len(images) // 2
    for image_id, x, regions in images[:half]:
        db.add(image_id, x, regions)
    db.add_batch(images[half:], chunk_descriptors=100)
    want = _brute_force(images, query, cents, cfg, idf=db.idf() if cfg["idf"] else None)
    ids, scores = db.search(query, top_k=len(images))
    assert len(ids) == len(images)
    got = dict(zip(ids, scores))
    for image_id in want:
        assert got[image_id] == pytest.approx(want[image_id], abs=1e-5), image_id
    assert np.all(np.diff(scores) <= 0)
    # top-k is the head of the full ranking, up to ties
    top = db.search(query, top_k=7)
    assert len(top) == 7
    np.testing.assert_allclose(top.scores, np.sort(list(want.values()))[::-1][:7], atol=1e-5)


def test_idf_values():
    rng = np.random.default_rng(0)
    cents = _unit(rng, 8, 4)
    db = Database.create(None, d2r.Codebook(cents), kernel="asmk", idf=True)
    for i in range(10):
        db.add(i, _unit(rng, 30, 4))
    agg = Aggregator(cents, "asmk")
    df = np.zeros(8)
    rng = np.random.default_rng(0)
    _unit(rng, 8, 4)
    for i in range(10):
        df[agg(_unit(rng, 30, 4)).words] += 1
    np.testing.assert_allclose(db.idf(), np.log(10 / np.maximum(df, 1)))


def _filled(path, rng, cents, n=30, kernel="asmk_star", mode="aggregation"):
    db = Database.create(path, d2r.Codebook(cents), kernel=kernel, mode=mode)
    images = [(f"a/{i}.jpg", _unit(rng, 50, cents.shape[1]), [25, 25] if i % 2 else None) for i in range(n)]
    db.add_batch(images)
    return db, images


@pytest.mark.parametrize("kernel,mode", [("asmk_star", "aggregation"), ("asmk", "search"), ("vlad", "search")])
def test_save_open_identical(tmp_path, kernel, mode):
    rng = np.random.default_rng(4)
    cents = _unit(rng, 64, 16)
    db, images = _filled(tmp_path / "db", rng, cents, kernel=kernel, mode=mode)
    q = _unit(rng, 40, 16)
    before = db.search(q, 10)
    db.save()
    again = Database.open(tmp_path / "db")
    after = again.search(q, 10)
    assert list(after.ids) == list(before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.regions, before.regions)
    assert len(again) == len(images) and list(again) == [i[0] for i in images]
    assert isinstance(again.item_scores(q), np.ndarray)
    # opened arrays are memory-mapped
    assert isinstance(again._segments[0].payload, np.memmap)


def test_add_remove_after_open_and_compaction(tmp_path):
    rng = np.random.default_rng(5)
    cents = _unit(rng, 64, 16)
    db, images = _filled(tmp_path / "db", rng, cents)
    db.save()
    db = Database.open(tmp_path / "db")
    extra = _unit(rng, 50, 16)
    db.add("new", extra)
    db.remove("a/0.jpg")
    assert "a/0.jpg" not in db and "new" in db and len(db) == len(images)
    ids, _ = db.search(extra, top_k=len(db))
    assert ids[0] == "new" and "a/0.jpg" not in set(ids)
    with pytest.raises(KeyError):
        db.remove("a/0.jpg")
    with pytest.raises(ValueError, match="already in the database"):
        db.add("new", extra)
    db.save()
    db = Database.open(tmp_path / "db")
    assert len(db._segments) == 2 and "a/0.jpg" not in db and "new" in db
    before = db.search(extra, top_k=len(db))
    db.compact()
    db.save()
    db = Database.open(tmp_path / "db")
    assert len(db._segments) == 1 and db.info()["counts"]["images_total"] == len(images)
    after = db.search(extra, top_k=len(db))
    assert list(after.ids) == list(before.ids)
    np.testing.assert_allclose(after.scores, before.scores)
    # removed image can be indexed again; unreferenced files are gone
    db.add("a/0.jpg", images[0][1])
    db.save()
    names = {p.name for p in (tmp_path / "db").iterdir()}
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    kept = sorted(n for n in names if n.startswith("manifest-"))
    assert len(kept) == 3 and kept[-1] == f"manifest-{manifest['generation']:08d}.json"
    live = set()
    for name in kept:
        m = json.loads((tmp_path / "db" / name).read_text())
        live |= {s["name"] for s in m["segments"]} | ({m["removed"]["name"]} if m["removed"] else set())
    assert names == {"manifest.json", "codebook.npz", ".lock", *kept, *live}


def test_many_saves_trigger_merge(tmp_path):
    rng = np.random.default_rng(6)
    cents = _unit(rng, 16, 8)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents))
    db.merge_policy = MergePolicy(factor=2, max_segments=3)
    for i in range(8):
        db.add(i, _unit(rng, 20, 8))
        db.save()
    db.close()
    assert len(Database.open(tmp_path / "db")._segments) <= 3
    assert sorted(Database.open(tmp_path / "db")) == list(range(8))


def test_codebook_mismatch_refused(tmp_path):
    rng = np.random.default_rng(7)
    cents = _unit(rng, 16, 8)
    Database.create(tmp_path / "db", d2r.Codebook(cents)).save()
    with pytest.raises(ValueError, match="indexed with codebook"):
        Database.open(tmp_path / "db", codebook=d2r.Codebook(_unit(rng, 16, 8)))
    assert len(Database.open(tmp_path / "db", codebook=d2r.Codebook(cents))) == 0
    with pytest.raises(FileExistsError):
        Database.create(tmp_path / "db", d2r.Codebook(cents))
    with pytest.raises(FileNotFoundError):
        Database.open(tmp_path / "nothing")


def test_bad_queries_and_ids():
    rng = np.random.default_rng(8)
    cents = _unit(rng, 16, 8)
    db = Database.create(None, d2r.Codebook(cents))
    db.add(1, _unit(rng, 10, 8))
    with pytest.raises(ValueError, match="int image ids"):
        db.add("x", _unit(rng, 10, 8))
    with pytest.raises(ValueError, match="expected D=8"):
        db.search(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="query is asmk"):
        db.search(Aggregator(cents, "asmk")(_unit(rng, 10, 8)))
    with pytest.raises(ValueError, match="mode must be"):
        Database.create(None, d2r.Codebook(cents), mode="regional")
    with pytest.raises(ValueError, match="save to"):
        db.save()
    empty = db.search(np.zeros((0, 8), np.float32))
    assert list(empty.ids) == [1] and empty.scores[0] == -1.0
    with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):  # was: an empty ranking
        db.search(_unit(rng, 5, 8), top_k=0)


@pytest.mark.parametrize("option, value", [("normalize", "no"), ("idf", "false"), ("alpha", "3"),
                                           ("num_assignments", 2.7)])
def test_database_create_refuses_wrong_types(option, value):
    """Database.create cast its options: normalize="no" became True, num_assignments=2.7 became 2."""
    book = d2r.Codebook(np.eye(8, dtype=np.float32))
    with pytest.raises(ValueError, match=option):
        d2r.Database.create(None, book, **{option: value})
    db = d2r.Database.create(None, book, alpha=np.float32(2), normalize=np.True_, num_assignments=np.int64(2))
    assert (db.config.alpha, db.config.normalize, db.config.num_assignments) == (2.0, True, 2)
    assert type(db.config.normalize) is bool


@pytest.mark.parametrize("top_k", [-1, 0, 2.5, True, None, "3"])
def test_database_search_refuses_bad_top_k(tmp_path, top_k):
    """`Database.search(top_k=-1)` silently returned nothing and `top_k=2.5` became 2."""
    photos = write_photos(tmp_path / "photos", ["p0", "p1", "p2"], 9)
    engine = Engine.create(tmp_path / "eng", {"features": {"name": "rootsift"}}, codebook=CODEBOOK)
    engine.index(photos, progress=False)
    query = np.random.default_rng(0).random((40, 128), np.float32)
    db = engine.database
    assert len(db.search(query, top_k=np.int64(2)).ids) == 2 and len(db.search_batch([query], 5)[0].ids) == 3
    for call in (lambda: db.search(query, top_k=top_k), lambda: db.search_batch([query, query], top_k=top_k)):
        with pytest.raises(ValueError, match=r"^top_k must be a positive integer, got "):
            call()


def test_batch_search_matches_single():
    rng = np.random.default_rng(9)
    cents = _unit(rng, 32, 16)
    db = Database.create(None, d2r.Codebook(cents), mode="search")
    for i in range(30):
        db.add(i, _unit(rng, 40, 16), [20, 20])
    queries = [_unit(rng, 30, 16) for _ in range(5)]
    for single, batch in zip([db.search(q, 5) for q in queries], db.search_batch(queries, 5, workers=2)):
        np.testing.assert_array_equal(single.ids, batch.ids)
        np.testing.assert_array_equal(single.scores, batch.scores)


WRITER = """
import sys, numpy as np, d2r
from d2r.index import Database
path, marker = sys.argv[1], sys.argv[2]
db = Database.open(path)
rng = np.random.default_rng(int(sys.argv[3]))
db.add_batch((f"w{sys.argv[3]}-{i}", rng.standard_normal((200, 32)).astype(np.float32), None) for i in range(300))
open(marker, "w").write("saving")
db.save()
open(marker, "w").write("saved")
"""


def test_killed_writer_leaves_previous_state(tmp_path):
    rng = np.random.default_rng(10)
    cents = _unit(rng, 256, 32)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents))
    for i in range(20):
        db.add(f"base{i}", _unit(rng, 30, 32))
    db.save()
    q = _unit(rng, 30, 32)
    reference = db.search(q, 10)
    db.close()  # the writer processes below take the lock
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    outcomes = set()
    for attempt, delay in enumerate([0.0, 0.003, 0.02]):
        marker = tmp_path / f"marker{attempt}"
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "db"), str(marker), str(attempt)],
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.add(marker.read_text() if marker.exists() else "none")
        reopened = Database.open(tmp_path / "db")  # must open: the manifest is the commit point
        assert (len(reopened) - 20) % 300 == 0  # every writer's images are all there or none are
        got = reopened.search(q, 10)
        base = [i for i in got.ids if str(i).startswith("base")]
        assert base == [i for i in reference.ids if i in set(base)]
    assert "saving" in outcomes  # at least one kill landed during save


def test_add_aggregated_equals_add():
    rng = np.random.default_rng(11)
    cents = _unit(rng, 32, 16)
    agg = Aggregator(cents, "asmk_star")
    a = Database.create(None, d2r.Codebook(cents), mode="search")
    b = Database.create(None, d2r.Codebook(cents), mode="search")
    for i in range(10):
        x = _unit(rng, 40, 16)
        a.add(i, x, [10, 30])
        b.add_aggregated(i, agg.per_region(x, [10, 30]))
    q = _unit(rng, 30, 16)
    np.testing.assert_array_equal(a.search(q, 10).scores, b.search(q, 10).scores)
    with pytest.raises(ValueError, match="query is asmk"):
        b.add_aggregated(99, Aggregator(cents, "asmk")(q))


def test_alternating_add_and_search_keeps_segments_bounded():
    rng = np.random.default_rng(12)
    cents = _unit(rng, 32, 16)
    db = Database.create(None, d2r.Codebook(cents), mode="search")
    db.merge_policy = MergePolicy(factor=4, max_segments=4)
    images = []
    q0 = _unit(rng, 20, 16)
    for i in range(30):
        x = _unit(rng, 20 if i % 3 else 0, 16)
        images.append((i, x))
        db.add(i, x, [10, 10] if i % 3 else [])  # some images have no regions at all
        if i == 7:
            db.remove(3)
        db.search(q0, 3)  # each search turns the new image into a segment
        assert len(db._segments) <= 5
    assert len(db) == 29 and 3 not in db and sorted(db) == [i for i in range(30) if i != 3]
    q = _unit(rng, 20, 16)
    agg = Aggregator(cents, "asmk_star")
    want = {i: max([similarity(agg(q), r) for r in agg.per_region(x, [10, 10])] if i % 3 else [-1.0])
            for i, x in images if i != 3}
    got = dict(zip(*db.search(q, 100)))
    assert got.keys() == want.keys()
    for i in want:
        assert got[i] == pytest.approx(want[i], abs=1e-6)


def test_second_writer_is_refused_not_lost(tmp_path):
    rng = np.random.default_rng(13)
    cents = _unit(rng, 16, 8)
    Database.create(tmp_path / "db", d2r.Codebook(cents)).save()
    a, b = Database.open(tmp_path / "db", writable=True), Database.open(tmp_path / "db")
    with pytest.raises(LockedError, match="another writer"):
        Database.open(tmp_path / "db", writable=True)  # refused up front
    a.add("x", _unit(rng, 10, 8))
    a.save()
    with pytest.raises(LockedError, match="another writer"):
        b.add("y", _unit(rng, 10, 8))  # refused before any work while a holds the lock
    a.close()
    with pytest.raises(ValueError, match="another writer"):
        b.add("y", _unit(rng, 10, 8))  # a committed since b opened: b must reopen
    assert list(Database.open(tmp_path / "db")) == ["x"]


def test_similarity_with_all_zero_idf_matches_the_database():
    rng = np.random.default_rng(14)
    cents = _unit(rng, 16, 8)
    db = Database.create(None, d2r.Codebook(cents), kernel="asmk", idf=True)
    x = _unit(rng, 30, 8)
    db.add(0, x)  # one image: every idf is log(1/1) = 0
    agg = Aggregator(cents, "asmk")
    assert similarity(agg(x), agg(x), idf=db.idf()) == db.search(x).scores[0] == 0.0


def test_database_equal_scores_in_insertion_order(tmp_path, rng):
    """Equal scores rank in insertion order (not by id), at the top-k cut too."""
    book = d2r.Codebook(rng.standard_normal((8, 4)).astype(np.float32))
    db = Database.create(tmp_path / "db", book, kernel="asmk_star")
    x = rng.standard_normal((20, 4)).astype(np.float32)
    names = [f"img{i}" for i in (9, 3, 7, 1, 5, 0, 8, 2, 6, 4)]  # not sorted: insertion order is the order
    for name in names:
        db.add(name, x)
    ranking = db.search(x, top_k=4)
    assert list(ranking.ids) == names[:4]
    assert len(set(np.round(ranking.scores, 9))) == 1
