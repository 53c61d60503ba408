"""Index storage: streaming merges equal brute force, many saves equal one batch, bounded merge memory, write
amplification, writer lock across processes, readers during writes, and a corruption corpus for every file kind."""

import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r._lock import LockedError
from d2r.aggregate import Aggregator, similarity
from d2r.cli import main as cli_main
from d2r.index import DamagedError, Database, MergePolicy
from d2r.index import manifest as manifest_mod
from d2r.index.manifest import check_database as check
from d2r.index.merge import merge
from d2r.index.segment import PAYLOAD, Segment
from d2r.kernels.merge import merge_postings

ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _desc(image_id: int, d=16):
    """Descriptors determined by the (int) id, so another process can recompute them."""
    rng = np.random.default_rng(1000 + int(image_id))
    return _unit(rng, int(rng.integers(0, 40)), d)


# ---- the merge kernel against numpy ------------------------------------------------------------------------------
def _postings(s):
    """(word, full item id) of every posting entry of a segment, from its blocked CSR (any format)."""
    blocks = s.blocks
    run = np.repeat(np.arange(s.offsets.shape[0] - 1), np.diff(s.offsets))
    return run // blocks, (run % blocks) * 65536 + np.asarray(s.items, np.int64)


def _blocked(words, items, K, M):
    """Blocked CSR (offsets (K·blocks+1,), uint16 ids) of postings sorted by word then item."""
    blocks = max(1, -(-M // 65536))
    runs = np.asarray(words, np.int64) * blocks + np.asarray(items, np.int64) // 65536
    offsets = np.concatenate([[0], np.cumsum(np.bincount(runs, minlength=K * blocks))])
    return offsets, (np.asarray(items, np.int64) % 65536).astype(np.uint16)


def _numpy_merge(segments, removed, K):
    """Slow obvious merge: every live posting as (word, new item, payload row), stably sorted by word."""
    words, items, payload, next_item = [], [], [], 0
    for s, rem in zip(segments, removed):
        live_item = ~rem[np.asarray(s.item_image)]
        new = np.full(s.num_items, -1)
        new[live_item] = next_item + np.arange(live_item.sum())
        next_item += live_item.sum()
        w, full = _postings(s)
        keep = live_item[full]
        words.append(w[keep])
        items.append(new[full[keep]])
        payload.append(s.payload[keep])
    words = np.concatenate(words)
    order = np.argsort(words, kind="stable")
    offsets, ids = _blocked(words[order], np.concatenate(items)[order], K, int(next_item))
    return offsets, ids, np.concatenate(payload)[order]


def _random_segments(rng, K, D, count, kernel="asmk_star", mode="search"):
    segments, removed = [], []
    for _ in range(count):
        n_img = int(rng.integers(0, 12))
        per = rng.integers(0, 3, n_img) if mode == "search" else np.ones(n_img, int)
        item_image = np.repeat(np.arange(n_img), per).astype(np.int32)
        records = []
        for _ in item_image:
            w = np.sort(rng.choice(K, int(rng.integers(0, min(K, 8))), replace=False)).astype(np.uint32)
            if kernel == "asmk_star":
                records.append(d2r.Aggregated(kernel, D, K, words=w, bits=rng.integers(0, 256, (len(w), (D + 7) // 8),
                                                                                      dtype=np.uint8)))
            else:
                records.append(d2r.Aggregated(kernel, D, K, words=w, descriptors=_unit(rng, len(w), D)))
        ids = [f"s{len(segments)}-{i}" for i in range(n_img)]
        seg = Segment.build(kernel, K, D, ids, item_image, np.zeros(len(item_image), np.int32), records)
        segments.append(seg)
        removed.append(rng.random(n_img) < 0.3)
    return segments, removed


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kernel", ["asmk_star", "asmk"])
def test_streaming_merge_equals_numpy(tmp_path, seed, kernel):
    rng = np.random.default_rng(seed)
    K, D = int(rng.choice([5, 64])), int(rng.choice([8, 24]))
    segments, removed = _random_segments(rng, K, D, int(rng.integers(1, 14)), kernel)
    want = _numpy_merge(segments, removed, K)
    for chunk in (1, 7, 1000):
        stats = {}
        got = merge(segments, removed, kernel, K, D, "search", chunk, stats=stats)
        np.testing.assert_array_equal(got.offsets, want[0])
        np.testing.assert_array_equal(got.items, want[1])
        np.testing.assert_array_equal(got.payload, want[2])
        assert list(got.image_ids) == [i for s, r in zip(segments, removed) for i, x in zip(s.image_ids, r) if not x]
    # the same merge from files, written in chunks, memory-mapped back
    for i, s in enumerate(segments):
        s.write(tmp_path, f"seg-{i:04d}", kernel)
    got = merge(segments, removed, kernel, K, D, "search", 5, root=tmp_path, name="seg-ffff")
    np.testing.assert_array_equal(got.items, want[1])
    np.testing.assert_array_equal(got.payload, want[2])
    assert isinstance(got.items, np.memmap)


def test_merge_kernel_drops_removed_and_keeps_word_order():
    items = np.array([0, 1, 0, 2, 1], np.uint32)
    payload = np.arange(10, dtype=np.uint8).reshape(5, 2)
    seg_off = np.array([0, 2, 2, 2, 3, 5], np.int64)  # seg 0: word 0 {0, 1}; seg 1: word 0 {0}, word 1 {2, 1}
    item_map = np.array([0, -1, 1, 2, -1], np.int64)  # seg0 items 0,1; seg1 items 0,1,2 (base 2)
    out_i, out_p, counts = np.empty(5, np.uint16), np.empty((5, 2), np.uint8), np.zeros(2, np.int64)
    n = merge_postings(seg_off, np.array([0, 3]), np.array([1, 1]), items, payload, item_map,
                       np.array([0, 2]), out_i, out_p, counts, 1)
    assert n == 3 and list(out_i[:n]) == [0, 1, 2] and list(counts) == [2, 1]
    np.testing.assert_array_equal(out_p[:n], payload[[0, 2, 4]])


@pytest.mark.parametrize("seed", range(3))
def test_merge_kernel_blocks_equal_numpy(seed):
    """Segments of several item blocks (and one of the previous format's uint32 ids) merge into blocks."""
    rng = np.random.default_rng(seed)
    K, B = 3, 2
    sizes = [70_000, 1_000, 140_000]
    segs, item_map, next_item = [], [], 0
    for j, m in enumerate(sizes):
        per = [np.sort(rng.choice(m, int(rng.integers(0, min(m, 3000))), replace=False)) for _ in range(K)]
        words = np.repeat(np.arange(K), [len(p) for p in per])
        full = np.concatenate(per)
        old = j == 1  # format version 2: one block of uint32 ids
        off, ids = _blocked(words, full, K, m) if not old else (
            np.concatenate([[0], np.cumsum([len(p) for p in per])]), full.astype(np.uint32))
        live = rng.random(m) < 0.8
        new = np.full(m, -1)
        new[live] = next_item + np.arange(live.sum())
        next_item += int(live.sum())
        item_map.append(new)
        segs.append((off, ids, full, words, 1 if old else max(1, -(-m // 65536))))
    ids_all = np.concatenate([s[1].astype(np.uint32) for s in segs])
    payload = rng.integers(0, 256, (ids_all.shape[0], B), dtype=np.uint8)
    seg_off, seg_start, base, start = [], [], 0, 0
    for off, ids, *_ in segs:
        seg_off.append(off + base)
        seg_start.append(start)
        start += off.shape[0]
        base += ids.shape[0]
    item_map = np.concatenate(item_map)
    item_base = np.cumsum([0] + sizes[:-1])
    out_blocks = max(1, -(-next_item // 65536))
    e = ids_all.shape[0]
    out_i, out_p = np.empty(e, np.uint16), np.empty((e, B), np.uint8)
    counts = np.zeros(K * out_blocks, np.int64)
    n = merge_postings(np.concatenate(seg_off), np.array(seg_start), np.array([s[4] for s in segs]), ids_all,
                       payload, item_map, item_base, out_i, out_p, counts, out_blocks)
    # numpy: every live posting (word, new id, payload), stably sorted by word
    words = np.concatenate([s[3] for s in segs])
    new_ids = item_map[np.concatenate([s[2] + b for s, b in zip(segs, item_base)])]
    keep = new_ids >= 0
    order = np.argsort(words[keep], kind="stable")
    want_off, want_ids = _blocked(words[keep][order], new_ids[keep][order], K, next_item)
    assert n == int(keep.sum()) and out_blocks > 1
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(counts)]), want_off)
    np.testing.assert_array_equal(out_i[:n], want_ids)
    np.testing.assert_array_equal(out_p[:n], payload[keep][order])


# ---- many saves equal one batch ------------------------------------------------------------------------------------
def _reference(cents, cfg, live):
    ref = Database.create(None, d2r.Codebook(cents), **cfg)
    for image_id, x, regions in live:
        ref.add(image_id, x, regions)
    return ref


@pytest.mark.parametrize("seed,cfg", [
    (0, dict(kernel="asmk_star")),
    (1, dict(kernel="asmk_star", mode="search", idf=True)),
    (2, dict(kernel="asmk", normalize=False)),
    (3, dict(kernel="asmk_star", idf=True, normalize=False)),
])
def test_random_saves_equal_single_batch(tmp_path, seed, cfg):
    rng = np.random.default_rng(seed)
    D = 16
    cents = _unit(rng, 48, D)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents), **cfg)
    db.merge_policy = MergePolicy(factor=3, floor_bytes=256, max_segments=12, chunk_entries=17, spill_bytes=3000)
    live: dict = {}
    next_id = 0
    queries = [_unit(rng, 25, D) for _ in range(2)]
    saves = 0
    while saves < 100:
        r = rng.random()
        if r < 0.55 or not live:
            x = _unit(rng, int(rng.choice([0, 3, 20, 40])), D)
            regions = None
            if cfg.get("mode") == "search" and len(x) and rng.random() < 0.5:
                regions = [len(x) // 2, len(x) - len(x) // 2]
            db.add(next_id, x, regions)
            live[next_id] = (next_id, x, regions)
            next_id += 1
        elif r < 0.7:
            victim = list(live)[int(rng.integers(len(live)))]
            db.remove(victim)
            del live[victim]
            if rng.random() < 0.3:  # add it back: it goes to the end
                db.add(victim, live_x := _unit(rng, 10, D))
                live[victim] = (victim, live_x, None)
        else:
            if rng.random() < 0.05:
                db.compact()
            db.save()
            saves += 1
            if saves % 25 == 0:
                db.close()
                db = Database.open(tmp_path / "db")
                db.merge_policy = MergePolicy(factor=3, floor_bytes=256, max_segments=12, chunk_entries=17,
                                              spill_bytes=3000)
                ref = _reference(cents, cfg, list(live.values()))
                assert list(db.ids()) == list(ref.ids()) == list(live)
                for q in queries:
                    a, b = db.search(q, top_k=len(live)), ref.search(q, top_k=len(live))
                    assert list(a.ids) == list(b.ids)
                    np.testing.assert_allclose(a.scores, b.scores, atol=1e-9, rtol=0)
                    np.testing.assert_array_equal(a.regions, b.regions)
                    one = db.item_scores(q, _threads=1)  # item ranges on threads: bit-identical sums
                    for threads in (2, 3):
                        np.testing.assert_array_equal(db.item_scores(q, _threads=threads), one)
                if cfg.get("idf"):
                    np.testing.assert_array_equal(db.statistics()["df"], ref.statistics()["df"])
    assert len(db._segments) <= 12
    db.close()


def test_statistics_and_shared_idf():
    rng = np.random.default_rng(3)
    cents = _unit(rng, 32, 16)
    a = Database.create(None, d2r.Codebook(cents), kernel="asmk", idf=True)
    b = Database.create(None, d2r.Codebook(cents), kernel="asmk", idf=True)
    whole = Database.create(None, d2r.Codebook(cents), kernel="asmk", idf=True)
    for i in range(30):
        x = _unit(rng, 25, 16)
        (a if i % 2 else b).add(i, x)
        whole.add(i, x)
    a.remove(5)
    whole.remove(5)
    sa, sb, sw = a.statistics(), b.statistics(), whole.statistics()
    np.testing.assert_array_equal(sa["df"] + sb["df"], sw["df"])
    assert sa["items"] + sb["items"] == sw["items"] == 29 and sa["images"] == 14
    idf = np.log(sw["items"] / np.maximum(sw["df"], 1))
    np.testing.assert_allclose(idf, whole.idf())
    q = _unit(rng, 20, 16)
    merged = {**dict(zip(*a.search(q, 100, idf=idf))), **dict(zip(*b.search(q, 100, idf=idf)))}
    full = dict(zip(*whole.search(q, 100)))
    assert merged.keys() == full.keys()
    for k in full:
        assert merged[k] == pytest.approx(full[k], abs=1e-12)
    plain = Database.create(None, d2r.Codebook(cents))
    plain.add(0, q)
    with pytest.raises(ValueError, match="idf"):
        plain.search(q, idf=idf)
    with pytest.raises(ValueError, match="idf"):
        a.search(q, idf=idf[:3])


def test_ties_rank_by_insertion_across_merges(tmp_path):
    rng = np.random.default_rng(4)
    cents = _unit(rng, 16, 8)
    x = _unit(rng, 20, 8)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents))
    db.merge_policy = MergePolicy(factor=2, floor_bytes=1)
    for i in range(20):
        db.add(f"i{i:02d}", x)  # identical images: all scores tie
        db.save()
    assert list(db.search(x, 7).ids) == [f"i{i:02d}" for i in range(7)]


# ---- more than 65,536 items: blocked posting ids, and the previous format ----------------------------------
def _tiny(rng, K, D, kernel="asmk_star", words=(1, 4)):
    """A random aggregated record of a few words (cheap: many thousands of items per test)."""
    w = np.sort(rng.choice(K, int(rng.integers(*words)), replace=False)).astype(np.uint32)
    if kernel == "asmk_star":
        return d2r.Aggregated(kernel, D, K, words=w, bits=rng.integers(0, 256, (len(w), (D + 7) // 8),
                                                                        dtype=np.uint8))
    return d2r.Aggregated(kernel, D, K, words=w, descriptors=_unit(rng, len(w), D))


def _same_search(db, ref, queries, exact=False):
    for q in queries:
        a, b = db.search(q, top_k=len(ref)), ref.search(q, top_k=len(ref))
        assert list(a.ids) == list(b.ids)
        if exact:
            np.testing.assert_array_equal(a.scores, b.scores)
        else:
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-9, rtol=0)
        np.testing.assert_array_equal(a.regions, b.regions)
        one = db.item_scores(q, _threads=1)  # item ranges cross block boundaries: bit-identical sums
        for threads in (2, 3):
            np.testing.assert_array_equal(db.item_scores(q, _threads=threads), one)


@pytest.mark.slow
@pytest.mark.parametrize("seed,cfg", [(0, dict(mode="search", idf=True)), (1, dict(normalize=False))])
def test_random_saves_past_65536_items_equal_single_batch(tmp_path, seed, cfg):
    rng = np.random.default_rng(40 + seed)
    K, D = 24, 16
    cents = _unit(rng, K, D)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents), **cfg)
    policy = MergePolicy(factor=3, floor_bytes=4096, max_segments=12, chunk_entries=5000, spill_bytes=400_000)
    db.merge_policy = policy
    live: dict = {}
    next_id = 0
    queries = [_tiny(rng, K, D, words=(4, 12)) for _ in range(2)]
    for save in range(30):
        for _ in range(int(rng.integers(1000, 5500))):
            recs = [_tiny(rng, K, D) for _ in range(int(rng.integers(1, 3)) if cfg.get("mode") else 1)]
            db.add_aggregated(next_id, recs)
            live[next_id] = recs
            next_id += 1
        for victim in rng.choice(list(live), int(rng.integers(0, 400)), replace=False).tolist():
            db.remove(victim)
            del live[victim]
        if rng.random() < 0.1:
            db.compact()
        db.save()
        if save in (9, 29):
            db.close()
            db = Database.open(tmp_path / "db")
            db.merge_policy = policy
            ref = Database.create(None, d2r.Codebook(cents), **cfg)
            for image_id, recs in live.items():
                ref.add_aggregated(image_id, recs)
            assert list(db.ids()) == list(ref.ids()) == list(live)
            _same_search(db, ref, queries)
            if cfg.get("idf"):
                np.testing.assert_array_equal(db.statistics()["df"], ref.statistics()["df"])
    assert max(s.num_items for s in db._segments) > 65536 and max(s.blocks for s in db._segments) > 1
    assert check(tmp_path / "db") == []
    db.close()


def _to_format_2(root: Path) -> None:
    """Rewrite a database in the previous format: posting ids uint32 full ids, (K+1,) word offsets."""
    from d2r import _io

    manifest = json.loads((root / "manifest.json").read_text())
    for rec in manifest["segments"]:
        d = root / rec["name"]
        off, items = np.load(d / "offsets.npy"), np.load(d / "items.npy")
        blocks = max(1, -(-rec["items"] // 65536))
        run = np.repeat(np.arange(off.shape[0] - 1), np.diff(off))
        np.save(d / "items.npy", ((run % blocks) * 65536 + items).astype(np.uint32))
        np.save(d / "offsets.npy", off[::blocks])
        for f in ("items.npy", "offsets.npy"):
            rec["files"][f] = {"size": (d / f).stat().st_size, "blake2b": _io.file_digest(d / f)}
    manifest["format_version"] = 2
    for name in ("manifest.json", f"manifest-{manifest['generation']:08d}.json"):
        (root / name).write_text(json.dumps(manifest))


@pytest.mark.parametrize("kernel", ["asmk_star", "asmk"])
def test_previous_format_opens_searches_identically_and_merges_into_blocks(tmp_path, kernel):
    rng = np.random.default_rng(50)
    K, D = 16, 8
    cents = _unit(rng, K, D)
    root = tmp_path / "db"
    db = Database.create(root, d2r.Codebook(cents), kernel=kernel, mode="search", idf=True)
    db.merge_policy = MergePolicy(factor=50, max_segments=50)  # two segments: 70,000 + 300 items
    for n in (70_000, 300):
        for _ in range(n):
            db.add_aggregated(len(db), _tiny(rng, K, D, kernel))
        db.save()
    db.remove(5)
    db.save()
    db.close()
    queries = [_tiny(rng, K, D, kernel, words=(4, 9)) for _ in range(2)]
    new = Database.open(root)
    assert [s.blocks for s in new._segments] == [2, 1] and new._segments[0].items.dtype == np.uint16
    want = [(new.search(q, 100), new.item_scores(q)) for q in queries]
    df = new.statistics()["df"]
    _to_format_2(root)
    assert check(root) == []
    old = Database.open(root)
    layout = [(s.blocks, s.items.dtype, s.offsets.shape) for s in old._segments]
    assert layout == [(1, np.uint32, (K + 1,))] * 2
    for q, (ranking, items) in zip(queries, want):
        got = old.search(q, 100)
        assert list(got.ids) == list(ranking.ids)
        np.testing.assert_array_equal(got.scores, ranking.scores)
        np.testing.assert_array_equal(old.item_scores(q), items)
        for threads in (2, 3):
            np.testing.assert_array_equal(old.item_scores(q, _threads=threads), items)
    np.testing.assert_array_equal(old.statistics()["df"], df)
    old.compact()  # the merge reads the previous format and writes the blocked one
    old.save()
    old.close()
    assert json.loads((root / "manifest.json").read_text())["format_version"] == manifest_mod.FORMAT_VERSION == 3
    merged = Database.open(root)
    (seg,) = merged._segments
    assert seg.items.dtype == np.uint16 and seg.blocks == 2 and seg.offsets.shape == (2 * K + 1,)
    for q, (ranking, items) in zip(queries, want):
        got = merged.search(q, 100)
        assert list(got.ids) == list(ranking.ids)
        np.testing.assert_allclose(got.scores, ranking.scores, atol=1e-12, rtol=0)
    assert check(root) == []


# ---- memory and write amplification --------------------------------------------------------------------------------
def test_merge_memory_is_bounded_by_the_chunk(tmp_path):
    rng = np.random.default_rng(5)
    K, D = 1024, 128
    cents = _unit(rng, K, D)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents))
    db.merge_policy = MergePolicy(factor=100, max_segments=100, chunk_entries=1000)  # no merges until compact
    for s in range(30):
        for i in range(50):
            w = np.sort(rng.choice(K, 120, replace=False)).astype(np.uint32)
            bits = rng.integers(0, 256, (120, D // 8), dtype=np.uint8)
            db.add_aggregated(f"{s}-{i}", d2r.Aggregated("asmk_star", D, K, words=w, bits=bits))
        db.save()
    postings = sum(seg.items.nbytes + seg.payload.nbytes for seg in db._segments)
    assert len(db._segments) == 30 and postings > 2_000_000
    # load the merge kernel first (numba's one-time imports and cache loading are not merge memory)
    merge_postings(np.zeros(2, np.int64), np.zeros(1, np.int64), np.ones(1, np.int64), np.zeros(0, np.uint16),
                   np.zeros((0, D // 8), np.uint8), np.zeros(0, np.int64), np.zeros(1, np.int64),
                   np.zeros(0, np.uint16), np.zeros((0, D // 8), np.uint8), np.zeros(1, np.int64), 1)
    tracemalloc.start()
    tracemalloc.reset_peak()
    db.compact()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert db.merge_stats["max_chunk_entries"] <= 1000
    assert peak < postings / 5, (peak, postings)
    db.save()
    assert len(db._segments) == 1 and len(db) == 1500


def test_write_amplification_grows_logarithmically(tmp_path):
    rng = np.random.default_rng(6)
    cents = _unit(rng, 64, 16)
    agg = Aggregator(cents, "asmk_star")
    db = Database.create(tmp_path / "db", d2r.Codebook(cents))
    db.merge_policy = MergePolicy(factor=4, floor_bytes=1000)
    saves = 128
    for s in range(saves):
        for i in range(4):
            db.add_aggregated(s * 4 + i, agg(_unit(rng, 30, 16)))
        db.save()
    final = sum(seg.nbytes() for seg in db._segments)
    wa = db.merge_stats["bytes_written"] / final
    assert wa <= np.log(saves) / np.log(4) + 2, wa  # each posting rewritten once per tier
    assert len(db._segments) <= 3 * 5  # at most factor - 1 per tier


# ---- processes ---------------------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from d2r.index import Database
db = Database.open(sys.argv[1], writable=True)
open(sys.argv[2], "w").write("locked")
time.sleep(float(sys.argv[3]))
"""


def test_second_writer_refused_up_front_or_waits(tmp_path):
    cents = _unit(np.random.default_rng(7), 16, 8)
    Database.create(tmp_path / "db", d2r.Codebook(cents)).close()
    (tmp_path / "holder.py").write_text(HOLDER)
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(tmp_path / "db"), str(marker), "3"],
                            env=ENV)
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(LockedError, match=r"another writer \(pid \d+\) is using this index"):
            Database.open(tmp_path / "db", writable=True)
        reader = Database.open(tmp_path / "db")  # readers never wait
        assert len(reader) == 0
        with pytest.raises(LockedError):
            reader.add(1, _unit(np.random.default_rng(0), 5, 8))
        t0 = time.time()
        db = Database.open(tmp_path / "db", writable=True, lock_timeout=60)  # waits for the holder to exit
        assert time.time() - t0 > 0.5
        db.add(1, _unit(np.random.default_rng(0), 5, 8))
        db.save()
        db.close()
    finally:
        proc.kill()
        proc.wait()
    code = cli_main(["index", "check", str(tmp_path / "db")])
    assert code == 0


WRITER = """
import json, sys, numpy as np
from d2r.index import Database, MergePolicy
sys.path.insert(0, sys.argv[3])
from test_index_storage import _desc
path, log = sys.argv[1], sys.argv[2]
db = Database.open(path, writable=True)
db.merge_policy = MergePolicy(factor=3, floor_bytes=512, chunk_entries=50)
rng = np.random.default_rng(0)
nid = 0
for round in range(40):
    for _ in range(4):
        db.add(nid, _desc(nid))
        nid += 1
    if round % 3 == 2:
        ids = list(db.ids())
        for victim in rng.choice(ids, 2, replace=False):
            db.remove(int(victim))
    if round % 10 == 9:
        db.compact()
    db.save()
    with open(log, "a") as f:
        f.write(json.dumps({"generation": db.generation, "ids": [int(i) for i in db.ids()]}) + "\\n")
"""


def test_reader_sees_consistent_generations_while_writer_saves(tmp_path):
    cents = _unit(np.random.default_rng(8), 32, 16)
    Database.create(tmp_path / "db", d2r.Codebook(cents)).close()
    (tmp_path / "writer.py").write_text(WRITER)
    log = tmp_path / "log.jsonl"
    log.touch()
    proc = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(tmp_path / "db"), str(log),
                             str(Path(__file__).parent)], env=ENV)
    agg = Aggregator(cents, "asmk_star")
    q = _unit(np.random.default_rng(9), 30, 16)
    seen = {}
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            db = Database.open(tmp_path / "db")
            ranking = db.search(q, top_k=10)
            seen[db.generation] = (list(db.ids()), list(ranking.ids), list(ranking.scores))
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    logged = {g["generation"]: g["ids"] for g in map(json.loads, log.read_text().splitlines())}
    checked = 0
    for generation, (ids, top, scores) in seen.items():
        if generation not in logged:
            continue  # the empty first generation
        assert ids == logged[generation]
        want = {i: similarity(agg(q), agg(_desc(i))) for i in ids}
        assert top == sorted(ids, key=lambda i: (-want[i], ids.index(i)))[:10]
        np.testing.assert_allclose(scores, [want[i] for i in top], atol=1e-9)
        checked += 1
    assert checked >= 3, seen.keys()
    assert check(tmp_path / "db") == []


# ---- corruption corpus -------------------------------------------------------------------------------------------
def _damage(path: Path, how: str):
    data = path.read_bytes() if path.exists() else b""
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        b = bytearray(data)
        for i in range(len(b) - 1, max(len(b) - 4, 0), -1):
            b[i] ^= 0xFF
        path.write_bytes(bytes(b))
    elif how == "missing":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 7)
    else:
        a = np.load(path, allow_pickle=False)
        if how == "dtype":
            a = a.astype("S") if a.dtype.kind == "U" else a.astype(np.int64 if a.dtype != np.int64 else np.int32)
        elif how == "shape":
            a = np.concatenate([a, a[:1]]) if a.shape[0] else np.zeros((1,) + a.shape[1:], a.dtype)
        elif how == "order":  # two postings of one word swapped: ids in range, but the list out of order
            off = np.load(path.with_name("offsets.npy"))
            w = int(np.flatnonzero(np.diff(off) >= 2)[0])
            a = a.copy()
            a[off[w]], a[off[w] + 1] = a[off[w] + 1], a[off[w]]
        elif how == "range":
            a = a.copy()
            a[-1] = np.iinfo(a.dtype).max if path.name != "offsets.npy" else a[-1] + 5
            if path.name == "offsets.npy":
                a[3] = -1
        np.save(path, a)


SEGMENT_FILES = ["image_ids.npy", "item_image.npy", "item_region.npy", "item_words.npy", "offsets.npy",
                 "items.npy", "bits.npy"]
CORPUS = ([(f, how) for f in SEGMENT_FILES for how in ("truncate", "flip", "dtype", "shape", "missing")]
          + [(f, "range") for f in ("items.npy", "offsets.npy", "item_image.npy")] + [("items.npy", "order")]
          + [("removed", how) for how in ("truncate", "flip", "dtype", "shape", "missing")]
          + [("codebook.npz", how) for how in ("truncate", "flip", "missing", "garbage")]
          + [("manifest.json", how) for how in ("truncate", "missing", "garbage")])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One healthy database (2 segments + removal table) and a damaged copy of it per corpus case."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(10)
    cents = _unit(rng, 32, 16)
    db = Database.create(root / "healthy", d2r.Codebook(cents), mode="search")
    for s in range(2):
        for i in range(12):
            db.add(f"{s}-{i}", _unit(rng, 30, 16), [15, 15] if i % 2 else None)
        db.save()
    db.remove("0-3")
    db.save()
    db.close()
    manifest = json.loads((root / "healthy" / "manifest.json").read_text())
    seg = manifest["segments"][-1]["name"]
    cases = {}
    for fname, how in CORPUS:
        target = root / f"{fname}-{how}"
        shutil.copytree(root / "healthy", target)
        rel = {"removed": manifest["removed"]["name"], "codebook.npz": fname, "manifest.json": fname}.get(
            fname, f"{seg}/{fname}")
        _damage(target / rel, how)
        cases[(fname, how)] = (target, rel)
    return root, cases


@pytest.mark.parametrize("fname,how", CORPUS, ids=[f"{f}-{h}" for f, h in CORPUS])
def test_corruption_is_named(corpus, fname, how, capsys):
    root, cases = corpus
    path, rel = cases[(fname, how)]
    assert [d["file"] for d in check(path)] == [rel]
    assert check(root / "healthy") == []
    try:
        Database.open(path).search(_unit(np.random.default_rng(0), 20, 16), 5)
        assert how == "flip" and fname in ("bits.npy", "removed", "item_region.npy", "image_ids.npy"), \
            "structural damage went unnoticed"
    except DamagedError as exc:
        assert rel in str(exc).replace(os.sep, "/") and "\n" not in str(exc)
    except (FileNotFoundError, ValueError) as exc:
        assert fname == "manifest.json" and "manifest.json" in str(exc)
    capsys.readouterr()
    assert cli_main(["index", "check", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [d["file"] for d in out["damaged"]] == [rel] and out["healthy"] is False
    assert cli_main(["index", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert rel in err and "Traceback" not in err


def _damage_blocks(d: Path, how: str, K: int):
    """Damage the posting files of a segment of 2 item blocks (ids of the last block: [0, M − 65536))."""
    off, items = np.load(d / "offsets.npy"), np.load(d / "items.npy")
    m = np.load(d / "item_image.npy").shape[0]
    runs = [r for r in range(off.shape[0] - 1) if off[r + 1] - off[r] >= 2]
    last = [r for r in runs if r % 2 == 1]
    if how == "range_last_block":  # an id past the item count, in the last block's range of uint16 ids
        items[off[last[0] + 1] - 1] = m - 65536 + 7
    elif how == "order_in_run":  # two ids swapped within one (word, block) run of the second block
        e = off[last[-1]]
        items[e], items[e + 1] = items[e + 1], items[e]
    elif how == "uint32_ids":  # the previous format's dtype with the blocked offsets
        items = items.astype(np.uint32)
    elif how == "full_ids_uint32":  # previous format's full ids, blocked offsets kept
        run = np.repeat(np.arange(off.shape[0] - 1), np.diff(off))
        items = ((run % 2) * 65536 + items).astype(np.uint32)
    elif how == "word_offsets":  # (K+1,) offsets with uint16 ids
        off = off[::2]
    elif how == "offsets_int32":
        off = off.astype(np.int32)
    elif how == "offsets_disorder":
        off[2 * K // 2] = off[-1] + 1
    np.save(d / BLOCK_CASES[how], items if BLOCK_CASES[how] == "items.npy" else off)


BLOCK_CASES = {"range_last_block": "items.npy", "order_in_run": "items.npy", "uint32_ids": "items.npy",
               "full_ids_uint32": "items.npy", "word_offsets": "offsets.npy", "offsets_int32": "offsets.npy",
               "offsets_disorder": "offsets.npy"}


@pytest.fixture(scope="module")
def block_corpus(tmp_path_factory):
    """A database whose first segment holds 70,000 items (2 blocks), and a damaged copy per block case."""
    root = tmp_path_factory.mktemp("blocks")
    rng = np.random.default_rng(60)
    K, D = 12, 16
    db = Database.create(root / "healthy", d2r.Codebook(_unit(rng, K, D)))
    db.merge_policy = MergePolicy(factor=50, max_segments=50)
    for n in (70_000, 50):
        for _ in range(n):
            db.add_aggregated(len(db), _tiny(rng, K, D, words=(2, 6)))
        db.save()
    db.close()
    seg = json.loads((root / "healthy" / "manifest.json").read_text())["segments"][0]["name"]
    cases = {}
    for how, fname in BLOCK_CASES.items():
        shutil.copytree(root / "healthy", root / how)
        _damage_blocks(root / how / seg, how, K)
        cases[how] = (root / how, f"{seg}/{fname}")
    return root, seg, K, D, cases


@pytest.mark.parametrize("how", list(BLOCK_CASES))
def test_block_damage_is_named(block_corpus, how, capsys):
    root, seg, K, D, cases = block_corpus
    path, rel = cases[how]
    assert check(root / "healthy") == []
    assert [d["file"] for d in check(path)] == [rel]
    with pytest.raises(DamagedError) as exc:  # by the manifest's sizes/digests or the structural checks
        Database.open(path).search(np.ones((3, D), np.float32), 5)
    assert rel in str(exc.value).replace(os.sep, "/")
    with pytest.raises(DamagedError) as exc:  # structure alone (no file records: a version-1 manifest)
        Segment.read(path, {"name": seg}, "asmk_star", "aggregation", K, D)
    assert rel in str(exc.value).replace(os.sep, "/") and "\n" not in str(exc.value)
    capsys.readouterr()
    assert cli_main(["index", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert rel in err and "Traceback" not in err


SEARCH_ALL = """
import sys, numpy as np
from d2r.index import Database
q = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
for path in sys.argv[1:]:
    try:
        Database.open(path).search(q, 5)
        print("ok", path, flush=True)
    except (ValueError, OSError) as exc:
        print("error", path, str(exc).splitlines()[0], flush=True)
"""


def test_damaged_indexes_never_crash_the_interpreter(corpus, block_corpus, tmp_path):
    root, cases = corpus
    script = tmp_path / "search_all.py"
    script.write_text(SEARCH_ALL)
    paths = [str(p) for p, _ in cases.values()] + [str(p) for p, _ in block_corpus[-1].values()]
    proc = subprocess.run([sys.executable, str(script), *paths], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a segfault would be negative
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kernel,mode", [("asmk", "aggregation"), ("vlad", "search")])
@pytest.mark.parametrize("how", ["truncate", "shape", "dtype"])
def test_payload_corruption_other_kernels(tmp_path, kernel, mode, how):
    rng = np.random.default_rng(11)
    cents = _unit(rng, 8, 8)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents), kernel=kernel, mode=mode)
    for i in range(6):
        db.add(i, _unit(rng, 20, 8))
    db.save()
    db.close()
    seg = json.loads((tmp_path / "db" / "manifest.json").read_text())["segments"][0]["name"]
    rel = f"{seg}/{PAYLOAD[kernel]}.npy"
    _damage(tmp_path / "db" / rel, how)
    assert [d["file"] for d in check(tmp_path / "db")] == [rel]
    with pytest.raises(DamagedError, match=PAYLOAD[kernel]):
        Database.open(tmp_path / "db")


def test_repair_drops_damaged_segments(tmp_path, capsys):
    rng = np.random.default_rng(12)
    cents = _unit(rng, 16, 8)
    db = Database.create(tmp_path / "db", d2r.Codebook(cents))
    db.merge_policy = MergePolicy(factor=50, max_segments=50)
    for s in range(3):
        for i in range(5):
            db.add(f"{s}-{i}", _unit(rng, 20, 8))
        db.save()
    db.remove("2-0")
    db.save()
    db.close()
    seg = json.loads((tmp_path / "db" / "manifest.json").read_text())["segments"][1]["name"]
    _damage(tmp_path / "db" / seg / "items.npy", "flip")
    assert cli_main(["index", "info", str(tmp_path / "db")]) in (0, 1)
    capsys.readouterr()
    assert cli_main(["index", "repair", str(tmp_path / "db"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["dropped_segments"]] == [seg]
    assert check(tmp_path / "db") == []
    again = Database.open(tmp_path / "db")
    assert list(again.ids()) == [f"0-{i}" for i in range(5)] + [f"2-{i}" for i in range(1, 5)]
    # a damaged manifest.json falls back on the newest readable generation
    _damage(tmp_path / "db" / "manifest.json", "garbage")
    assert cli_main(["index", "repair", str(tmp_path / "db")]) == 0
    assert list(Database.open(tmp_path / "db").ids()) == list(again.ids())


def test_engine_folder_check_and_old_manifests(tmp_path, capsys):
    rng = np.random.default_rng(13)
    cents = _unit(rng, 16, 8)
    db = Database.create(tmp_path / "eng" / "index", d2r.Codebook(cents))
    for i in range(6):
        db.add(i, _unit(rng, 20, 8))
    db.save()
    db.remove(2)
    db.save()
    db.close()
    root = tmp_path / "eng" / "index"
    manifest = json.loads((root / "manifest.json").read_text())
    q = _unit(rng, 20, 8)
    want = Database.open(root).search(q, 5)
    # a version-1 manifest (names only, no file records) still opens, and the next save upgrades it
    old = dict(manifest, format_version=1, segments=[s["name"] for s in manifest["segments"]],
               removed=manifest["removed"]["name"])
    (root / "manifest.json").write_text(json.dumps(old))
    got = Database.open(root).search(q, 5)
    assert list(got.ids) == list(want.ids) and 2 not in list(Database.open(root))
    db = Database.open(root)
    db.add(10, _unit(rng, 20, 8))
    db.save()
    assert check(root) == []
    seg = json.loads((root / "manifest.json").read_text())["segments"][0]["name"]
    _damage(root / seg / "offsets.npy", "range")
    assert cli_main(["index", "check", str(tmp_path / "eng"), "--json"]) == 1
    assert [d["file"] for d in json.loads(capsys.readouterr().out)["damaged"]] == [f"index/{seg}/offsets.npy"]


def test_repair_reindex_rebuilds_dropped_images_from_the_feature_store(tmp_path, capsys):
    from PIL import Image

    from d2r.engine import Engine
    from tests.corpus import textured

    rng = np.random.default_rng(21)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(textured(rng, 200, 260)).save(folder / f"im{i}.png")
    eng = tmp_path / "eng"
    assert cli_main([str(a) for a in ("index", "create", eng, "--codebook-size", 16, "--images", folder,
                                      "--json", "--quiet")]) == 0
    capsys.readouterr()
    before = Engine.open(eng)
    ids = sorted(before.database.ids())
    query = np.asarray(before._whole_image_features(ids[2]).descriptors)
    want = before.database.search(query, 5)
    seg = json.loads((eng / "index" / "manifest.json").read_text())["segments"][0]["name"]
    _damage(eng / "index" / seg / "items.npy", "flip")
    assert cli_main(["index", "repair", str(tmp_path / "imgs"), "--reindex"]) == 2  # not an engine folder
    assert "engine folder" in capsys.readouterr().err
    assert cli_main(["index", "repair", str(eng), "--reindex", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["dropped_segments"]] == [seg]
    assert report["reindexed"] == report["dropped_segments"][0]["images"] > 0
    assert check(eng / "index") == []
    after = Engine.open(eng).database
    assert sorted(after.ids()) == ids
    got = after.search(query, 5)
    assert sorted(got.ids) == sorted(want.ids)
    np.testing.assert_allclose(np.sort(got.scores), np.sort(want.scores), atol=1e-9)
