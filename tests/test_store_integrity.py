"""Feature store at scale: size-based unique shards, compaction, one writer (real processes), damage detected
(a corruption corpus for every file kind), ShardWriter/commit, and `d2r index add --store` on a real
extract."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d2r._io import file_digest
from d2r._lock import LockedError
from d2r.features import FeatureStore, LocalFeatures, RegionFeatures
from d2r.features.store import ShardWriter, check_store
from d2r.features.store import format as fmt
from d2r.features.store import store as store_mod
from d2r.storage import DamagedError

REPO = Path(__file__).resolve().parents[1]
INFO = {"name": "toy", "config": {}, "fingerprint": "fp-toy", "dim": 8}
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def feats_of(image_id: str, dim: int = 8):
    """Deterministic features of an image id (so any process can check what it reads)."""
    seed = int.from_bytes(image_id.encode()[-8:].rjust(8, b"\0"), "little")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 30))
    f = LocalFeatures(
        rng.standard_normal((n, 2)).astype(np.float32),
        rng.random(n).astype(np.float32),
        rng.random(n).astype(np.float32),
        rng.standard_normal((n, dim)).astype(np.float32),
    )
    if n and rng.random() < 0.3:
        k = n // 2
        return RegionFeatures(
            f,
            np.array([n - k, k]),
            rng.random((2, 4)).astype(np.float32),
            np.array([-1, 0]),
            rng.random(2).astype(np.float32),
        )
    return f


def same(a, b):
    assert type(a) is type(b)
    if isinstance(a, RegionFeatures):
        for k in ("counts", "boxes", "box_ids", "box_scores"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        a, b = a.features, b.features
    for k in ("locations", "scales", "scores", "descriptors"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def shard_files(path):
    return sorted(p.name for p in Path(path).glob("shard-*.npy"))


# ---- shards: unique names, rolled over by size, compacted --------------------------------------------------
def test_shards_roll_over_by_size_with_unique_names(tmp_path):
    ids = [f"im{i:04d}" for i in range(300)]
    with FeatureStore.create(tmp_path / "s", INFO, shard_bytes=16 * 1024) as store:
        for i in ids:
            store.add(i, feats_of(i))
    store = FeatureStore.open(tmp_path / "s")
    recs = store.manifest["shards"]
    assert len(recs) >= 3
    assert all(re.fullmatch(r"shard-[0-9a-f]{32}", r["name"]) for r in recs)
    assert all(r["bytes"] < 16 * 1024 + 4096 for r in recs)  # one image past the limit at most
    for r in recs:  # sizes and digests recorded per file, and true
        for key, f in r["files"].items():
            p = tmp_path / "s" / f"{r['name']}.{key}.npy"
            assert p.stat().st_size == f["size"] and file_digest(p) == f["blake2b"]
    assert store.ids() == ids
    for i in ids:
        same(store.get(i), feats_of(i))
    assert [i for i, _ in store] == ids
    assert store.check() == []


def test_small_flushes_are_compacted_in_tiers(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "RETIRE_GRACE_SECONDS", 0.0)  # retired files go once no kept generation lists them
    ids = [f"im{i:04d}" for i in range(400)]
    store = FeatureStore.create(tmp_path / "s", INFO, shard_bytes=64 * 1024)
    written = 0
    for k in range(0, len(ids), 4):  # an engine-like writer: a small shard at every save
        for i in ids[k : k + 4]:
            store.add(i, feats_of(i))
        store.flush()
        written += 1
        assert store.num_shards <= 3 * store_mod.COMPACT_AT  # never piles up
    store.close()
    reader = FeatureStore.open(tmp_path / "s")
    assert reader.num_shards < written / 4
    assert sorted(reader.ids()) == ids and len(reader) == len(ids)
    for i in ids:
        same(reader.get(i), feats_of(i))
    # on disk: the live shards and at most those of the generations kept for readers
    live = {r["name"] for r in reader.manifest["shards"]}
    kept = set()
    for g in range(reader.generation - fmt.KEEP_GENERATIONS + 1, reader.generation + 1):
        kept |= {r["name"] for r in json.loads((tmp_path / "s" / f"manifest-{g:08d}.json").read_text())["shards"]}
    on_disk = {n.split(".")[0] for n in shard_files(tmp_path / "s")}
    assert live <= on_disk <= kept
    assert len(kept - live) <= 2 * store_mod.COMPACT_AT
    assert sorted(p.name for p in (tmp_path / "s").glob("manifest-*.json")) == [
        f"manifest-{g:08d}.json" for g in range(reader.generation - fmt.KEEP_GENERATIONS + 1, reader.generation + 1)]
    assert reader.check() == []


def test_failed_compaction_keeps_the_committed_store(tmp_path, monkeypatch):
    store = FeatureStore.create(tmp_path / "s", INFO, shard_bytes=1 << 20)
    for k in range(store_mod.COMPACT_AT - 1):
        store.add(f"a{k}", feats_of(f"a{k}"))
        store.flush()
    real, calls = fmt.save_array, {"n": 0}

    def failing(path, array, **kw):
        calls["n"] += 1
        if calls["n"] > 12:  # the flushed shard's 12 files are written; the merge fails
            raise OSError("disk full")
        return real(path, array, **kw)

    monkeypatch.setattr(fmt, "save_array", failing)
    store.add("last", feats_of("last"))
    store.flush()  # committed; the compaction that follows fails and is skipped
    assert store.num_shards == store_mod.COMPACT_AT
    with pytest.raises(OSError, match="disk full"):
        calls["n"] = 100
        store.compact()
    monkeypatch.setattr(fmt, "save_array", real)
    live = {r["name"] for r in store.manifest["shards"]}
    assert {n.split(".")[0] for n in shard_files(tmp_path / "s")} == live  # nothing of the failed merge left
    assert store.compact() == 1 and store.num_shards == 1
    store.close()
    reader = FeatureStore.open(tmp_path / "s")
    assert len(reader) == store_mod.COMPACT_AT and reader.check() == []


# ---- one writer --------------------------------------------------------------------------------------------
def test_second_writer_refused_readers_never_blocked(tmp_path):
    w = FeatureStore.create(tmp_path / "s", INFO)
    w.add("a", feats_of("a"))
    w.flush()
    with pytest.raises(LockedError, match=r"another writer .* feature store"):
        FeatureStore.open(tmp_path / "s", mode="a")
    with pytest.raises(LockedError):
        FeatureStore.create(tmp_path / "s", INFO)
    r = FeatureStore.open(tmp_path / "s")  # readers take no lock
    assert r.ids() == ["a"]
    w.close()
    FeatureStore.open(tmp_path / "s", mode="a").close()  # free again


HOLDER = """
import sys, time
from pathlib import Path
from d2r.features import FeatureStore
from tests.test_store_integrity import INFO, feats_of
store = FeatureStore.create(sys.argv[1], INFO)
for i in range(20):
    store.add(f"p{i}", feats_of(f"p{i}"))
