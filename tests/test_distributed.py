"""Ray scale-out: distributed Lloyd, sharded index, distributed extraction, each against its one-machine twin.

A local Ray cluster (2 CPUs, loopback) is started once for the module."""

import numpy as np
import pytest

from tests.corpus import CODEBOOK

ray = pytest.importorskip("ray")

from d2r.codebook import train_codebook  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    import d2r.distributed as dist

    ray_mod, started = dist.init(num_cpus=2)
    yield ray_mod
    if started:
        ray_mod.shutdown()


def _blobs(n, d, centres, seed):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 4
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, d))).astype(np.float32)


# First in the module: it starts and stops its own Ray, which `cluster` keeps up until the module ends.
def test_ray_local_start_quiet_has_no_token_notice(capfd, caplog):
    """With --quiet, starting a local Ray printed "Token authentication is enabled for this Ray cluster"."""
    ray = pytest.importorskip("ray")
    import logging

    import d2r.distributed as dist

    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    caplog.set_level(logging.WARNING, logger="d2r.distributed._ray")  # as --quiet
    capfd.readouterr()
    ray_mod, started = dist.init(num_cpus=1)
    try:
        assert started
    finally:
        ray_mod.shutdown()
    out, err = capfd.readouterr()
    assert "Token authentication" not in out + err, err


@pytest.mark.parametrize("workers", [2, 3])
def test_distributed_lloyd_equals_single_machine(cluster, workers):
    from d2r.distributed import train_codebook as train_ray

    x = _blobs(3000, 16, 30, seed=workers)
    k = 40
    init = x[np.random.default_rng(1).choice(len(x), k, replace=False)].copy()
    init[5] = init[4]  # duplicate centroid: cluster 5 is empty after the first assignment
    init[7] = init[4]
    init[9] = 1e3  # far away: empty
    one, info1 = train_codebook(x, k, iterations=6, init=init, progress=False)
    dist, info2 = train_ray(x, k, iterations=6, init=init, progress=False, workers=workers)
    assert info2["workers"] == workers
    assert info1["repairs"][0] == 3 and info2["repairs"] == info1["repairs"]
    assert info2["iterations"] == info1["iterations"]
    np.testing.assert_allclose(dist.centroids, one.centroids, rtol=0, atol=1e-5)
    np.testing.assert_allclose(info2["inertia"], info1["inertia"], rtol=1e-9)


def test_distributed_lloyd_seeded_init_and_checks(cluster):
    from d2r.distributed import train_codebook as train_ray

    x = _blobs(1000, 8, 10, seed=5)
    one, _ = train_codebook(x, 12, iterations=4, init="k-means++", seed=3, progress=False)
    dist, _ = train_ray(x, 12, iterations=4, init="k-means++", seed=3, progress=False, workers=2)
    np.testing.assert_allclose(dist.centroids, one.centroids, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="lloyd"):
        train_ray(x, 12, method="minibatch", progress=False)
    with pytest.raises(ValueError, match="larger than"):
        train_ray(x, 5000, progress=False)


def test_train_codebook_cli_ray(cluster, tmp_path, capsys):
    from d2r.cli import main
    from d2r.codebook import Codebook

    x = _blobs(1500, 8, 12, seed=9)
    np.save(tmp_path / "x.npy", x)
    common = ["train-codebook", "--descriptors", str(tmp_path / "x.npy"), "-k", "16", "--iterations", "4",
              "--init", "random", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one.npz")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray.npz"), "--ray"]) == 0
    np.testing.assert_allclose(Codebook.load(tmp_path / "ray.npz").centroids,
                               Codebook.load(tmp_path / "one.npz").centroids, rtol=0, atol=1e-5)
    assert main(common + ["--out", str(tmp_path / "mb.npz"), "--ray", "--method", "minibatch"]) == 2  # usage
    assert "--ray runs --method lloyd" in capsys.readouterr().err


