"""Regression tests for defects found by the second review round (the Python API and the scale paths): each
test failed before its fix."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import d2r
import d2r.cli
from d2r.engine import Engine
from tests.corpus import run_cli, write_photos

CODEBOOK = Path(__file__).resolve().parents[1] / "codebooks" / "rootsift-128d-k256-skimage-s0.npz"


def _unwritable_folder(tmp_path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if not Path("/proc/self").is_dir():
        pytest.skip("running as root without /proc: no folder root cannot write in")
    return Path("/proc")


def test_train_codebook_unwritable_out_fails_before_training(tmp_path, capsys):
    """`--out` in a folder that takes no new file was found only when saving, after the whole training."""
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).random((400, 16), dtype=np.float32))
    checkpoint = tmp_path / "ck.npz"  # written every iteration: absent when nothing was trained
    code, _, err = run_cli(capsys, "train-codebook", "--descriptors", x, "-k", 4, "--iterations", 2, "--quiet",
                        "--out", _unwritable_folder(tmp_path) / "cb.npz", "--checkpoint", checkpoint)
    assert code == 1 and "--out" in err and "cannot write in folder" in err, err
    assert not checkpoint.exists()
    code, _, err = run_cli(capsys, "train-codebook", "--descriptors", x, "-k", 4, "--iterations", 2, "--quiet",
                        "--out", tmp_path, "--force", "--checkpoint", checkpoint)
    assert code == 1 and f"--out {tmp_path}: is a folder" in err and not checkpoint.exists(), err


def test_index_add_lists_each_failed_image_once(tmp_path, capsys, caplog):
    """Without --quiet a failed image was listed twice: a WARNING log line and the `failed:` line."""
    photos = write_photos(tmp_path / "photos", ["p0", "p1"], 1)
    (photos / "bad.jpg").write_bytes(b"garbage")
    eng = tmp_path / "eng"
    assert d2r.cli.main(["index", "create", str(eng), "--codebook", str(CODEBOOK), "--quiet",
                         "--set", "features.options.max_features=200"]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "index", "add", eng, photos)
    logged = [r.getMessage() for r in caplog.records if "bad.jpg" in r.getMessage()]
    assert code == 3 and err.count("failed: ") == 1 and logged == [], (err, logged)


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


def test_engine_config_from_dict_takes_numpy_scalars():
    """EngineConfig.from_dict turned np.int64(8) into the string '8' ('expected an integer, got '8'')."""
    config = d2r.EngineConfig.from_dict({"batch_size": np.int64(8), "index": {"alpha": np.float32(2),
                                                                           "idf": np.True_},
                                         "features": {"options": {"max_features": np.int64(100)}}})
    assert (config.batch_size, config.index.alpha, config.index.idf) == (8, 2.0, True)
    json.dumps(config.to_dict())  # saved with the index: plain JSON


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    photos = write_photos(root / "photos", [f"p{i}" for i in range(4)], 5)
    engine = Engine.create(root / "eng", {"features": {"options": {"max_features": 200}},
                                          "rerank": {"num_to_rerank": 3}}, codebook=CODEBOOK)
    assert not engine.index(photos, progress=False).failed
    return engine, photos


@pytest.mark.parametrize("top_k", [-1, 0, 2.5, "3", True])
def test_engine_search_top_k_checked(small_engine, top_k):
    """Engine.search(top_k=-1) returned all hits but the last; 2.5 or '3' raised a TypeError from slicing."""
    engine, photos = small_engine
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        engine.search(photos / "p1.png", top_k=top_k)
    assert [h.rank for h in engine.search(photos / "p1.png", top_k=np.int64(2))] == [1, 2]


def _gldv2_csvs(tmp_path):
    (tmp_path / "index.csv").write_text("id\n0123456789abcdef\n")
    (tmp_path / "test.csv").write_text("id\nfedcba9876543210\n")
    (tmp_path / "solution.csv").write_text("id,images,Usage\nfedcba9876543210,0123456789abcdef,Public\n")
    (tmp_path / "binary.csv").write_bytes(b"\x00\x01\xff\xfe")
    return {k: tmp_path / f"{k}.csv" for k in ("index", "test", "solution", "binary")}


@pytest.mark.parametrize("bad", ["index-missing", "index-binary", "index-folder", "solution-binary"])
def test_bench_gldv2_unreadable_csv_named(tmp_path, capsys, bad):
    """An unreadable GLDv2 CSV gave '[Errno 2] No such file...' or "'utf-8' codec can't decode..." (no file
    named)."""
    csvs = _gldv2_csvs(tmp_path)
    which, problem = bad.split("-")
    csvs[which] = {"missing": tmp_path / "nope.csv", "binary": csvs["binary"], "folder": tmp_path}[problem]
    code, _, err = run_cli(capsys, "bench", "gldv2", "--index-csv", csvs["index"], "--test-csv", csvs["test"],
                        "--solution-csv", csvs["solution"], "--images-root", tmp_path,
                        "--out", tmp_path / "run",
                        "--codebook", CODEBOOK, "--quiet")
    assert code == 1 and f"error: {csvs[which]}: " in err and len(err.strip().splitlines()) == 1, err


def test_bench_out_that_is_a_file_refused_first(tmp_path, capsys):
    """`--out FILE` failed late with '[Errno 20] Not a directory: FILE/cache/db-...'."""
    csvs = _gldv2_csvs(tmp_path)
    code, _, err = run_cli(capsys, "bench", "gldv2", "--index-csv", csvs["index"], "--test-csv", csvs["test"],
                        "--solution-csv", csvs["solution"], "--images-root", tmp_path, "--out", csvs["test"],
                        "--codebook", CODEBOOK, "--quiet")
    assert code == 1 and f"--out {csvs['test']}: exists and is not a folder" in err, err


def test_engine_search_batch_top_k_checked_once(small_engine):
    """search_batch(top_k=-1) returned, per image, all hits but the last."""
    engine, photos = small_engine
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        engine.search_batch([photos / "p1.png", photos / "p2.png"], top_k=-1)


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


def test_similarity_of_raw_descriptors_is_a_clear_error():
    """d2r.similarity(x, y) on descriptor arrays raised AttributeError: 'numpy.ndarray' object has no
    attribute 'kernel'."""
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    agg = d2r.Aggregator(d2r.Codebook(np.eye(8, dtype=np.float32)))
    with pytest.raises(TypeError, match="Aggregated records"):
        d2r.similarity(x, agg(x))
    assert d2r.similarity(agg(x), agg(x)) == pytest.approx(1.0)


def test_search_featureless_query_listed_once(small_engine, tmp_path, capsys, caplog):
    """`d2r search blank.png good.png` listed the blank query twice: a WARNING line and the 'error:' line."""
    engine, photos = small_engine
    Image.new("RGB", (40, 40), (0, 0, 0)).save(tmp_path / "blank.png")
    code, out, err = run_cli(capsys, "search", tmp_path / "blank.png", photos / "p1.png", "--index", engine.path,
                          "--no-rerank", "--top-k", 1)
    logged = [r.getMessage() for r in caplog.records if "blank.png" in r.getMessage()]
    assert code == 3 and err.count("blank.png") == 1 and logged == [] and "p1" in out, (err, logged)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_extract_shard_mb_not_finite_is_usage_error(tmp_path, capsys, value):
    """`d2r extract --shard-mb inf` was 'unexpected error (OverflowError)', nan 'cannot convert float NaN'."""
    photos = write_photos(tmp_path / "photos", ["p0"], 6)
    code, _, err = run_cli(capsys, "extract", "--images", photos, "--features", "rootsift", "--out",
                        tmp_path / "store", "--shard-mb", value, "--quiet")
    assert code == 2 and "--shard-mb must be a positive number" in err, err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("command", ["index", "extract"])
def test_lock_timeout_nan_is_usage_error(tmp_path, capsys, command):
    """`--lock-timeout nan` was accepted and waited forever for a held lock."""
    photos = write_photos(tmp_path / "photos", ["p0"], 7)
    argv = (["index", "add", tmp_path / "eng", photos] if command == "index" else
            ["extract", "--images", photos, "--features", "rootsift", "--out", tmp_path / "store"])
    code, _, err = run_cli(capsys, *argv, "--lock-timeout", "nan", "--quiet")
    assert code == 2 and "--lock-timeout must be >= 0 seconds, got nan" in err, err


def test_gldv2_average_precision_hand_made():
    """AP by hand; a query without relevant images raised ZeroDivisionError."""
    from d2r.eval.gldv2 import average_precision

    assert average_precision(["a", "x", "b"], ["a", "b"]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(["x", "a", "a"], ["a"]) == pytest.approx(0.5)  # a repeat earns nothing
    assert average_precision(["a"], []) == 0.0


def test_engine_config_check_refuses_misspelled_extractor_option():
    """`EngineConfig.check()` accepted `features.options.max_featurs`; only Engine.create / the CLI saw it."""
    from d2r.engine.config import EngineConfig

    config = EngineConfig.from_dict({"features": {"options": {"max_featurs": 5}}})
    with pytest.raises(ValueError, match=r"^features\.options\.max_featurs: unknown option"):
        config.check()
    EngineConfig.from_dict({"features": {"options": {"max_features": 5}}}).check()


@pytest.mark.parametrize("images, expect", [(None, "got NoneType"), ({"a": "b.png"}, "got dict"),
                                            (5, "got int"), ([3], "got an item 3"),
                                            ([("a",)], "got an item")])
def test_engine_index_refuses_wrong_images_type(tmp_path, images, expect):
    """`Engine.index(None)` raised a TypeError from deep inside; a dict was read as paths (its keys)."""
    engine = Engine.create(tmp_path / "eng", {"features": {"name": "rootsift"}}, codebook=CODEBOOK)
    with pytest.raises(TypeError, match=r"^images: expected a folder, a list file, or a list of image paths "
                                        r"and \(image_id, path\) pairs, " + expect):
        engine.index(images, progress=False)
    assert len(engine) == 0 and not engine._failures


def test_engine_index_documented_forms(tmp_path):
    """Every form of `images` the docstring names still works: folder, list file, paths, pairs, iterators."""
    photos = Path(write_photos(tmp_path / "photos", ["p0", "p1", "p2", "p3"], 8))
    listing = tmp_path / "list.txt"
    listing.write_text(str(photos / "p1.png") + "\n")
    engine = Engine.create(tmp_path / "eng", {"features": {"name": "rootsift"}}, codebook=CODEBOOK)
    assert engine.index(str(listing), progress=False).failed == {}
    assert engine.index((p for p in [photos / "p0.png"]), progress=False).failed == {}
    assert engine.index([("pair", str(photos / "p2.png"))], progress=False).failed == {}
    assert engine.index(photos, progress=False).failed == {}
    assert "pair" in engine and len(engine) == 7, len(engine)  # ids differ by form: only "pair" is shared


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


def test_bench_gldv2_unreadable_image_is_partial_failure(tmp_path, capsys):
    """`d2r bench gldv2` with an unreadable image logged a WARNING and exited 0; now it is listed once as
    failed and the exit is 3 (partial), as `d2r index add`."""
    root = tmp_path / "gld"
    rng = np.random.default_rng(10)
    from tests.corpus import textured

    ids = ["aaa0", "aaa1", "aaa2", "bbb0"]
    for image_id in ids:
        folder = root / image_id[0] / image_id[1] / image_id[2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(textured(rng, 160, 200)).save(folder / f"{image_id}.jpg", quality=95)
    bad = root / "a" / "a" / "a" / "aaa2.jpg"
    bad.write_bytes(b"not an image")
    (tmp_path / "index.csv").write_text("id\naaa0\naaa1\naaa2\n")
    (tmp_path / "test.csv").write_text("id\nbbb0\n")
    (tmp_path / "solution.csv").write_text("id,images,Usage\nbbb0,aaa0,Public\n")
    code, _, err = run_cli(capsys, "bench", "gldv2", "--index-csv", tmp_path / "index.csv",
                           "--test-csv", tmp_path / "test.csv", "--solution-csv", tmp_path / "solution.csv",
                           "--images-root", root, "--out", tmp_path / "run", "--codebook", CODEBOOK,
                           "--quiet")
    assert code == 3 and err.count("failed: ") == 1 and f"failed: {bad}: " in err, err
    assert "WARNING" not in err and "partial failure: 1 image(s)" in err, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["failed"]) == [str(bad)] and metrics["dataset"]["indexed"] == 2


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


def test_bench_revisitop_unreadable_image_is_partial_failure(tmp_path, capsys):
    """`d2r bench revisitop` with an unreadable database image only warned and exited 0 (as gldv2 did)."""
    root = write_photos(tmp_path / "data", ["a0", "a1", "a2", "a3"], seed=11)
    bad = root / "a2.png"
    bad.write_bytes(b"not an image")
    gnd = {"imlist": ["a0", "a1", "a2", "a3"], "qimlist": ["a0", "a1"],
           "gnd": [{"easy": [1], "hard": [], "junk": []}, {"easy": [0], "hard": [], "junk": []}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    code, _, err = run_cli(capsys, "bench", "revisitop", "--gnd", tmp_path / "gnd.json", "--images-root", root,
                           "--out", tmp_path / "run", "--codebook", CODEBOOK, "--no-rerank", "--no-report",
                           "--quiet")
    assert code == 3 and err.count("failed: ") == 1 and f"failed: {bad}: " in err, err
    assert "partial failure: 1 image(s)" in err, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["failed"]) == [str(bad)] and metrics["dataset"]["indexed"] == 3