store.flush()
print("holding", flush=True)
deadline = time.monotonic() + 120
while not Path(sys.argv[2]).exists() and time.monotonic() < deadline:
    time.sleep(0.05)
for i in range(20, 40):
    store.add(f"p{i}", feats_of(f"p{i}"))
store.close()
"""

WAITER = """
import sys
from d2r.features import FeatureStore
from tests.test_store_integrity import feats_of
with FeatureStore.open(sys.argv[1], mode="a", lock_timeout=120) as s:
    for i in range(10):
        s.add(f"q{i}", feats_of(f"q{i}"))
"""


def test_two_processes_one_store_second_refused_then_waits_nothing_lost(tmp_path):
    path, release = tmp_path / "s", tmp_path / "release"
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(img / "a.png")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(release)], stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=REPO)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        code = "import sys; from d2r.features import FeatureStore; FeatureStore.open(sys.argv[1], mode='a')"
        refused = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                                 env=ENV, timeout=60)
        assert refused.returncode != 0 and "another writer" in refused.stderr
        # the CLI: refused before extracting anything, one line, exit 1
        cli = subprocess.run([sys.executable, "-m", "d2r", "extract", "--images", str(img), "--features",
                              "rootsift", "--out", str(path), "--quiet"], capture_output=True, text=True,
                             env=ENV, timeout=120)
        assert cli.returncode == 1 and "another writer" in cli.stderr and "feature store" in cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(path)], stderr=subprocess.PIPE, text=True,
                                  env=ENV, cwd=REPO)
        time.sleep(0.5)
        release.touch()
        assert waiter.wait(timeout=120) == 0, waiter.stderr.read()
        assert holder.wait(timeout=60) == 0
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
    store = FeatureStore.open(path)
    want = [f"p{i}" for i in range(40)] + [f"q{i}" for i in range(10)]
    assert sorted(store.ids()) == sorted(want)
    for i in want:
        same(store.get(i), feats_of(i))


def test_extract_into_a_new_store_another_process_is_creating_names_that_writer(tmp_path):
    """D18: `d2r extract --out S` while another process was creating S (its lock taken, a shard half
    written, no manifest.json yet) failed with "folder exists, is not empty" instead of naming the writer."""
    path, img = tmp_path / "s", tmp_path / "imgs"
    path.mkdir()
    img.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(img / "a.png")
    hold = ("import sys, time; from d2r._lock import WriterLock; lock = WriterLock(sys.argv[1], "
            "what='feature store').acquire(); open(sys.argv[1] + '/shard-0.descriptors.npy.tmp', 'wb').write("
            "b'x' * 64); print('holding', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True,
                              env=ENV, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "holding"
        cli = subprocess.run([sys.executable, "-m", "d2r", "extract", "--images", str(img), "--features",
                              "rootsift", "--out", str(path), "--quiet"], capture_output=True, text=True,
                             env=ENV, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode == 1 and len(lines) == 1, cli.stderr
    assert f"another writer (pid {holder.pid})" in lines[0] and "feature store" in lines[0], lines
    assert not (path / "manifest.json").exists()


WRITER = """
import sys
from d2r.features import FeatureStore
from tests.test_store_integrity import INFO, feats_of
store = FeatureStore.create(sys.argv[1], INFO, shard_bytes=8 * 1024)
for i in range(int(sys.argv[2])):
    store.add(f"w{i:05d}", feats_of(f"w{i:05d}"))
    if i % 3 == 2:
        store.flush()  # many small commits, compactions and retirements