# ---- sharded index -----------------------------------------------------------------------------------------
def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _corpus(seed, count=90, d=16, k=24):
    """Images sharing structure (so scores vary), exact duplicates in different blocks (ties), empty images
    (score -1 ties); per-region counts for regional search. Returns (codebook, images, queries)."""
    from d2r.codebook import Codebook

    rng = np.random.default_rng(seed)
    book = Codebook(_unit(rng, k, d))
    base = _unit(rng, 60, d)
    images = []
    for i in range(count):
        if i % 11 == 5:  # a copy of an earlier image: same scores, tie broken by insertion order
            _, x, regions = images[i - 37 if i >= 37 else 0]
            images.append((f"im{i}", x, regions))
            continue
        n = int(rng.choice([0, 5, 40, 90])) if i % 9 else 0
        x = _unit(rng, n, d)
        if i % 3 == 0 and n:
            m = min(n, 30)
            x[:m] = base[:m] + 0.1 * rng.standard_normal((m, d)).astype(np.float32)
        cut = np.sort(rng.integers(0, n + 1, size=2))
        images.append((f"im{i}", x, [int(cut[0]), 0, int(cut[1] - cut[0]), int(n - cut[1])]))
    noisy = base[:40] + 0.05 * rng.standard_normal((40, d)).astype(np.float32)
    near = np.concatenate([noisy, _unit(rng, 20, d)])
    queries = [near, images[3][1], _unit(rng, 30, d), np.zeros((0, d), np.float32)]
    return book, images, queries


def _assert_same(single, sharded, queries, top_ks=(100, 7, 1), atol=0.0):
    for q in queries:
        for top_k in top_ks:
            a, b = single.search(q, top_k), sharded.search(q, top_k)
            np.testing.assert_array_equal(np.asarray(b.ids), np.asarray(a.ids))
            np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=atol)
            np.testing.assert_array_equal(b.regions, a.regions)


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("mode", ["aggregation", "search"])
@pytest.mark.parametrize("idf", [False, True])
def test_sharded_equals_one_index(shards, mode, idf):
    from d2r.distributed import ShardedDatabase, build_shards
    from d2r.index import Database

    book, images, queries = _corpus(seed=shards + 10 * (mode == "search") + 100 * idf)
    if mode == "aggregation":  # regional aggregation uses regions too; half the images without them
        images = [(i, x, r if n % 2 else None) for n, (i, x, r) in enumerate(images)]
    cfg = dict(kernel="asmk_star", mode=mode, idf=idf, normalize=bool(shards % 4))
    single = Database.create(None, book, **cfg)
    single.add_batch(images)
    parts = build_shards(images, shards, book, **cfg)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(images) and max(sizes) - min(sizes) <= 1
    sharded = ShardedDatabase(parts)
    assert len(sharded) == len(single)
    np.testing.assert_array_equal(sharded.ids(), single.ids())
    _assert_same(single, sharded, queries)
    # removals change the live counts (and the idf) the same way
    for image_id in ("im1", "im40", "im77"):
        single.remove(image_id)
        next(p for p in parts if image_id in p).remove(image_id)
    sharded = ShardedDatabase(parts)
    _assert_same(single, sharded, queries)
    if idf:
        np.testing.assert_array_equal(sharded.idf(), single.idf())


@pytest.mark.parametrize("kernel", ["asmk", "vlad"])
def test_sharded_other_kernels(kernel):
    from d2r.distributed import ShardedDatabase, build_shards
    from d2r.index import Database

    book, images, queries = _corpus(seed=7)
    single = Database.create(None, book, kernel=kernel)
    single.add_batch(images)
    # VLAD scores are float32 GEMV products, whose last bit depends on the matrix's row count (BLAS blocking)
    _assert_same(single, ShardedDatabase(build_shards(images, 3, book, kernel=kernel)), queries,
                 atol=1e-6 if kernel == "vlad" else 0.0)


def test_sharded_refuses_mismatched_shards(tmp_path):
    from d2r.codebook import Codebook
    from d2r.distributed import ShardedDatabase, build_shards

    book, images, _ = _corpus(seed=3)
    a, b = build_shards(images, [tmp_path / "a", tmp_path / "b"], book)
    with pytest.raises(ValueError, match="alpha"):
        ShardedDatabase([a, build_shards(images[:5], 1, book, alpha=2.0)[0]])
    other = Codebook(np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32))
    with pytest.raises(ValueError, match="codebook"):
        ShardedDatabase([tmp_path / "a", build_shards(images[:5], 1, other)[0]])
    with pytest.raises(FileNotFoundError, match="shard not found"):
        ShardedDatabase([tmp_path / "a", tmp_path / "missing"])
    with pytest.raises(ValueError, match="ray=True"):
        ShardedDatabase([tmp_path / "a", "10.0.0.1:/data/shard"])
    with pytest.raises(FileExistsError):
        build_shards(images, [tmp_path / "a"], book)


