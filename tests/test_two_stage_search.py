"""Two-stage search: a global-descriptor shortlist, then the local-feature (ASMK*) scores of the shortlist only,
then verification: the ``global`` config section, the restricted search, score fusion, and the engine and CLI
end to end (the last with the [learned] extra's shipped MobileNetV2 weights)."""

import json

import numpy as np
import pytest

from d2r.engine.config import EngineConfig
from d2r.query.pipeline import Stage, fuse
from tests.corpus import CODEBOOK, run_cli, small_config


# ---- the config section -------------------------------------------------------------------------------------
def test_the_global_section_is_off_by_default_and_any_global_option_turns_it_on():
    c = EngineConfig()
    assert c.global_.enabled is False and c.to_dict()["global"]["enabled"] is False
    assert EngineConfig.from_dict(c.to_dict()) == c  # round trip through engine.json's shape
    on = c.override({"global.backbone": "efficientnet_lite0"})
    assert on.global_.enabled and on.global_.backbone == "efficientnet_lite0"
    assert not c.override({"global.backbone": "mobilenet_v2", "global.enabled": False}).global_.enabled
    from_file = EngineConfig.from_dict({"global": {"shortlist": 50}})
    assert from_file.global_.enabled and from_file.global_.shortlist == 50
    assert EngineConfig.from_dict({"rerank": {"enabled": False}}).global_.enabled is False  # older engine.json


@pytest.mark.parametrize("section, message", [
    ({"shortlist": 0}, "global.shortlist must be a positive integer"),
    ({"weight": 1.5}, "global.weight must be in [0, 1]"),
    ({"pooling": "max-ish"}, "global.pooling: expected one of"),
    ({"backbone": "resnet9000"}, "global.backbone: expected one of"),
])
def test_a_bad_global_option_is_one_line_naming_it(section, message):
    with pytest.raises(ValueError) as e:
        EngineConfig.from_dict({"global": section}).check()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_field_name_is_not_a_section_name():
    with pytest.raises(ValueError, match="the section is called 'global'"):
        EngineConfig.from_dict({"global_": {"shortlist": 5}})


# ---- the restricted search and the fusion -------------------------------------------------------------------
@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """A database of 40 synthetic images on the shipped codebook (ASMK*)."""
    from d2r.codebook import Codebook
    from d2r.index.database import Database

    book = Codebook.load(CODEBOOK)
    rng = np.random.default_rng(3)
    db = Database.create(tmp_path_factory.mktemp("db") / "index", book)
    for i in range(40):
        x = book.centroids[rng.integers(0, book.size, 60)] + 0.05 * rng.standard_normal((60, book.dim))
        db.add(f"im{i:02d}", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    db.save()
    return db, book, rng


def test_a_search_within_a_shortlist_ranks_its_ids_with_the_whole_search_scores(database):
    db, book, rng = database
    for trial in range(20):
        x = book.centroids[rng.integers(0, book.size, 80)].astype(np.float32)
        whole = db.search(x, top_k=40)
        chosen = rng.choice(db.ids(), size=int(rng.integers(1, 15)), replace=False)
        listed = list(chosen) + ["not-in-the-database"]
        part = db.search(x, top_k=10, within=listed)
        keep = np.isin(whole.ids, chosen)
        assert part.ids.tolist() == whole.ids[keep][:10].tolist()
        np.testing.assert_array_equal(part.scores, whole.scores[keep][:10])
    assert len(db.search(x, top_k=5, within=[])) == 0


def test_fusion_ranks_by_the_weighted_sum_and_weight_zero_keeps_the_local_order():
    ids = np.array(["a", "b", "c"], object)
    stage = Stage(ids, np.array([0.9, 0.5, 0.1]), np.full(3, -1), np.zeros(3, np.int64), np.zeros(3, bool))
    g = {"a": 0.1, "b": 0.2, "c": 0.95}
    assert fuse(stage, g, 0.0) is stage
    fused = fuse(stage, g, 0.5)
    assert fused.ids.tolist() == ["c", "a", "b"]
    np.testing.assert_allclose(fused.scores, [0.525, 0.5, 0.35])
    assert fuse(stage, g, 1.0).ids.tolist() == ["c", "b", "a"]


# ---- end to end ---------------------------------------------------------------------------------------------
SAMPLES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "coins", "text"]