store.close()
"""


def test_reader_sees_consistent_generations_while_writer_commits_and_compacts(tmp_path):
    path = tmp_path / "s"
    FeatureStore.create(path, INFO).close()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "300"], env=ENV, cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    reads, last = 0, 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            running = writer.poll() is None
            store = FeatureStore.open(path)
            n = len(store)
            assert n >= last  # generations only grow
            seen = []
            for image_id, f in store:  # the whole generation, each image once, exact
                same(f, feats_of(image_id))
                seen.append(image_id)
            assert len(seen) == len(set(seen)) == n
            assert sorted(seen) == [f"w{i:05d}" for i in range(n)]
            last, reads = n, reads + 1
            if not running:
                break
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.wait() == 0, writer.stderr.read()
    assert last == 300 and reads >= 2


# ---- damage detected, never executed -----------------------------------------------------------------------
def _damage(path: Path, key: str, how: str) -> Path:
    """Damage the ``key`` file of the first shard of the store at ``path`` in one way; returns the file."""
    rec = json.loads((path / "manifest.json").read_text())["shards"][0]
    f = path / f"{rec['name']}.{key}.npy"
    a = np.load(f)
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: max(10, f.stat().st_size // 2)])
    elif how == "flip":
        b = bytearray(f.read_bytes())
        for k in range(1, 9):
            b[-k] ^= 0xFF
        f.write_bytes(bytes(b))
    elif how == "missing":
        f.unlink()
    elif how == "dtype":
        np.save(
            f,
            np.arange(a.size, dtype=np.float64).reshape(a.shape)
            if a.dtype.kind != "f"
            else a.astype(np.int32),
        )
    elif how == "shape":
        np.save(f, np.concatenate([a, a[:1]]) if len(a) else np.zeros((3,) + a.shape[1:], a.dtype))
    elif how == "range":  # offsets pointing past the data
        a = a.copy()
        a[-1] += 1000
        a[1:-1] += 1000
        np.save(f, a)
    return f


CASES = [(k, h) for k in fmt._ARRAYS for h in ("truncate", "flip", "missing", "dtype", "shape")]
CASES += [(k, "range") for k in ("offsets", "region_offsets")]


def _rootsift_info():
    from d2r.features import RootSIFT
    from d2r.features.config import extractor_info

    return extractor_info(RootSIFT(max_features=200))


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    """Two shards of RootSIFT-sized features (one with regions), labelled as RootSIFT(max_features=200)."""
    path = tmp_path_factory.mktemp("good") / "s"
    with FeatureStore.create(path, _rootsift_info(), shard_bytes=1 << 20) as store:
        for i in range(12):
            store.add(
                f"r{i}",
                RegionFeatures(
                    _local(i),
                    np.array([2, 1]),
                    np.ones((2, 4), np.float32),
                    np.array([-1, 0]),
                    np.ones(2, np.float32),
                ),
            )
        store.flush()
        for i in range(5):
            store.add(f"l{i}", feats_of(f"l{i}", dim=128))
    return path


def _local(i):
    rng = np.random.default_rng(i)
    return LocalFeatures(
        rng.random((3, 2), np.float32),
        rng.random(3, np.float32),
        rng.random(3, np.float32),
        rng.random((3, 128), np.float32),
    )


def test_damage_case_count():
    assert len(CASES) == 62  # every file kind, every way


@pytest.mark.parametrize("key,how", CASES)
def test_corruption_corpus(good_store, tmp_path, key, how, capsys):
    import shutil

    from d2r.cli import main

    path = tmp_path / "s"
    shutil.copytree(good_store, path)
    bad = _damage(path, key, how)
    # check lists exactly the damaged file
    damaged = check_store(path)
    assert damaged and {d["file"] for d in damaged} == {str(bad)}, damaged
    assert all(d["problem"] for d in damaged)
    # opening and reading every image gives a clear error naming the file, or (bytes flipped in the data,
    # which only the checksum sees) values, never a crash
    try:
        store = FeatureStore.open(path)
        for image_id in store.ids():
            store.get(image_id)
        list(store)
    except DamagedError as exc:
        assert exc.file == str(bad) and str(bad) in str(exc) and "\n" not in str(exc)
    else:
        assert how == "flip"
    # the CLI: one line naming the file, exit 1, no traceback
    engine = tmp_path / "eng"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        # a codebook the 17 images can give: else that setting is refused first, before the store is read
        json.dumps({"features": {"options": {"max_features": 200}}, "regions": {"proposer": "grid"},
                    "codebook": {"size": 8}})
    )
    assert main(["index", "create", str(engine), "--config", str(cfg), "--quiet"]) == 0
    assert main(["index", "add", str(engine), "--store", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_damaged_manifest(good_store, tmp_path):
    import shutil

    path = tmp_path / "s"
    shutil.copytree(good_store, path)
    m = json.loads((path / "manifest.json").read_text())
    m["shards"][0]["name"] = "../../etc/passwd"
    (path / "manifest.json").write_text(json.dumps(m))
    assert [d["file"] for d in check_store(path)] == [str(path / "manifest.json")]
    with pytest.raises(DamagedError, match=r"manifest.json: malformed manifest \(shards\[0\]\.name: \"\.\./\.\./etc/passwd\""):
        FeatureStore.open(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DamagedError, match="manifest.json: not valid JSON"):
        FeatureStore.open(path)


def test_version_1_store_is_read_and_upgraded(tmp_path):
    path = tmp_path / "s"
    with FeatureStore.create(path, INFO) as store:
        for i in range(5):
            store.add(f"v{i}", feats_of(f"v{i}"))
        store.add_failure("bad", "broken")
    m = json.loads((path / "manifest.json").read_text())
    v1 = {k: m[k] for k in ("format", "extractor", "dim", "num_images", "num_features")}
    v1["version"] = 1
    v1["shards"] = [{k: r[k] for k in ("name", "num_images", "num_features")} for r in m["shards"]]
    (path / "manifest.json").write_text(json.dumps(v1))
    old = FeatureStore.open(path)
    assert old.ids() == [f"v{i}" for i in range(5)] and old.failures == {"bad": "broken"}
    assert old.check() == []
    with FeatureStore.open(path, mode="a") as store:  # digests recorded once, on the first write
        store.add("v5", feats_of("v5"))
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 3 and all("files" in r for r in m["shards"])
    new = FeatureStore.open(path)
    assert len(new) == 6 and new.check() == [] and new.failures == {"bad": "broken"}


# ---- reads -------------------------------------------------------------------------------------------------
def test_concurrent_get_many_and_cache(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(store_mod, "CACHE_SHARDS", 8)
    ids = [f"im{i:04d}" for i in range(200)]
    with FeatureStore.create(tmp_path / "s", INFO, shard_bytes=4096) as store:
        for i in ids:
            store.add(i, feats_of(i))
    reader = FeatureStore.open(tmp_path / "s")
    assert reader.num_shards > store_mod.CACHE_SHARDS  # the cache must evict
    rng = np.random.default_rng(0)
    chunks = [[ids[j] for j in rng.integers(0, len(ids), 50)] for _ in range(40)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(reader.get_many, chunks))
    for chunk, feats in zip(chunks, got):
        for i, f in zip(chunk, feats):
            same(f, feats_of(i))
    assert len(reader._cache) <= store_mod.CACHE_SHARDS


# ---- distributed writers: ShardWriter + commit -------------------------------------------------------------
def test_shard_writers_commit_contract(tmp_path):
    path = tmp_path / "s"
    driver = FeatureStore.create(path, INFO, shard_bytes=1 << 20)  # holds the lock; workers need none
    driver.add("a0", feats_of("a0"))
    driver.flush()
    results = []
    for w, ids in enumerate([["a0", "b0", "b1", "c0"], ["c0", "d0", "d1"]]):
        sw = ShardWriter(path, dim=8, shard_bytes=2048, prefix=f"w{w}-")
        for i in ids:
            sw.add(i, feats_of(i))
        sw.add_failure("bad", "DecodeError: truncated")
        results.append(json.loads(json.dumps(sw.close())))  # travels as JSON
    assert all(r["name"].startswith("shard-w") for res in results for r in res["shards"])
    reader_before = FeatureStore.open(path)
    assert len(reader_before) == 1  # nothing visible before the commit
    out = driver.commit(results)
    assert out["images"] == 5 and out["duplicates"] == 2 and out["failures"] == 1
    assert driver.commit(results)["shards"] == 0  # idempotent per shard name
    same(reader_before.get("d0"), feats_of("d0"))  # a reader opened earlier finds newly committed images
    reader = FeatureStore.open(path)
    assert sorted(reader.ids()) == ["a0", "b0", "b1", "c0", "d0", "d1"]
    for i in reader.ids():
        same(reader.get(i), feats_of(i))
    assert reader.failures == {"bad": "DecodeError: truncated"}
    # a killed worker: its shard files are never committed, readers ignore them, gc removes them
    sw = ShardWriter(path, dim=8, prefix="dead-")
    sw.add("z0", feats_of("z0"))
    orphan = sw.close()["shards"][0]["name"]
    assert "z0" not in FeatureStore.open(path)
    assert driver.gc() == []  # too young: may still be committed
    assert len(driver.gc(grace_seconds=0)) == 12 and not list(path.glob(f"{orphan}.*"))
    # a damaged shard is refused before anything is committed
    sw = ShardWriter(path, dim=8)
    sw.add("e0", feats_of("e0"))
    res = sw.close()
    f = path / f"{res['shards'][0]['name']}.descriptors.npy"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    gen = driver.generation
    with pytest.raises(DamagedError, match=re.escape(str(f)) + ": checksum mismatch"):
        driver.commit([results[0], res])
    assert driver.generation == gen and "e0" not in driver
    with pytest.raises(ValueError, match="D=8"):
        ShardWriter(path, dim=4)
    driver.close()


# ---- d2r index add --store ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for i in range(6):
        base = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(base).resize((200, 150), Image.BICUBIC).save(d / f"p{i}.jpg", quality=92)
    return d


def test_index_add_store_from_a_real_extract(tmp_path, photos, capsys):
    from d2r.cli import main
    from d2r.engine import Engine

    store = tmp_path / "store"
    assert (
        main(
            [
                "extract",
                "--images",
                str(photos),
                "--features",
                "rootsift",
                "--out",
                str(store),
                "--max-features",
                "200",
                "--quiet",
            ]
        )
        == 0
    )
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "features": {"options": {"max_features": 200}},
                "codebook": {"size": 32},
                "rerank": {"num_to_rerank": 3},
                "batch_size": 4,
            }
        )
    )
    by_store, by_images = tmp_path / "e1", tmp_path / "e2"
    for eng in (by_store, by_images):
        assert main(["index", "create", str(eng), "--config", str(cfg), "--quiet"]) == 0
    assert main(["index", "add", str(by_store), "--store", str(store), "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["indexed"] == 6 and out["images_in_index"] == 6 and out["codebook_trained"]
    assert main(["index", "add", str(by_images), str(photos), "--quiet"]) == 0
    e1, e2 = Engine.open(by_store), Engine.open(by_images)
    h1, h2 = e1.search(photos / "p2.jpg", top_k=6), e2.search(photos / "p2.jpg", top_k=6)
    assert [h.image_id for h in h1] == [h.image_id for h in h2] and h1[0].image_id == "p2"
    np.testing.assert_allclose([h.score for h in h1], [h.score for h in h2], atol=1e-9)
    # hits of an index added from a store had `path: null` (the store kept no sources)
    assert [h.path for h in h1] == [h.path for h in h2] == [str((photos / f"{h.image_id}.jpg").resolve())
                                                          for h in h1]
    assert e1.check() == [] and main(["index", "info", str(by_store), "--quiet"]) == 0
    assert "feature store: 6 images" in capsys.readouterr().out
    # again: nothing to do; a store of other features is refused with the reason
    assert main(["index", "add", str(by_store), "--store", str(store), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 6
    other = tmp_path / "other"
    assert (
        main(
            [
                "extract",
                "--images",
                str(photos),
                "--features",
                "rootsift",
                "--out",
                str(other),
                "--max-features",
                "50",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["index", "add", str(by_store), "--store", str(other), "--quiet"]) == 1
    assert "max_features: store 50" in capsys.readouterr().err  # the option that differs, not fingerprints
    assert main(["index", "add", str(by_store), "--quiet"]) == 2  # neither images nor --store
    # damaged features: re-ranking names the file, info reports it, exit 1 and one line each
    feats = json.loads((by_store / "features" / "manifest.json").read_text())["shards"][0]["name"]
    bad = by_store / "features" / f"{feats}.offsets.npy"
    bad.write_bytes(bad.read_bytes()[:-8])
    with pytest.raises(DamagedError, match=re.escape(str(bad))):
        Engine.open(by_store).search(photos / "p2.jpg", top_k=3)
    capsys.readouterr()
    assert main(["index", "info", str(by_store), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert [d["file"] for d in Engine.open(by_store).check()] == [str(bad)]
    assert main(["index", "check", str(by_store), "--json"]) == 1  # the engine's store is checked too
    assert [d["file"] for d in json.loads(capsys.readouterr().out)["damaged"]] == [str(bad)]


ADDER = """
import sys, time
from d2r.engine import Engine
e = Engine.open(sys.argv[1])
def slow(ids):
    print("saved", flush=True)
    time.sleep(1.0)
