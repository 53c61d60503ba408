"""Regression tests for engine bookkeeping defects: locks after a failed write, re-importing removed images,
config defaults, duplicate inputs, `index check` / `repair` on engine folders, sharded engines."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import d2r.cli
from d2r.engine import Engine
from d2r.engine.config import EngineConfig
from tests.corpus import textured

CODEBOOK = Path(__file__).resolve().parents[1] / "codebooks" / "rootsift-128d-k256-skimage-s0.npz"


def _config(**extra):
    cfg = {"features": {"options": {"max_features": 200}}, "codebook": {"path": str(CODEBOOK)},
           "rerank": {"num_to_rerank": 5}, "batch_size": 2}
    cfg.update(extra)
    return cfg


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(4):
        Image.fromarray(textured(rng, 160, 200)).save(folder / f"im{i}.png")
    return folder


def _cli(capsys, *args):
    code = d2r.cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_failed_save_does_not_lock_the_process_out(photos, tmp_path):
    engine = Engine.create(tmp_path / "eng", _config())
    gen = json.loads((tmp_path / "eng" / "index" / "manifest.json").read_text())["generation"]
    blocker = tmp_path / "eng" / "index" / f"manifest-{gen + 1:08d}.json"
    blocker.mkdir()  # the next commit cannot write its generation file: the save fails after the adds
    (blocker / "x").write_text("x")
    with pytest.raises(OSError) as failure:  # kept: its traceback holds the failed call's objects
        engine.index(photos, progress=False)
    from d2r._lock import WriterLock

    with WriterLock(tmp_path / "eng" / "index", timeout=0):  # released although the failed database lives on
        pass
    (blocker / "x").unlink()
    blocker.rmdir()
    report = engine.index(photos, progress=False)  # the same process writes again (no LockedError)
    assert sorted(report.indexed) == [f"im{i}" for i in range(4)] and not report.failed
    assert engine.remove("im0") == 1
    assert len(Engine.open(tmp_path / "eng")) == 3
    del failure


def test_removed_images_come_back_from_the_store(photos, tmp_path, capsys):
    from d2r.features.store import FeatureStore

    engine = Engine.create(tmp_path / "eng", _config())
    with FeatureStore.create(tmp_path / "store", engine.pipeline.store_info()) as src:
        for p in sorted(photos.iterdir()):
            src.add(p.stem, engine.extract(p))
    assert len(engine.index_store(tmp_path / "store", progress=False).indexed) == 4
    engine.remove(["im1", "im2"])
    assert "im1" not in engine
    code, out, err = _cli(capsys, "index", "add", tmp_path / "eng", "--store", tmp_path / "store", "--json",
                          "--quiet")
    report = json.loads(out)
    assert code == 0 and report["indexed"] == 2 and report["skipped"] == 2, err
    engine = Engine.open(tmp_path / "eng")
    assert {"im1", "im2"} <= set(FeatureStore.open(tmp_path / "eng" / "features").ids())
    assert engine.search(photos / "im1.png", top_k=1)[0].image_id == "im1"


def test_index_store_reports_ids_the_store_lacks(photos, tmp_path):
    from d2r.features.store import FeatureStore

    engine = Engine.create(tmp_path / "eng", _config())
    with FeatureStore.create(tmp_path / "eng" / "features", engine.pipeline.store_info()) as own:
        own.add("im0", engine.extract(photos / "im0.png"))
    report = engine.index(photos, progress=False)  # im0 is stored already: not extracted again
    assert len(report.indexed) == 4 and not report.failed
    with engine._writing(0.0) as store:  # an id asked for that the store does not hold is a failure
        from d2r.engine import IndexReport

        report = IndexReport()
        engine._index_stored(store, ["im1", "ghost"], report, False, None)
    assert "ghost" in report.failed and "not in the feature store" in report.failed["ghost"]


def test_engine_config_keeps_engine_defaults(tmp_path):
    default = EngineConfig()
    assert default.rerank.method == "usac"
    assert EngineConfig.from_dict(default.to_dict()) == default
    assert EngineConfig.from_dict({}) == default
    partial = EngineConfig.from_dict({"rerank": {"num_to_rerank": 7}, "batch_size": 3})
    assert partial.rerank.method == "usac" and partial.rerank.num_to_rerank == 7
    assert partial.rerank.descriptor_distance == 0.4
    assert EngineConfig.from_dict({"rerank": None}).rerank == default.rerank
    assert EngineConfig.from_dict({"rerank": {"method": "official"}}).rerank.method == "official"
    delf = EngineConfig.from_dict({"features": {"name": "delf"}})
    assert delf.rerank.descriptor_distance == 0.9 and delf.rerank.method == "usac"
    (tmp_path / "c.yaml").write_text("rerank:\n  num_to_rerank: 9\n")
    assert EngineConfig.from_file(tmp_path / "c.yaml").rerank.method == "usac"


def test_the_same_file_twice_is_skipped_a_conflict_is_not(photos, tmp_path):
    engine = Engine.create(tmp_path / "eng", _config())
    p = photos / "im0.png"
    report = engine.index([("a", p), ("a", p), ("b", photos / "im1.png")], progress=False)
    assert sorted(report.indexed) == ["a", "b"] and report.skipped == 1 and not report.failed
    report = engine.index([("c", p), ("c", photos / "im2.png")], progress=False)
    assert report.indexed == ["c"] and "already used by" in report.failed[str(photos / "im2.png")]


def test_index_check_on_an_engine_without_an_index(photos, tmp_path, capsys):
    from d2r.features.store import FeatureStore

    eng = tmp_path / "eng"
    cfg = _config(codebook={"size": 16, "iterations": 2})  # no codebook file: no index until the first add
    engine = Engine.create(eng, cfg)
    with FeatureStore.create(eng / "features", engine.pipeline.store_info()) as store:
        store.add("im0", engine.extract(photos / "im0.png"))
    assert not (eng / "index").exists()
    code, out, err = _cli(capsys, "index", "check", eng, "--json")
    assert code == 0 and json.loads(out)["healthy"] and json.loads(out)["index"] is False, err
    code, out, err = _cli(capsys, "index", "check", eng)
    assert code == 0 and "no index yet" in out and not err
    shard = next((eng / "features").glob("shard-*ids*"))
    shard.write_bytes(shard.read_bytes()[:-3])  # a damaged store is still found
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "damaged" in err and "Traceback" not in err


def test_flag_combinations_are_usage_errors(tmp_path, capsys):
    def usage(*args):
        code, _, err = _cli(capsys, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (args, err)
        return lines[0]

    q = [tmp_path / "a.png", tmp_path / "b.png"]
    assert "--bbox" in usage("search", *q, "--index", tmp_path / "eng", "--bbox", "1,2,3,4")
    assert "--workers" in usage("search", q[0], "--index", tmp_path / "eng", "--workers", "0")
    assert "--port" in usage("serve", tmp_path / "eng", "--port", "70000")
    assert "--max-upload-mb" in usage("serve", tmp_path / "eng", "--max-upload-mb", "0")
    add = ("index", "add", tmp_path / "eng", "--store", tmp_path / "s")
    assert "--id-prefix" in usage(*add, "--id-prefix", "x/")
    assert "--retry-failed" in usage(*add, "--retry-failed")
    assert "--lock-timeout" in usage("index", "repair", tmp_path / "eng", "--lock-timeout", "-2")
    assert not (tmp_path / "eng").exists()


def test_store_remove_counts_buffered_images_and_drops_pending_failures(tmp_path):
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


def test_bools_are_not_integer_settings(photos, tmp_path, capsys):
    from d2r.query.expand import ExpansionConfig
    from d2r.query.verify import RerankConfig

    engine = Engine.create(tmp_path / "eng", _config())
    engine.index(photos, progress=False)
    with pytest.raises(ValueError, match="query_num_assignments"):
        engine.search(photos / "im0.png", query_num_assignments=True)
    assert engine.search(photos / "im0.png", top_k=1, query_num_assignments=1)[0].image_id == "im0"
    for bad in ({"batch_size": True}, {"workers": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad).check()
    with pytest.raises(ValueError, match="codebook.size"):
        EngineConfig(codebook=EngineConfig().codebook.replace(size=True)).check()
    with pytest.raises(ValueError, match="min_inliers"):
        RerankConfig(min_inliers=True).validate()
    with pytest.raises(ValueError, match="qe.top"):
        ExpansionConfig(top=True).validate()
    with pytest.raises(ValueError, match="qe.min_matches"):
        ExpansionConfig(min_matches=False).validate()
    with pytest.raises(SystemExit):
        d2r.cli.main(["search", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "none with --no-rerank" in help_text


def test_sharded_engine_is_read_only_and_reports_all_shards(photos, tmp_path):
    from d2r.distributed import ShardedEngine
    from d2r.features import list_images

    pairs = list_images(photos)
    shards = [tmp_path / "s0", tmp_path / "s1"]
    for s, part in zip(shards, (pairs[:2], pairs[2:])):
        Engine.create(s, _config()).index(part, progress=False)
    with ShardedEngine(shards) as engine:
        info = engine.info()
        assert info["images"] == 4 and [s["images"] for s in info["shards"]] == [2, 2]
        assert info["config"]["rerank"]["method"] == "usac" and len(engine) == 4
        assert "im3" in engine and "im0" in engine and "nope" not in engine
        for call in (lambda: engine.remove("im3"), lambda: engine.index_store(tmp_path / "s1" / "features"),
                     lambda: engine.index(photos)):
            with pytest.raises(ValueError, match="read-only"):
                call()
        assert engine.check() == []
        assert len(Engine.open(shards[0])) == 2 and len(Engine.open(shards[1])) == 2  # nothing removed
        seg = next((tmp_path / "s1" / "index").glob("seg*/*.npy"))
        seg.write_bytes(seg.read_bytes()[:-4])
        damaged = engine.check()
        assert damaged and all(d["file"].startswith(str(tmp_path / "s1")) for d in damaged)
