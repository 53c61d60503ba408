"""A sharded engine in one process (``ShardedEngine`` without Ray): read-only, counts and checks over every
shard, and a shard given twice refused."""

import pytest

import d2r.cli
from d2r.engine import Engine
from tests.corpus import new_engine, run_cli, small_config, write_photos


def test_sharded_engine_is_read_only_and_reports_all_shards(photos, tmp_path):
    """A ShardedEngine took writes (remove, index_store) that would change its first shard only, and its
    info, check and `in` looked at the first shard only."""
    from d2r.distributed import ShardedEngine
    from d2r.features import list_images

    pairs = list_images(photos)
    shards = [tmp_path / "s0", tmp_path / "s1"]
    for s, part in zip(shards, (pairs[:2], pairs[2:])):
        Engine.create(s, small_config()).index(part, progress=False)
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


def test_the_same_shard_twice_is_refused(tmp_path, capsys):
    """`d2r search Q --index E --index E` (or E and E/index) searched the shard twice: every hit twice."""
    photos = write_photos(tmp_path / "photos", ["p0", "p1"], 10)
    eng = new_engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    for other in (eng, eng / "index", tmp_path / "." / "eng"):
        code, out, err = run_cli(capsys, "search", photos / "p0.png", "--index", eng, "--index", other, "--quiet")
        assert code == 1 and not out and "the same shard as" in err and len(err.strip().splitlines()) == 1, err
