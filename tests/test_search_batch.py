"""Many queries per process: ``Engine.search_batch`` and multi-image ``d2r search``."""

import json

import numpy as np
import pytest
from PIL import Image

import d2r.cli
from d2r.engine import Engine
from d2r.engine.config import EngineConfig
from tests.corpus import textured


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for g in range(3):  # three scenes, three shifted views each
        base = textured(rng, 240, 320)
        for i in range(3):
            Image.fromarray(np.roll(base, 16 * i, axis=1)).save(folder / f"s{g}_{i}.png")
    cfg = EngineConfig.from_dict({"features": {"options": {"max_features": 300}},
                                  "codebook": {"size": 32, "iterations": 3}, "rerank": {"num_to_rerank": 6}})
    engine = Engine.create(root / "eng", cfg)
    engine.index(folder, progress=False)
    (folder / "broken.png").write_bytes(b"not an image")
    return engine, folder


def test_search_batch_equals_one_by_one(small_engine):
    engine, folder = small_engine
    queries = [folder / f"s{g}_{i}.png" for g in range(3) for i in (0, 2)] + [folder / "broken.png"]
    for workers in (1, 3):
        got = engine.search_batch(queries, top_k=4, workers=workers)
        assert len(got) == len(queries)
        assert isinstance(got[-1], Exception) and "broken.png" in str(got[-1])
        for q, hits in zip(queries[:-1], got[:-1]):
            want = engine.search(q, top_k=4)
            assert [(h.image_id, h.score, h.inliers) for h in hits] == [(h.image_id, h.score, h.inliers)
                                                                         for h in want]
            assert {h.image_id for h in hits[:3]} == {f"{q.stem[:2]}_{i}" for i in range(3)}


def test_cli_several_images_folders_and_list_files(small_engine, tmp_path, capsys):
    engine, folder = small_engine
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.open(folder / "s1_1.png").save(sub / "q.png")
    listing = tmp_path / "queries.txt"
    listing.write_text(f"# two queries\n{folder / 's2_0.png'}\n\n{folder / 'broken.png'}\n")
    code = d2r.cli.main(["search", str(folder / "s0_0.png"), str(sub), str(listing), "--index", str(engine.path),
                         "--json", "--top-k", "3", "--workers", "2"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 3 and "broken.png" in err and "Traceback" not in err  # one bad query: reported, exit 3 (partial)
    assert [line["query"] for line in lines] == [str(folder / "s0_0.png"), str(sub / "q.png"),
                                                 str(folder / "s2_0.png"), str(folder / "broken.png")]
    assert "error" in lines[3] and "hits" not in lines[3]
    for line, scene in zip(lines[:3], ["s0", "s1", "s2"]):
        assert {h["image_id"] for h in line["hits"]} == {f"{scene}_{i}" for i in range(3)}
    code = d2r.cli.main(["search", str(folder / "s0_0.png"), str(folder / "s1_0.png"), "--index",
                         str(engine.path), "--quiet"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.count("rank") == 2 and f"# {folder / 's1_0.png'}" in out
    code = d2r.cli.main(["search", str(folder / "s0_0.png"), str(sub), "--index", str(engine.path), "--bbox",
                         "1,1,50,50"])
    _, err = capsys.readouterr()
    assert code == 2 and "--bbox" in err  # a usage error: --bbox needs a single query
    empty = tmp_path / "empty"
    empty.mkdir()
    code = d2r.cli.main(["search", str(empty), "--index", str(engine.path)])
    _, err = capsys.readouterr()
    assert code == 1 and "no images" in err