@pytest.mark.parametrize("idf", [False, True])
def test_sharded_on_ray_actors(cluster, tmp_path, idf):
    from d2r.distributed import ShardedDatabase, build_shards
    from d2r.index import Database

    book, images, queries = _corpus(seed=21)
    cfg = dict(mode="search", idf=idf)
    single = Database.create(None, book, **cfg)
    single.add_batch(images)
    paths = [tmp_path / f"shard{s}" for s in range(4)]
    build_shards(images, paths, book, **cfg)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        ShardedDatabase([paths[0], tmp_path / "missing"], ray=True)
    with ShardedDatabase(paths, ray=True) as sharded:
        _assert_same(single, sharded, queries)
        batch = sharded.search_batch(queries, 10)
        assert [list(r.ids) for r in batch] == [list(single.search(q, 10).ids) for q in queries]


# ---- real photos: sharded engines, distributed extraction --------------------------------------------------
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Ten scikit-image photos (some two views of one scene: a crop and a flip) and one broken file."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "brick"):
        img = np.asarray(getattr(skdata, name)())
        Image.fromarray(img).save(folder / f"{name}.png")
    Image.fromarray(np.asarray(skdata.astronaut())[40:400, 60:460]).save(folder / "astronaut_crop.png")
    Image.fromarray(np.asarray(skdata.coffee())[:, ::-1].copy()).save(folder / "coffee_flip.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def _engine_config():
    return {"features": {"name": "rootsift", "options": {"max_features": 300}},
            "codebook": {"path": str(CODEBOOK)}, "index": {"mode": "aggregation"}}


def test_sharded_engines_search_like_one_engine(cluster, photos, tmp_path, capsys):
    import json

    from d2r.cli import main
    from d2r.distributed import shard_bounds
    from d2r.engine import Engine
    from d2r.features import list_images

    pairs = [p for p in list_images(photos) if p[0] != "broken"]
    Engine.create(tmp_path / "one", _engine_config()).index(pairs, progress=False)
    bounds = shard_bounds(len(pairs), 2)
    shards = [tmp_path / f"shard{s}" for s in range(2)]
    for s, path in enumerate(shards):
        Engine.create(path, _engine_config()).index(pairs[bounds[s]:bounds[s + 1]], progress=False)

    def hits(*index):
        args = ["search", str(photos / "astronaut_crop.png"), "--top-k", "10", "--json", "--quiet"]
        for i in index:
            args += ["--index", str(i)]
        assert main(args) == 0
        return json.loads(capsys.readouterr().out)["hits"]

    one = hits(tmp_path / "one")
    assert one[0]["image_id"] == "astronaut_crop" and one[1]["image_id"] == "astronaut"
    assert one[1]["inliers"] > 0 and one[1]["path"].endswith("astronaut.png")
    assert hits(*shards) == one
    from d2r.distributed import ShardedEngine

    with ShardedEngine(shards, ray=True) as engine:  # shards held by Ray actors; features fetched from them
        got = engine.search(photos / "astronaut_crop.png", top_k=10)
    assert [h.to_dict() for h in got] == one
    assert main(["search", str(photos / "coffee.png"), "--index", str(shards[0]), "--index",
                 str(tmp_path / "missing"), "--quiet"]) == 1
    assert "shard not found" in capsys.readouterr().err


def _same_store(a, b):
    from d2r.features import FeatureStore

    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    ids = sa.ids()
    assert len(ids) == len(set(ids)) and sorted(ids) == sorted(sb.ids())
    for image_id in ids:
        fa, fb = sa.get(image_id), sb.get(image_id)
        for name in ("locations", "scales", "scores", "descriptors"):
            np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name))
    assert sa.failures.keys() == sb.failures.keys()
    return ids


