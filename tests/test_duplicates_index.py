"""The signature index (d2r.duplicates.index): near-duplicate search equal to brute force after random add /
remove / save / reopen, merges and garbage collection, pinned readers, one writer, damaged files named in one
line."""

import json
import os
import time

import cv2
import numpy as np
import pytest

from d2r.duplicates.find import find_duplicates, id_key
from d2r.duplicates.index import SignatureIndex
from d2r.duplicates.signature import words
from d2r.storage import DamagedError, TierPolicy
from tests import reference as ref

SMALL_MERGES = TierPolicy(factor=2, floor_bytes=1, max_segments=4)


def signatures(rng, n, pool=None):
    """(n, 648) int8; with ``pool``, noisy copies of its rows (near-duplicates that share words)."""
    if pool is None or not len(pool):
        return rng.choice(np.array([-2, -1, 0, 1, 2], np.int8), size=(n, 648), p=[.15, .15, .4, .15, .15])
    out = pool[rng.integers(len(pool), size=n)].copy()
    flip = rng.random(out.shape) < rng.uniform(0.02, 0.3)
    out[flip] = rng.integers(-2, 3, size=int(flip.sum()))
    return out


def brute_force(live: dict, queries, threshold):
    """(query, id, distance) of every live id sharing a word with a query and under threshold, by the numpy
    twin of the kernel, ordered as SignatureIndex.search: by query, distance, insertion order."""
    if not live:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    ids = np.array(list(live), np.int64)
    sigs = np.stack(list(live.values()))
    qi, rows, d = ref.word_search(words(queries), queries, words(sigs), sigs, np.zeros(len(ids), bool), threshold)
    o = np.lexsort((rows, d, qi))
    return qi[o], ids[rows[o]], d[o]