e.index(sys.argv[2], progress=False, on_done=slow)
"""


def test_two_index_add_on_one_engine_never_lose_images(tmp_path, photos):
    import shutil

    from d2r.cli import main
    from d2r.engine import Engine

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for k, p in enumerate(sorted(photos.glob("*.jpg"))):
        shutil.copy(p, (first if k < 4 else second) / f"{'ab'[k >= 4]}{p.name}")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "features": {"options": {"max_features": 200}},
                "codebook": {"size": 16},
                "rerank": {"num_to_rerank": 0},
                "batch_size": 1,
            }
        )
    )
    eng = tmp_path / "eng"
    assert main(["index", "create", str(eng), "--config", str(cfg), "--quiet"]) == 0
    proc = subprocess.Popen(
        [sys.executable, "-c", ADDER, str(eng), str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
    )
    try:
        assert proc.stdout.readline().strip() == "saved"
        cli = [sys.executable, "-m", "d2r", "index", "add", str(eng), str(second), "--quiet"]
        refused = subprocess.run(cli, capture_output=True, text=True, env=ENV, timeout=120)
        assert refused.returncode == 1 and "another writer" in refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        waited = subprocess.run(
            cli + ["--lock-timeout", "120"], capture_output=True, text=True, env=ENV, timeout=240
        )
        assert waited.returncode == 0, waited.stderr
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    engine = Engine.open(eng)
    want = sorted(
        [f"a{p.stem}" for p in sorted(photos.glob("*.jpg"))[:4]]
        + [f"b{p.stem}" for p in sorted(photos.glob("*.jpg"))[4:]]
    )
    assert sorted(engine.database.ids().tolist()) == want
    for image_id in want:  # and every indexed image has its features
        assert len(engine._stored(image_id)) > 0