@pytest.fixture(scope="module")
def sample_photos(tmp_path_factory):
    """The bundled scikit-image photos, and a query: a resized crop of the coffee cup."""
    from PIL import Image
    skdata = pytest.importorskip("skimage.data")

    folder = tmp_path_factory.mktemp("photos")
    for name in SAMPLES:
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(folder / f"{name}.jpg", quality=92)
    img = Image.open(folder / "coffee.jpg")
    w, h = img.size
    query = folder.parent / "query.jpg"
    img.crop((w // 8, h // 10, w - w // 8, h - h // 6)).resize((w * 3 // 5, h * 3 // 5)).save(query)
    return folder, query


def _needs_backbone():
    pytest.importorskip("torch", reason='torch not installed (pip install -e ".[learned]")')
    from d2r.globaldesc import nets

    try:
        nets.shipped_weights("mobilenet_v2")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


GLOBAL = {"backbone": "mobilenet_v2", "size": 256, "shortlist": 3, "threads": 1}


def test_an_engine_searches_in_two_stages(sample_photos, tmp_path):
    _needs_backbone()
    from d2r.engine import Engine

    folder, query = sample_photos
    engine = Engine.create(tmp_path / "eng", small_config(**{"global": GLOBAL}))
    engine.index(folder, progress=False)
    assert engine.info()["global"]["vectors"] == len(SAMPLES)
    result = engine.query(query, top_k=5)
    assert list(result.stages)[:2] == ["global", "initial"] and len(result.stages["global"]) == 3
    assert set(result.stages["initial"].ids.tolist()) <= set(result.stages["global"].ids.tolist())
    assert result.final.ids[0] == "coffee" and "global" in result.timings
    assert engine.search(query, top_k=5)[0].image_id == "coffee"

    # removed images leave the global index too; a reopened engine searches the same way
    engine.remove(["astronaut"])
    reopened = Engine.open(tmp_path / "eng")
    assert reopened.info()["global"]["vectors"] == len(SAMPLES) - 1
    again = reopened.query(query, top_k=5)
    assert "astronaut" not in again.stages["global"].ids.tolist() and again.final.ids[0] == "coffee"

    # a damaged global index is named by check (one line, how to rebuild it)
    from d2r.engine.check import check_engine

    assert check_engine(tmp_path / "eng") == []
    seg = next(p for p in (tmp_path / "eng" / "global").iterdir() if p.name.startswith("seg-"))
    vectors = seg / "vectors.npy"
    saved = vectors.read_bytes()
    damaged = bytearray(saved)
    damaged[-3] ^= 0xFF
    vectors.write_bytes(bytes(damaged))
    problems = check_engine(tmp_path / "eng")
    assert [p["file"] for p in problems] == ["global/"] and "d2r index add" in problems[0]["problem"]
    vectors.write_bytes(saved)

    # vectors of other global options are refused, not mixed: one line naming the folder
    meta = json.loads((tmp_path / "eng" / "engine.json").read_text())
    meta["config"]["global"]["pooling"] = "gap"
    (tmp_path / "eng" / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        Engine.open(tmp_path / "eng").query(query)
    assert "global vectors of another extractor" in str(e.value) and str(tmp_path / "eng" / "global") in str(e.value)


def test_index_create_with_a_global_option_then_search_from_the_command_line(sample_photos, tmp_path, capsys):
    """What the README documents: `--set global.backbone=...` makes a two-stage engine; `d2r search` uses it."""
    _needs_backbone()
    folder, query = sample_photos
    eng = tmp_path / "eng"
    code, out, err = run_cli(capsys, "index", "create", eng, "--images", folder, "--codebook", CODEBOOK, "--quiet",
                             "--set", "global.backbone=mobilenet_v2", "--set", "global.size=256",
                             "--set", "global.shortlist=4", "--set", "features.options.max_features=300")
    assert code == 0, err
    code, out, err = run_cli(capsys, "search", query, "--index", eng, "--top-k", "3", "--json")
    assert code == 0, err
    hits = json.loads(out.splitlines()[0])["hits"]
    assert hits[0]["image_id"] == "coffee" and len(hits) <= 3
    code, out, err = run_cli(capsys, "index", "info", eng, "--json")
    assert code == 0 and json.loads(out)["global"]["vectors"] == len(SAMPLES)


def test_the_benchmark_runs_the_engines_two_stages(sample_photos, tmp_path, capsys):
    """`d2r bench revisitop` with the global section gives each query the global stage the engine gives it
    (the same shortlist, in order) and ranks only the shortlist after it: the benchmark runs the product's
    query path."""
    _needs_backbone()
    from d2r.engine import Engine

    folder, _ = sample_photos
    names = SAMPLES
    gnd = {"imlist": names, "qimlist": names[:3],
           "gnd": [{"easy": [], "hard": [], "junk": []} for _ in range(3)]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    sets = ["global.backbone=mobilenet_v2", "global.size=256", "global.shortlist=3", "global.threads=1",
            "features.options.max_features=200"]
    argv = ["bench", "revisitop", "--gnd", tmp_path / "gnd.json", "--images-root", folder, "--out", tmp_path / "run",
            "--codebook", CODEBOOK, "--no-rerank", "--no-report", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["ran"]["stages"][:2] == ["global", "initial"]
    shortlist = np.load(tmp_path / "run" / "ranks_global.npy")
    initial = np.load(tmp_path / "run" / "ranks_initial.npy")
    engine = Engine.create(tmp_path / "eng", small_config(**{"global": dict(GLOBAL, shortlist=3)}))
    engine.index(folder, progress=False)
    for q, name in enumerate(names[:3]):
        got = engine.query(folder / f"{name}.jpg", top_k=8, rerank=False, exclude=[name])
        assert [names[i] for i in shortlist[q] if i >= 0] == got.stages["global"].ids.tolist()
        assert set(initial[q][initial[q] >= 0].tolist()) <= set(shortlist[q].tolist())