@pytest.mark.parametrize("seed", range(3))
def test_random_add_remove_save_reopen_equals_brute_force(tmp_path, seed):
    rng = np.random.default_rng(seed)
    idx = SignatureIndex.create(tmp_path / "s", policy=SMALL_MERGES)
    live: dict = {}  # id -> signature, in insertion order
    next_id = 0
    for step in range(12):
        n = int(rng.integers(0, 25))
        pool = np.stack(list(live.values())) if live else None
        sig = signatures(rng, n, pool if rng.random() < 0.7 else None)
        ids = np.arange(next_id, next_id + n) * 7 + 3  # ids unrelated to rows
        next_id += n
        idx.add(ids, sig)
        live.update(zip(ids.tolist(), sig))
        if live and rng.random() < 0.6:
            gone = rng.choice(list(live), size=int(rng.integers(1, max(2, len(live) // 4))), replace=False)
            idx.remove(gone)
            for i in gone.tolist():
                live.pop(i)
        if rng.random() < 0.5:
            idx.save()
        if rng.random() < 0.3:
            idx.save()
            idx.close()
            idx = SignatureIndex.open(tmp_path / "s", writable=True, policy=SMALL_MERGES)
        queries = signatures(rng, 6, np.stack(list(live.values())) if live else None)
        threshold = float(rng.uniform(0.2, 0.6))
        for got, want in zip(idx.search(queries, threshold), brute_force(live, queries, threshold)):
            np.testing.assert_array_equal(got, want)
        assert len(idx) == len(live) and idx.ids().tolist() == list(live)
        if live:
            np.testing.assert_array_equal(idx.signatures(list(live)[::-1]), np.stack(list(live.values())[::-1]))
    idx.save()
    assert not idx.check()
    assert len(list((tmp_path / "s").glob("seg-*"))) <= 2 * 4  # merged; old segments collected
    idx.close()


def test_pairs_are_each_near_duplicate_pair_once():
    rng = np.random.default_rng(1)
    base = signatures(rng, 5)
    idx = SignatureIndex()
    idx.add(np.arange(10), np.concatenate([base, base]))  # i and i + 5 identical
    a, b, d = idx.pairs()
    assert sorted(zip(a.tolist(), b.tolist())) == [(i, i + 5) for i in range(5)]
    np.testing.assert_array_equal(d, 0.0)


def test_bad_input_is_refused_without_changing_anything():
    idx = SignatureIndex()
    idx.add([1], np.zeros((1, 648), np.int8))
    with pytest.raises(ValueError, match="already in the index"):
        idx.add([1, 2], np.zeros((2, 648), np.int8))
    with pytest.raises(ValueError, match="outside"):
        idx.add([3], np.full((1, 648), 5, np.int8))
    with pytest.raises(ValueError, match="expected"):
        idx.add([3], np.zeros((1, 64), np.int8))
    with pytest.raises(KeyError):
        idx.remove([1, 99])
    with pytest.raises(ValueError, match="threshold"):
        idx.search(np.zeros((1, 648), np.int8), threshold=0)
    assert idx.ids().tolist() == [1]


def test_a_reader_keeps_its_generation_while_the_writer_commits(tmp_path):
    rng = np.random.default_rng(6)
    sig = signatures(rng, 40)
    w = SignatureIndex.create(tmp_path / "s", policy=SMALL_MERGES)
    w.add(np.arange(20), sig[:20])
    w.save()
    r = SignatureIndex.open(tmp_path / "s")
    pinned = r.search(sig[:5])
    w.remove(np.arange(0, 20, 2))
    w.add(np.arange(100, 120), sig[20:])
    w.save()  # merges, a new removal table, garbage collected
    for a, b in zip(r.search(sig[:5]), pinned):
        np.testing.assert_array_equal(a, b)
    r.refresh()
    assert len(r) == 30
    with pytest.raises(ValueError, match="read-only"):
        r.save()


def test_one_writer_at_a_time(tmp_path):
    w = SignatureIndex.create(tmp_path / "s")
    with pytest.raises(Exception, match="another writer"):
        SignatureIndex.open(tmp_path / "s", writable=True)
    w.close()
    SignatureIndex.open(tmp_path / "s", writable=True).close()
    with pytest.raises(FileExistsError):
        SignatureIndex.create(tmp_path / "s")


def test_garbage_collection_keeps_three_generations(tmp_path):
    rng = np.random.default_rng(2)
    idx = SignatureIndex.create(tmp_path / "s", policy=TierPolicy(factor=2, floor_bytes=1, max_segments=2))
    for k in range(6):
        idx.add(np.arange(k * 10, k * 10 + 10), signatures(rng, 10))
        idx.remove([k * 10])
        idx.save()
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    gens = sorted(p.name for p in (tmp_path / "s").glob("manifest-*.json"))
    assert len(gens) == 3 and gens[-1] == f"manifest-{m['generation']:08d}.json"
    kept = set()
    for g in gens:
        rec = json.loads((tmp_path / "s" / g).read_text())
        kept |= {s["name"] for s in rec["segments"]} | ({rec["removed"]["name"]} if rec["removed"] else set())
    on_disk = {p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(("seg-", "removed-"))}
    assert on_disk == kept
    assert len(idx) == 54 and not idx.check()


def saved(tmp_path, n=30):
    rng = np.random.default_rng(9)
    idx = SignatureIndex.create(tmp_path / "s")
    idx.add(np.arange(n), signatures(rng, n))
    idx.remove([3, 4])
    idx.save()
    idx.close()
    return tmp_path / "s"


def one_line_error(path, match):
    with pytest.raises(DamagedError) as exc:
        SignatureIndex.open(path)
    msg = str(exc.value)
    assert "\n" not in msg and match in msg and "signature index damaged" in msg, msg
    return msg


def test_a_truncated_file_is_named(tmp_path):
    path = saved(tmp_path)
    f = next(path.glob("seg-*")) / "signatures.npy"
    f.write_bytes(f.read_bytes()[:-40])
    assert str(f) in one_line_error(path, "bytes, the manifest says")


def test_a_missing_file_and_a_bad_manifest_are_named(tmp_path):
    path = saved(tmp_path)
    f = next(path.glob("seg-*")) / "sorted_rows.npy"
    f.unlink()
    assert str(f) in one_line_error(path, "missing")
    (path / "manifest.json").write_text("{not json")
    one_line_error(path, "unreadable manifest")
    (path / "manifest.json").write_text(json.dumps({"format": "d2r-database"}))
    one_line_error(path, "not a d2r signature index")


def test_flipped_bytes_are_found_by_check_and_bad_rows_on_open(tmp_path):
    path = saved(tmp_path)
    f = next(path.glob("seg-*")) / "signatures.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01
    f.write_bytes(bytes(raw))
    assert SignatureIndex.open(path).check() == [f"{f}: checksum mismatch (contents changed)"]
    rows = next(path.glob("seg-*")) / "sorted_rows.npy"
    np.save(rows, np.full((63, 28), 99, np.int32))  # valid .npy, rows past the segment (3, 4 never saved)
    m = json.loads((path / "manifest.json").read_text())
    m["segments"][0]["files"]["sorted_rows.npy"]["size"] = rows.stat().st_size
    (path / "manifest.json").write_text(json.dumps(m))
    assert str(rows) in one_line_error(path, "row numbers outside")


def test_a_kept_index_reads_only_new_images_and_forgets_unlisted_ones(tmp_path, bundled_photos):
    """find_duplicates(keep=...) (``d2r duplicates ENGINE --keep``): the same pairs as without, the second run
    reads nothing, a new image is read alone, an image no longer listed leaves the index."""
    folder = tmp_path / "photos"
    folder.mkdir()
    images = []
    for name, a in bundled_photos.items():
        for tag, im in (("", a), ("-half", a[::2, ::2])):
            path = folder / f"{name}{tag}.png"
            cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2BGR))
            images.append((f"{name}{tag}", path))
    plain = find_duplicates(images[:-1], progress=False)
    kept = tmp_path / "sigs"
    first = find_duplicates(images[:-1], keep=kept, progress=False)
    again = find_duplicates(images[:-1], keep=kept, progress=False)
    assert first.parameters["images_read"] == len(images) - 1 and again.parameters["images_read"] == 0
    assert first.pairs == plain.pairs == again.pairs and first.groups == plain.groups
    more = find_duplicates(images, keep=kept, progress=False)
    assert more.parameters["images_read"] == 1 and len(more.groups) == len(plain.groups) + 1
    fewer = find_duplicates(images[2:], keep=kept, progress=False)
    assert fewer.parameters["images_read"] == 0
    idx = SignatureIndex.open(kept)
    assert len(idx) == len(images) - 2 and id_key(*images[0]) not in idx and not idx.check()


def test_a_file_replaced_under_the_same_id_is_read_again(tmp_path, bundled_photos):
    """The kept index keyed images by id alone: a file replaced under the same name (another photo) kept its
    old signature, so its old duplicates stayed paired and its new ones were never found."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (a_name, a), (b_name, b) = list(bundled_photos.items())[:2]
    for name, im in (("a", a), ("a-half", a[::2, ::2]), ("b", b)):
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2BGR))
    images = [(n, folder / f"{n}.png") for n in ("a", "a-half", "b")]
    kept = tmp_path / "sigs"
    first = find_duplicates(images, keep=kept, progress=False)
    assert [(p.a, p.b) for p in first.pairs] == [("a", "a-half")]
    # "a-half" now holds a half-size b, written later (a new size and modification time)
    cv2.imwrite(str(folder / "a-half.png"), cv2.cvtColor(np.ascontiguousarray(b[::2, ::2]), cv2.COLOR_RGB2BGR))
    os.utime(folder / "a-half.png", ns=(time.time_ns() + 10**9,) * 2)
    again = find_duplicates(images, keep=kept, progress=False)
    assert again.parameters["images_read"] == 1
    assert [(p.a, p.b) for p in again.pairs] == [("a-half", "b")]
    assert len(SignatureIndex.open(kept)) == 3
