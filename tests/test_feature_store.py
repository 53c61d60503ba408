"""Feature store: exact round trip, shards, resume after interruption, failures recorded and skipped."""

import json

import numpy as np
import pytest
from PIL import Image

from d2r.build import extract_to_store
from d2r.features.extract import _ordered_map
from d2r.features import FeatureStore, LocalFeatures, RegionFeatures, RootSIFT
from tests.corpus import run_cli, write_photos

INFO = {"name": "toy", "config": {"a": 1}, "fingerprint": "abc123", "dim": 8}


def _local(rng, n, dim=8):
    return LocalFeatures(
        rng.standard_normal((n, 2)).astype(np.float32) * 100,
        rng.random(n).astype(np.float32),
        rng.random(n).astype(np.float32),
        rng.standard_normal((n, dim)).astype(np.float32),
    )


def _regions(rng, counts):
    counts = np.asarray(counts, np.int64)
    r = counts.size
    return RegionFeatures(_local(rng, int(counts.sum())), counts, rng.random((r, 4)).astype(np.float32) * 50,
                          np.arange(-1, r - 1, dtype=np.int64), rng.random(r).astype(np.float32))


def _same(a, b):
    assert type(a) is type(b)
    if isinstance(a, RegionFeatures):
        for k in ("counts", "boxes", "box_ids", "box_scores"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
            assert getattr(a, k).dtype == getattr(b, k).dtype
        a, b = a.features, b.features
    for k in ("locations", "scales", "scores", "descriptors"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        assert getattr(b, k).dtype == np.float32


def test_roundtrip_exact_across_shards(tmp_path, rng):
    items = {f"img/{i:03d}": _local(rng, int(rng.integers(0, 20))) for i in range(7)}
    items["empty"] = LocalFeatures.empty(8)
    items["reg/a"] = _regions(rng, [3, 0, 5])
    items["reg/b"] = _regions(rng, [0])
    with FeatureStore.create(tmp_path / "s", INFO, shard_size=3) as store:
        for k, v in items.items():
            store.add(k, v)
        assert len(store) == len(items) and "reg/a" in store
        _same(store.get("reg/a"), items["reg/a"])  # readable before and after flush
    store = FeatureStore.open(tmp_path / "s")
    assert store.num_shards == 4  # 10 images, 3 per shard
    assert len(store) == 10 and store.ids() == list(items)
    assert "img/003" in store and "nope" not in store
    for k, v in items.items():
        _same(store.get(k), v)
    seen = [(k, f) for k, f in store]
    assert [k for k, _ in seen] == list(items)
    for k, f in seen:
        _same(f, items[k])
    shard = store.load_shard(1)
    assert shard.ids.tolist() == list(items)[3:6]
    _same(shard[0], items[list(items)[3]])
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["dim"] == 8 and m["extractor"]["fingerprint"] == "abc123"
    n_feat = sum(len(v.features if isinstance(v, RegionFeatures) else v) for v in items.values())
    assert m["num_features"] == n_feat
    with pytest.raises(KeyError):
        store.get("nope")
    with pytest.raises(ValueError, match="read-only"):
        store.add("x", items["empty"])


def test_store_refuses_bad_input(tmp_path, rng):
    store = FeatureStore.create(tmp_path / "s", INFO)
    store.add("a", _local(rng, 2))
    with pytest.raises(ValueError, match="already"):
        store.add("a", _local(rng, 2))
    with pytest.raises(ValueError, match="D=8"):
        store.add("b", _local(rng, 2, dim=4))
    store.close()
    with pytest.raises(ValueError, match="fingerprint"):
        FeatureStore.create(tmp_path / "s", dict(INFO, fingerprint="other"))
    with pytest.raises(FileExistsError):
        FeatureStore.create(tmp_path / "s", INFO, exist_ok=False)
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(tmp_path / "none")
    assert FeatureStore.create(tmp_path / "s", INFO).ids() == ["a"]  # reopened for appending


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Small generated photos-like images (real JPEG files) so extraction is fast."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    for i in range(8):
        base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(base).resize((160, 120), Image.BICUBIC))
        (d / ("sub" if i % 2 else "")).mkdir(exist_ok=True)
        Image.fromarray(arr).save(d / ("sub" if i % 2 else "") / f"im{i}.jpg", quality=90)
    return d


class CountingRootSIFT(RootSIFT):
    """A real RootSIFT that counts its calls and can stop the run (like Ctrl-C) after ``stop_after`` calls."""

    def __init__(self, stop_after=None, **kw):
        super().__init__(**kw)
        self.calls = []
        self.stop_after = stop_after

    def extract(self, image):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(str(image))
        return super().extract(image)


def test_extract_resumes_without_redoing(tmp_path, image_dir):
    out = tmp_path / "store"
    ex = CountingRootSIFT(stop_after=5, max_features=100)
    with pytest.raises(KeyboardInterrupt):
        extract_to_store(image_dir, ex, out, progress=False, workers=1, shard_size=2)
    done = FeatureStore.open(out).ids()
    assert len(done) == 5  # buffered results are flushed on the way out
    ex2 = CountingRootSIFT(max_features=100)
    summary = extract_to_store(image_dir, ex2, out, progress=False, workers=1, shard_size=2)
    assert len(ex2.calls) == 3
    assert summary["images"] == 8 and summary["extracted"] == 3 and summary["skipped"] == 5
    store = FeatureStore.open(out)
    assert sorted(store.ids()) == ["im0", "im2", "im4", "im6", "sub/im1", "sub/im3", "sub/im5", "sub/im7"]
    ref = RootSIFT(max_features=100)
    for image_id, f in store:
        _same(f, ref.extract(image_dir / f"{image_id}.jpg"))
    # a third run has nothing to do
    ex3 = CountingRootSIFT(max_features=100)
    assert extract_to_store(image_dir, ex3, out, progress=False)["extracted"] == 0 and not ex3.calls


def test_corrupt_image_recorded_and_skipped(tmp_path, image_dir):
    bad = tmp_path / "imgs"
    bad.mkdir()
    for p in sorted(image_dir.glob("*.jpg"))[:3]:
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (bad / "tiny.png").write_bytes(b"")
    summary = extract_to_store(bad, RootSIFT(), tmp_path / "s", progress=False, workers=2)
    assert summary["extracted"] == 3 and summary["failed"] == 2
    fails = json.loads((tmp_path / "s" / "failures.json").read_text())
    assert set(fails) == {"broken", "tiny"}
    assert "broken.jpg" in fails["broken"] and "empty" in fails["tiny"]
    store = FeatureStore.open(tmp_path / "s")
    assert store.failures == fails and "broken" not in store and len(store) == 3
    # failed images are skipped on a rerun unless asked to retry
    assert extract_to_store(bad, RootSIFT(), tmp_path / "s", progress=False)["skipped"] == 5
    assert extract_to_store(bad, RootSIFT(), tmp_path / "s", progress=False, retry_failed=True)["failed"] == 2


def test_threads_give_the_same_store(tmp_path, image_dir):
    extract_to_store(image_dir, RootSIFT(), tmp_path / "a", progress=False, workers=1)
    extract_to_store(image_dir, RootSIFT(), tmp_path / "b", progress=False, workers=3, shard_size=3)
    a, b = FeatureStore.open(tmp_path / "a"), FeatureStore.open(tmp_path / "b")
    assert a.ids() == b.ids()
    for (ia, fa), (ib, fb) in zip(a, b):
        assert ia == ib
        _same(fa, fb)


def test_region_fn_and_pairs(tmp_path, image_dir, rng):
    extractor = RootSIFT()

    def region_fn(image_id, source):
        f = extractor.extract(source)
        n = len(f)
        return RegionFeatures(LocalFeatures.concatenate([f, f.select(slice(0, n // 2))], 128),
                              np.array([n, n // 2]), np.array([[0, 0, 160, 120], [0, 0, 80, 60]], np.float32),
                              np.array([-1, 0]), np.array([1.0, 0.5], np.float32))

    pairs = [("x", image_dir / "im0.jpg"), ("y", np.zeros((5, 5, 3), np.uint8))]
    s = extract_to_store(pairs, extractor, tmp_path / "s", fn=region_fn, progress=False)
    assert s["extracted"] == 2
    store = FeatureStore.open(tmp_path / "s")
    x = store.get("x")
    assert isinstance(x, RegionFeatures) and x.num_regions == 2
    assert x.counts[1] == x.counts[0] // 2 and len(store.get("y").features) == 0


def test_ordered_map_keeps_order():
    items = list(range(50))
    assert list(_ordered_map(lambda i: i * i, items, 4)) == [i * i for i in items]


def test_cli_extract_json_and_resume(tmp_path, image_dir, capsys):
    from d2r.cli import main

    out = tmp_path / "store"
    argv = ["extract", "--images", str(image_dir), "--features", "rootsift", "--out", str(out),
            "--max-features", "50", "--workers", "2", "--quiet", "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["images"], s["extracted"], s["skipped"], s["failed"]) == (8, 8, 0, 0) and s["seconds"] >= 0
    store = FeatureStore.open(out)
    assert len(store) == 8 and all(len(f) <= 50 for _, f in store)
    assert store.extractor["config"]["max_features"] == 50
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 8
    # a different extractor config must not be mixed into the same store
    assert main(argv[:-5] + ["100", "--quiet", "--json"]) == 1
    assert "fingerprint" in capsys.readouterr().err


def test_cli_extract_usage_errors(tmp_path, image_dir, capsys):
    from d2r.cli import main

    with pytest.raises(SystemExit) as e:
        main(["extract", "--images", str(image_dir), "--features", "nope", "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    assert main(["extract", "--images", str(tmp_path / "missing"), "--features", "rootsift",
                 "--out", str(tmp_path / "s"), "--quiet"]) == 1


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_extract_shard_mb_not_finite_is_usage_error(tmp_path, capsys, value):
    """`d2r extract --shard-mb inf` was 'unexpected error (OverflowError)', nan 'cannot convert float NaN'."""
    photos = write_photos(tmp_path / "photos", ["p0"], 6)
    code, _, err = run_cli(capsys, "extract", "--images", photos, "--features", "rootsift", "--out",
                        tmp_path / "store", "--shard-mb", value, "--quiet")
    assert code == 2 and "--shard-mb must be a positive number" in err, err
    assert not (tmp_path / "store").exists()


def test_get_extractor_registry():
    from d2r.features import get_extractor

    ex = get_extractor("rootsift", max_features=10)
    assert isinstance(ex, RootSIFT) and ex.config.max_features == 10
    with pytest.raises(ValueError, match="unknown extractor"):
        get_extractor("surf")
    with pytest.raises(ValueError, match="model"):
        get_extractor("delf")


def test_import_does_not_load_tensorflow():
    import subprocess
    import sys

    code = "import sys, d2r.features, d2r.cli.extract; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_get_from_many_threads_returns_the_right_image(tmp_path, rng):
    from concurrent.futures import ThreadPoolExecutor

    store = FeatureStore.create(tmp_path / "s", {"name": "t", "fingerprint": "x", "dim": 8}, shard_size=2)
    feats = {f"im{i}": _local(rng, 3 + i % 5) for i in range(40)}
    for k, f in feats.items():
        store.add(k, f)
    store.close()
    reader = FeatureStore.open(tmp_path / "s")
    keys = [f"im{i}" for i in rng.integers(0, 40, 4000)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(reader.get, keys))
    for k, g in zip(keys, got):
        _same(g, feats[k])


def test_failed_flush_keeps_the_buffer(tmp_path, rng, monkeypatch):
    from d2r.features.store import format as store_mod  # its save_array: the one hashing writer

    store = FeatureStore.create(tmp_path / "s", {"name": "t", "fingerprint": "x", "dim": 8}, shard_size=100)
    a, b = _local(rng, 4), _local(rng, 5)
    store.add("a", a)
    store.add("b", b)
    calls = {"n": 0}
    real = store_mod.save_array

    def failing(path, array, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(path, array, **kw)

    monkeypatch.setattr(store_mod, "save_array", failing)
    with pytest.raises(OSError, match="disk full"):
        store.flush()
    assert len(FeatureStore.open(tmp_path / "s")) == 0  # nothing committed
    _same(store.get("a"), a)  # still buffered
    monkeypatch.setattr(store_mod, "save_array", real)
    store.flush()
    reopened = FeatureStore.open(tmp_path / "s")
    assert sorted(reopened.ids()) == ["a", "b"]
    _same(reopened.get("b"), b)


def test_feature_store_commits_buffered_features_on_a_timer(tmp_path):
    """`d2r extract` committed nothing until 256 MiB of features were buffered: a SIGKILL (OOM, node loss)
    lost every tiny image extracted so far (600 thumbnails, killed after 2.5 s: 0 kept)."""
    from d2r.features.base import LocalFeatures
    from d2r.features.store import FeatureStore

    def feats(n):
        rng = np.random.default_rng(n)
        return LocalFeatures(rng.random((n, 2), dtype=np.float32), np.ones(n, np.float32),
                             np.ones(n, np.float32), rng.random((n, 16), dtype=np.float32))

    store = FeatureStore.create(tmp_path / "store", {"name": "test", "fingerprint": "f", "dim": 16})
    try:
        store.add("a", feats(3))
        assert len(FeatureStore.open(tmp_path / "store")) == 0  # buffered: well under shard_bytes
        store.flush_seconds = 0.0  # the interval has passed
        store.add("b", feats(4))
        reader = FeatureStore.open(tmp_path / "store")  # what a killed writer leaves committed
        assert sorted(reader.ids()) == ["a", "b"] and reader.get("b").descriptors.shape == (4, 16)
    finally:
        store.close()


def test_remove_masks_rows_readers_keep_their_generation_and_compaction_reclaims(tmp_path, rng):
    info = {"name": "t", "config": {}, "fingerprint": "f", "dim": 8}
    feats = {f"im{i}": _local(rng, 5 + i) for i in range(6)}
    with FeatureStore.create(tmp_path / "s", info, shard_bytes=1 << 20) as store:
        for i, (k, f) in enumerate(feats.items()):
            store.add(k, f)
            if i % 2:
                store.flush()  # three small shards
        store.add_failure("bad", "ImageError: broken")
    reader = FeatureStore.open(tmp_path / "s")
    with FeatureStore.open(tmp_path / "s", "a") as store:
        assert store.remove(["im1", "im4", "nope", "bad", "im1"]) == 2
        assert "im1" not in store and "bad" not in store.failures and len(store) == 4
        assert store.remove(["im1"]) == 0
    _same(reader.get("im1"), feats["im1"])  # a reader of the previous generation still reads its images
    again = FeatureStore.open(tmp_path / "s")
    assert sorted(again.ids()) == ["im0", "im2", "im3", "im5"]
    with FeatureStore.open(tmp_path / "s", "a") as store:
        store.compact(full=True)
    after = FeatureStore.open(tmp_path / "s")
    assert sorted(after.ids()) == ["im0", "im2", "im3", "im5"] and after.num_shards == 1
    assert after.manifest["num_images"] == 4
    for k in after.ids():
        _same(after.get(k), feats[k])


def test_store_remove_counts_buffered_images_and_drops_pending_failures(tmp_path):
    """`FeatureStore.remove` did not count a removed image that was still buffered, and kept the pending
    failures of removed ids, which the next flush then committed."""
    from d2r.features.base import LocalFeatures
    from d2r.features.store import FeatureStore

    info = {"name": "test", "fingerprint": "f" * 16, "dim": 8}
    rng = np.random.default_rng(0)

    def feats(n):
        return LocalFeatures(rng.random((n, 2), dtype=np.float32) * 50, np.ones(n, np.float32),
                             np.ones(n, np.float32), rng.random((n, 8), dtype=np.float32))

    with FeatureStore.create(tmp_path / "s", info) as store:
        store.add("a", feats(5))
        store.flush()  # "a" committed
        store.add("b", feats(4))  # "b" buffered
        store.add_failure("c", "unreadable")  # pending
        store.add_failure("d", "unreadable")
        assert store.remove(["a", "b", "c", "zzz"]) == 2
        assert "b" not in store and "c" not in store.failures and store.remove(["b"]) == 0
    store = FeatureStore.open(tmp_path / "s")
    assert store.ids() == [] and store.failures == {"d": "unreadable"}