def test_distributed_extraction_equals_one_process(cluster, photos, tmp_path, capsys):
    import json

    from d2r.cli import main

    common = ["extract", "--images", str(photos), "--features", "rootsift", "--max-features", "300", "--quiet",
              "--json"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 3  # partial: one broken photo
    one = json.loads(capsys.readouterr().out)
    assert main(common + ["--out", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 3
    got = json.loads(capsys.readouterr().out)
    assert (got["extracted"], got["failed"], got["workers"]) == (one["extracted"], 1, 2)
    ids = _same_store(tmp_path / "ray", tmp_path / "one")
    assert len(ids) == 10
    assert main(common + ["--out", str(tmp_path / "ray"), "--ray"]) == 0  # resumed: nothing left to do
    again = json.loads(capsys.readouterr().out)
    assert (again["extracted"], again["skipped"]) == (0, 11)
    # more workers than the cluster's 2 CPUs: they share them instead of waiting forever
    assert main(common + ["--out", str(tmp_path / "ray5"), "--ray", "--workers", "5"]) == 3
    assert json.loads(capsys.readouterr().out)["workers"] == 5
    _same_store(tmp_path / "ray5", tmp_path / "one")
    assert main(common + ["--out", str(tmp_path / "bad"), "--ray", "--gpus-per-worker", "-1"]) == 2
    assert main(common + ["--out", str(tmp_path / "bad"), "--ray", "--gpus-per-worker", "0.5"]) == 1
    assert "needs more GPUs than the Ray cluster has (0)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_killed_worker_loses_and_duplicates_nothing(cluster, photos, tmp_path):
    import os
    import threading
    import time

    from d2r.distributed import extract
    from d2r.distributed.extract import ACTOR_PREFIX
    from d2r.build import extract_to_store
    from d2r.features import FeatureStore, get_extractor, list_images

    pairs = [(f"{i}-{c}", p) for i, p in list_images(photos) for c in range(4)]
    extract_to_store(pairs, get_extractor("rootsift", max_features=200), tmp_path / "one", progress=False)
    out, result = tmp_path / "ray", {}

    def run():
        result.update(extract(pairs, out, "rootsift", options={"max_features": 200}, workers=2, batch_size=1,
                              shard_bytes=1, progress=False))

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill worker 0 once a few images are committed
        try:
            if len(FeatureStore.open(out)) >= 3:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.005)
    ray.kill(ray.get_actor(f"{ACTOR_PREFIX}{os.getpid()}-0"), no_restart=True)
    thread.join(300)
    assert result["restarts"] == 1 and result["failed"] == 4
    assert len(_same_store(out, tmp_path / "one")) == 40
    again = extract(pairs, out, "rootsift", options={"max_features": 200}, progress=False)
    assert (again["extracted"], again["skipped"]) == (0, 44)


@pytest.mark.dev
@pytest.mark.slow
def test_dev_photos_killed_driver_then_rerun_equals_one_process(bench_dev, tmp_path):
    """`d2r extract --ray` on the dev photos, its driver (and so its local Ray) killed mid-run, then run
    again: the store equals the single-process one (same ids, same arrays, nothing duplicated)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from d2r.cli import main

    images = bench_dev / "images"
    common = ["extract", "--images", str(images), "--features", "rootsift", "--max-side", "512",
              "--max-features", "300", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "d2r"] + common + ["--out", str(out), "--ray", "--workers", "2",
                                                    "--shard-mb", "0.2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        committed = 0
        while time.monotonic() < deadline and proc.poll() is None and committed < 40:
            try:
                committed = json.loads((out / "manifest.json").read_text())["num_images"]
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 40 <= committed < 367
    assert subprocess.run(cmd, timeout=600).returncode == 0
    assert len(_same_store(out, tmp_path / "one")) == 367


@pytest.mark.slow
def test_sampling_on_workers_equals_one_machine(cluster, photos, tmp_path, capsys):
    from d2r.cli import main
    from d2r.codebook import Codebook
    from d2r.distributed import sample_descriptors as sample_ray
    from d2r.build import extract_to_store
    from d2r.features import get_extractor, list_images
    from d2r.codebook.kmeans import load_training_descriptors, sample_descriptors

    extract_to_store(photos, get_extractor("rootsift", max_features=300), tmp_path / "store", progress=False)
    from d2r.features import FeatureStore

    one, info1 = sample_descriptors(FeatureStore.open(tmp_path / "store"), per_image=50, max_total=300,
                                    seed=4, progress=False)
    got, info2 = sample_ray(tmp_path / "store", per_image=50, max_total=300, seed=4, progress=False, block=3)
    np.testing.assert_array_equal(got, one)
    assert {k: info2[k] for k in info1} == info1
    # images extracted on the workers; the broken file fails there and keeps its place in the seeding
    spec = {"name": "rootsift", "options": {}}
    x1, m1 = load_training_descriptors(images=photos, per_image=40, seed=2, progress=False)
    x2, m2 = load_training_descriptors(
        images=photos, per_image=40, seed=2, progress=False,
        sampler=lambda src, **kw: sample_ray(src, features=spec, block=2, **kw))
    np.testing.assert_array_equal(x2, x1)
    assert m2 == m1 and m1["training_images_failed"] == 1 and m1["training_images"] == 10
    common = ["train-codebook", "--images", str(photos), "-k", "12", "--iterations", "3", "--quiet",
              "--sample-per-image", "40", "--json"]
    assert main(common + ["--out", str(tmp_path / "one.npz")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray.npz"), "--ray"]) == 0
    np.testing.assert_allclose(Codebook.load(tmp_path / "ray.npz").centroids,
                               Codebook.load(tmp_path / "one.npz").centroids, rtol=0, atol=1e-5)
    assert len(list_images(photos)) == 11
    capsys.readouterr()
