"""Everything downstream of the extractor with learned features (ALIKED, DISK), on small real photos: the feature
store round trip, codebook training (feature type recorded; a codebook of another feature type refused), ASMK*,
R-ASMK* with features re-extracted on crops, regional search, the CLI (`d2r index create --set
features.name=aliked` then `d2r search`, `d2r extract --ray`, `d2r bench revisitop --rerank-method lightglue`)
and a search with every network loaded while sockets are blocked (nothing touches the network)."""

import json
import pickle
import socket

import numpy as np
import pytest
from PIL import Image

from tests.corpus import run_cli
from tests.test_features_learned import needs_extra

pytestmark = needs_extra

SMALL = {"max_features": 200, "max_side": 160, "device": "cpu"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four scikit-image photos and a shifted crop of each (a true match per scene), JPEG."""
    from skimage import data

    root = tmp_path_factory.mktemp("learned_photos")
    pics = {"coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket(),
            "astronaut": data.astronaut()}
    for name, p in pics.items():
        h, w = p.shape[:2]
        Image.fromarray(p).save(root / f"{name}.jpg", quality=92)
        Image.fromarray(p[h // 10:, w // 8:]).save(root / f"{name}_crop.jpg", quality=92)
    return root


def _config(name="aliked", **extra):
    from d2r.engine.config import EngineConfig

    data = {"features": {"name": name, "options": dict(SMALL)}, "codebook": {"size": 16, "iterations": 3},
            "rerank": {"num_to_rerank": 4, "device": "cpu"}, "qe": {"method": "none"}, "workers": 2}
    for key, value in extra.items():  # sections merged one level deep
        data.setdefault(key, {}).update(value)
    return EngineConfig.from_dict(data)


@pytest.mark.parametrize("name", ["aliked", "disk"])
def test_engine_store_codebook_and_search(tmp_path, photos, name):
    from d2r.engine import Engine
    from d2r.features.store import FeatureStore

    eng = Engine.create(tmp_path / "eng", _config(name))
    report = eng.index(photos, progress=False)
    assert len(report.indexed) == 8 and not report.failed and report.codebook_trained
    book = eng.database.codebook
    assert book.metadata["feature"] == ("aliked-n16" if name == "aliked" else "disk") and book.dim == 128
    store = FeatureStore.open(tmp_path / "eng" / "features")
    again = eng.extract(photos / "rocket.jpg")
    got = store.get("rocket")
    for field in ("locations", "scales", "scores", "descriptors"):  # the store keeps the record bit for bit
        np.testing.assert_array_equal(getattr(got, field), getattr(again, field))
    assert got.descriptors.dtype == np.float32
    hits = Engine.open(tmp_path / "eng").search(photos / "chelsea_crop.jpg", top_k=3)
    assert {h.image_id for h in hits[:2]} == {"chelsea", "chelsea_crop"}
    assert hits[0].inliers >= eng.config.rerank.min_inliers


def test_codebook_of_another_feature_type_refused(tmp_path, photos):
    from pathlib import Path

    from d2r.engine import Engine

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ValueError, match="trained on 'rootsift' features, not 'aliked-n16'"):
        Engine.create(tmp_path / "a", _config(), codebook=root / "codebooks" / "rootsift-128d-k256-skimage-s0.npz")
    assert not (tmp_path / "a").exists()
    eng = Engine.create(tmp_path / "n16", _config())
    eng.index(photos, progress=False)
    book = eng.database.codebook
    with pytest.raises(ValueError, match="not 'aliked-n32'"):  # same dimension, another descriptor space
        Engine.create(tmp_path / "n32", _config(features={"options": dict(SMALL, variant="n32")}), codebook=book)
    with pytest.raises(ValueError, match="not 'disk'"):
        Engine.create(tmp_path / "disk", _config("disk"), codebook=book)


@pytest.mark.parametrize("mode", ["aggregation", "search"])
def test_regions_reextracted_on_crops(tmp_path, photos, mode):
    """R-ASMK* (aggregation) and regional search over grid boxes, ALIKED features re-extracted on each crop."""
    from d2r.engine import Engine
    from d2r.features.base import RegionFeatures

    cfg = _config(regions={"proposer": "grid", "reextract": True, "max_boxes": 3}, index={"mode": mode})
    eng = Engine.create(tmp_path / "eng", cfg)
    eng.index(photos, progress=False)
    f = eng.extract(photos / "coffee.jpg")
    assert isinstance(f, RegionFeatures) and f.num_regions > 1 and f.box_ids[0] == -1
    crop = eng.pipeline.extractor.extract(np.asarray(Image.open(photos / "coffee.jpg"))[
        int(f.boxes[1, 1]):int(f.boxes[1, 3]), int(f.boxes[1, 0]):int(f.boxes[1, 2])])
    assert len(f.region(1)) == len(crop)  # the box's own features, not the whole image's
    hits = eng.search(photos / "astronaut_crop.jpg", top_k=3)
    assert {h.image_id for h in hits[:2]} == {"astronaut", "astronaut_crop"}
    if mode == "search":
        assert hits[0].box is not None


def test_cli_index_create_then_search(tmp_path, photos, capsys):
    eng = tmp_path / "eng"
    code, _, err = run_cli(capsys, "index", "create", eng, "--set", "features.name=aliked",
                           "--set", "features.options.max_side=160", "--set", "features.options.max_features=200",
                           "--codebook-size", "16", "--images", photos, "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "search", photos / "coffee_crop.jpg", "--index", eng, "--top-k", "3",
                             "--json", "--quiet")
    assert code == 0, err
    hits = json.loads(out.strip().splitlines()[-1])["hits"]
    assert {h["image_id"] for h in hits[:2]} == {"coffee", "coffee_crop"}


def test_bench_revisitop_lightglue(tmp_path, photos, capsys):
    names = sorted(p.stem for p in photos.glob("*.jpg"))
    db = {n: i for i, n in enumerate(names)}
    queries = ["chelsea", "rocket"]
    gnd = {"imlist": [f"{n}.jpg" for n in names], "qimlist": [f"{q}.jpg" for q in queries],
           "gnd": [{"easy": [db[f"{q}_crop"]], "hard": [], "junk": [], "bbx": None} for q in queries]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    code, _, err = run_cli(capsys, "bench", "revisitop", "--gnd", tmp_path / "gnd.pkl", "--images-root", photos,
                           "--features", "aliked", "--max-features", "200", "--set", "features.options.max_side=160",
                           "--codebook-size", "16", "--codebook-iterations", "3", "--rerank", "--rerank-method",
                           "lightglue", "--num-to-rerank", "3", "--no-report", "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["config"]["rerank"]["method"] == "lightglue" and m["config"]["rerank"]["lightglue"] == "aliked"
    assert m["medium"]["mAP"] == pytest.approx(100.0)


def test_extract_ray_equals_one_machine(tmp_path, photos, capsys):
    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    from d2r.features.store import FeatureStore

    args = ["--features", "aliked", "--max-features", "200", "--max-side", "160", "--images", photos, "--quiet"]
    assert run_cli(capsys, "extract", *args, "--out", tmp_path / "one")[0] == 0
    code, _, err = run_cli(capsys, "extract", *args, "--out", tmp_path / "ray", "--ray", "--workers", "2")
    assert code == 0, err
    one, ray = FeatureStore.open(tmp_path / "one"), FeatureStore.open(tmp_path / "ray")
    assert sorted(ray.ids()) == sorted(one.ids()) and len(one.ids()) == 8
    for i in one.ids():  # an actor runs torch on its own thread count: float sums differ in the last bits
        np.testing.assert_allclose(one.get(i).descriptors, ray.get(i).descriptors, atol=1e-4)
        np.testing.assert_allclose(one.get(i).locations, ray.get(i).locations, atol=1e-2)
    code, _, err = run_cli(capsys, "extract", *args, "--out", tmp_path / "gpu", "--ray", "--gpus-per-worker", "0.5")
    assert code == 1 and "needs more GPUs than the Ray cluster has" in err  # GPU fractions: checked, no GPU here


def test_no_network_touched(tmp_path, photos, monkeypatch):
    """Every network (ALIKED, DISK, both LightGlues) loads from the installed files with sockets blocked."""
    from d2r.engine import Engine
    from d2r.query import lightglue

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(lightglue, "_MATCHERS", {})  # built afresh inside the block
    for name in ("aliked", "disk"):
        eng = Engine.create(tmp_path / name, _config(name, rerank={"method": "lightglue"}))
        eng.index(photos, progress=False)
        hits = eng.search(photos / "rocket_crop.jpg", top_k=2)
        assert hits[0].image_id in ("rocket", "rocket_crop") and hits[0].inliers > 0


def test_serve_searches_and_adds_with_learned_features(tmp_path, photos):
    """`d2r serve` on an ALIKED engine: a search by upload finds its scene, an uploaded image is indexed with the
    engine's extractor and found (the server process loads torch only because the engine asks for it)."""
    serve = pytest.importorskip("tests.test_serve", reason="d2r serve needs the serve extra and httpx")
    from d2r.engine import Engine

    Engine.create(tmp_path / "eng", _config("aliked", rerank={"method": "usac"})).index(photos, progress=False)
    server = serve.start_server(tmp_path / "eng", tmp_path / "server.log")
    try:
        c = server["client"]
        pixels = np.asarray(Image.open(photos / "chelsea.jpg"))
        h, w = pixels.shape[:2]
        r = c.post("/api/search", files={"file": ("q.jpg", serve._jpeg(pixels[: h * 3 // 4, : w * 3 // 4]))},
                   data={"top_k": "3"})
        assert r.status_code == 200, r.text
        assert {x["image_id"] for x in r.json()["hits"][:2]} == {"chelsea", "chelsea_crop"}
        assert r.json()["hits"][0]["inliers"] > 0
        from skimage import data

        r = c.post("/api/images", files={"file": ("cam.jpg", serve._jpeg(np.dstack([data.camera()] * 3)))},
                   data={"id": "cam"})
        assert r.status_code == 201, r.text
        r = c.post("/api/search", data={"id": "cam", "top_k": "1"})
        assert r.status_code == 200 and r.json()["hits"][0]["image_id"] == "cam", r.text
    finally:
        serve.stop_server(server)
