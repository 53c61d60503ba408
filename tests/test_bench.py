"""Benchmark runner: path resolution, query crops, config merging, GV ordering, and `d2r bench` end to end."""

import csv
import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from d2r import bench
from d2r.eval.datasets import IMAGE_SUFFIXES, gldv2_path, query_box, read_ids, resolve_image
from d2r.features.image import IMAGE_EXTENSIONS, crop, load_image
from d2r.cli import main
from d2r.features.base import LocalFeatures
from d2r.query.config import RerankConfig
from d2r.query.order import order_by_inliers
from d2r.query.verify import verify_ids
from tests.corpus import CODEBOOK, run_cli, write_photos

# Medium mAP of the CI configuration (RootSIFT, 300 features, 256 words trained on 50 descriptors per database
# image, ASMK*) measured 2026-11-27 on the dev set: 39.83 (Hard 16.85); first run 278 s, cached run 7 s on the
# shared 2-core box under load. The floor is 80% of it: a regression guard, not a target.
CI_MEDIUM_FLOOR = 32.0


# ---- pieces ---------------------------------------------------------------------------------------------------
def test_resolve_image_with_and_without_extension(tmp_path):
    (tmp_path / "jpg").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "jpg" / "all_souls_000013.jpg")
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    assert resolve_image(tmp_path / "jpg", "all_souls_000013") == tmp_path / "jpg" / "all_souls_000013.jpg"
    assert resolve_image(tmp_path, "jpg/all_souls_000013.jpg") == tmp_path / "jpg" / "all_souls_000013.jpg"
    assert resolve_image(tmp_path, "a") == tmp_path / "a.png"
    with pytest.raises(FileNotFoundError, match="'missing'"):
        resolve_image(tmp_path, "missing")


def test_resolve_image_knows_every_image_suffix(tmp_path):
    """Two suffix lists: the benchmark tried .jpg/.png/.jpeg only, while indexing lists .tif, .webp..."""
    Image.new("RGB", (20, 10)).save(tmp_path / "scan.TIF")
    assert resolve_image(tmp_path, "scan") == tmp_path / "scan.TIF"
    assert {e.upper() for e in IMAGE_EXTENSIONS} <= set(IMAGE_SUFFIXES)


def test_gldv2_path_layout(tmp_path):
    d = tmp_path / "0" / "a" / "f"
    d.mkdir(parents=True)
    Image.new("RGB", (20, 10)).save(d / "0af123.jpg")
    Image.new("RGB", (20, 10)).save(tmp_path / "xy.jpg")
    assert gldv2_path(tmp_path, "0af123") == d / "0af123.jpg"
    assert gldv2_path(tmp_path, "xy") == tmp_path / "xy.jpg"
    with pytest.raises(FileNotFoundError):
        gldv2_path(tmp_path, "abc999")


def test_query_box_rounds_like_revisitop():
    assert query_box(None) is None
    assert query_box([]) is None
    assert query_box([136.2, 34.5, 648.7, 955.49]) == (136, 34, 649, 955)  # round half to even, as Python
    with pytest.raises(ValueError, match="four finite"):
        query_box([1, 2, 3])
    with pytest.raises(ValueError, match="four finite"):
        query_box([1, 2, np.nan, 4])


def test_query_crop_matches_hand_crop(tmp_path, rng):
    """A revisitop query box crops the query image as by hand (rounded, clipped; outside the image: an error
    naming it)."""
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "q.png"
    Image.fromarray(pixels).save(path)

    def crop_query(bbx, name="query"):
        box = query_box(bbx)
        return load_image(path) if box is None else crop(load_image(path), box, name=name)

    np.testing.assert_array_equal(crop_query(None), pixels)
    np.testing.assert_array_equal(crop_query([10.4, 5.6, 30.2, 20.5]), pixels[6:20, 10:30])
    np.testing.assert_array_equal(crop_query([50, 30, 100, 100]), pixels[30:40, 50:60])  # clipped
    with pytest.raises(ValueError, match="q.png"):
        crop_query([70, 50, 80, 60], name=str(path))  # outside the image


def test_load_config_file_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("features: {name: rootsift, options: {max_features: 500}}\n"
                        "regions: {proposer: grid}\n"
                        "codebook: {size: 8192}\n"
                        "index: {kernel: asmk_star, normalize: false}\n"
                        "rerank: {descriptor_distance: 0.5}\n"
                        "qe: {method: hqe}\n")
    c = bench.load_config(cfg_file)
    assert (c.features.options, c.regions.proposer, c.codebook.size, c.index.normalize, c.rerank.enabled) == \
        ({"max_features": 500}, "grid", 8192, False, True)
    assert c.qe.method == "hqe" and c.rerank.method == "usac"  # untouched: the engine's default
    assert c.rerank.descriptor_distance == 0.5 and c.rerank.num_to_rerank == 100  # untouched default
    c2 = bench.load_config(cfg_file, {"codebook.size": 1024, "index.kernel": "asmk", "regions.proposer": None,
                                      "features.options.max_features": 300, "features.options.max_side": 512})
    assert (c2.codebook.size, c2.index.kernel, c2.regions.proposer) == (1024, "asmk", "grid")
    assert c2.features.options == {"max_features": 300, "max_side": 512}
    assert bench.load_config().to_dict() == bench.BenchConfig().to_dict()
    with pytest.raises(ValueError, match="no option 'sise'"):
        bench.load_config(cfg_file, {"codebook.sise": 3})
    with pytest.raises(ValueError, match="no section"):
        bench.load_config(None, {"nothing.size": 3})
    cfg_file.write_text("index: {kernal: asmk}\n")
    with pytest.raises(ValueError, match="kernal"):
        bench.load_config(cfg_file)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        c = bench.load_config(path)
        assert c.index.kernel in ("vlad", "asmk", "asmk_star"), path
        if "paper" in path.name:
            assert (c.features.name, c.index.normalize, c.rerank.descriptor_distance) == ("delf", False, 0.9), path
            assert c.features.options == {"max_side": None}, path  # the paper's DELF: never downscaled


def _features(rng, n, locations=None, descriptors=None):
    loc = rng.uniform(0, 200, (n, 2)).astype(np.float32) if locations is None else locations
    d = rng.normal(size=(n, 32)).astype(np.float32) if descriptors is None else descriptors
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return LocalFeatures(loc, np.ones(n, np.float32), np.ones(n, np.float32), d)


def test_order_by_inliers_hand_cases():
    """The first ``num_to_rerank`` non-junk ids by (inliers, initial score), the rest in input order."""
    ids = np.array([7, 3, 9, 1, 4, 8])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    inl = {7: 0, 3: 12, 9: 12, 1: 40, 4: 5}
    new, sc, il = order_by_inliers(ids, scores, inl, 4, junk=[9])
    assert new.tolist() == [1, 3, 4, 7, 9, 8]  # 9 is junk: never verified, keeps its place among the rest
    assert il.tolist() == [40, 12, 5, 0, -1, -1]
    assert sc.tolist() == [0.6, 0.8, 0.5, 0.9, 0.7, 0.4]
    new, _, il = order_by_inliers(ids, scores, {7: 5, 3: 5, 9: 5, 1: 6}, 4)  # equal inliers: score first
    assert new.tolist() == [1, 7, 3, 9, 4, 8] and il.tolist() == [6, 5, 5, 5, -1, -1]
    new, _, il = order_by_inliers(ids, scores, {}, 0)
    assert new.tolist() == ids.tolist() and (il == -1).all()


def test_verify_ids_puts_true_copies_first(rng):
    """Real RANSAC on shifted partial copies of the query: copies outrank unrelated images after ordering."""
    query = _features(rng, 60)
    db, copies = {}, set()
    for i in range(12):
        keep = rng.random(60) < (0.6 if i % 3 == 0 else 0.0)  # every third image is a shifted partial copy
        if keep.sum():
            copies.add(i)
        extra = _features(rng, 30)
        db[i] = LocalFeatures.concatenate([
            _features(rng, int(keep.sum()), query.locations[keep] * 1.1 + 5, query.descriptors[keep].copy()), extra],
            32)
    config = RerankConfig(method="official", num_to_rerank=12, descriptor_distance=0.5, workers=1)
    inl = verify_ids(query, list(range(12)), db.__getitem__, config)
    assert all(inl[i] > 10 for i in copies) and all(inl[i] == 0 for i in set(range(12)) - copies)
    ids = rng.permutation(12)
    new, _, _ = order_by_inliers(ids, np.sort(rng.random(12))[::-1], inl, 12)
    assert set(new[:len(copies)].tolist()) == copies


def test_read_ids(tmp_path):
    p = tmp_path / "index.csv"
    p.write_text("id,url\nabc,http://x\ndef,http://y\n")
    assert read_ids(p) == ["abc", "def"]
    p.write_text("image\nabc\n")
    assert read_ids(p) == ["abc"]
    p.write_text("id\n")
    with pytest.raises(ValueError, match="no image ids"):
        read_ids(p)


# ---- end to end -----------------------------------------------------------------------------------------------
def _run_dev(bench_dev, out, cache, json_file):
    argv = ["bench", "revisitop", "--gnd", str(bench_dev / "gnd.pkl"), "--images-root", str(bench_dev),
            "--features", "rootsift", "--max-features", "300", "--codebook-size", "256", "--codebook-sample", "50",
            "--kernel", "asmk_star",
            "--out", str(out), "--cache", str(cache), "--json-out", str(json_file), "--quiet"]
    t0 = time.perf_counter()
    assert main(argv) == 0
    return time.perf_counter() - t0, json.loads(json_file.read_text())


@pytest.mark.slow
@pytest.mark.dev
def test_bench_revisitop_dev_end_to_end(bench_dev, tmp_path):
    cache = tmp_path / "cache"
    t1, r1 = _run_dev(bench_dev, tmp_path / "run1", cache, tmp_path / "r1.json")
    for p in ("easy", "medium", "hard"):
        assert set(r1[p]) >= {"mAP", "mP@1", "mP@5", "mP@10"}
        assert all(0.0 <= r1[p][k] <= 100.0 for k in ("mAP", "mP@1", "mP@5", "mP@10"))
    assert set(r1) >= {"timing", "config", "index", "dataset"}
    assert r1["config"]["codebook"]["size"] == 256 and r1["config"]["features"]["options"] == {"max_features": 300}
    assert r1["config"]["codebook_trained_on"].startswith("database images")
    assert r1["dataset"]["query_in_database"] is True and r1["dataset"]["indexed"] == 367
    assert r1["medium"]["num_queries"] == 111
    assert r1["medium"]["mAP"] >= CI_MEDIUM_FLOOR, r1["medium"]
    saved = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert saved["medium"] == r1["medium"]
    assert (tmp_path / "run1" / "config.yaml").is_file()
    ranks = np.load(tmp_path / "run1" / "ranks.npy")
    assert ranks.shape == (111, 367)
    # Second run, same cache: features and codebook are reused, numbers identical, faster.
    t2, r2 = _run_dev(bench_dev, tmp_path / "run2", cache, tmp_path / "r2.json")
    assert r2["notes"]["database_extraction"]["extracted"] == 0
    assert r2["notes"]["database_extraction"]["skipped"] == 367
    assert "codebook_cached" in r2["notes"] and "train_codebook" not in r2["timing"]
    for p in ("easy", "medium", "hard"):
        assert r2[p] == r1[p]
    assert t2 < t1
    print(f"\nCI bench: first run {t1:.1f} s, cached run {t2:.1f} s, medium {r1['medium']['mAP']:.2f}, "
          f"hard {r1['hard']['mAP']:.2f}")


# A tiny GLDv2-layout dataset from dev photos: 3 landmarks with 2 index images + 1 test image each, 3 distractors.
_GROUPS = ("sacre_coeur", "bundler_et", "strecha_fountain")


@pytest.mark.slow
@pytest.mark.dev
def test_bench_gldv2_synthetic_end_to_end(bench_dev, tmp_path):
    groups = json.loads((bench_dev / "queries.json").read_text())
    by_group: dict = {}
    for name, q in groups.items():
        by_group.setdefault(q["group"], []).append(name)
    distractors = sorted(p.relative_to(bench_dev).as_posix()
                         for p in (bench_dev / "images").glob("dis_opencv/*") if p.is_file())[:3]
    root = tmp_path / "gld"
    index_rows, test_rows, solution = [], [], []

    def put(src, image_id):
        d = root / image_id[0] / image_id[1] / image_id[2]
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bench_dev / src, d / f"{image_id}.jpg")

    n = 0
    for g, group in enumerate(_GROUPS):
        names = sorted(by_group[group])[:3]
        idx = []
        for name in names[:2]:
            image_id = f"{n:03x}a{g}"
            n += 1
            put(name, image_id)
            idx.append(image_id)
            index_rows.append(image_id)
        test_id = f"f{g}e{g}"
        put(names[2], test_id)
        test_rows.append(test_id)
        solution.append((test_id, " ".join(idx), "Public" if g < 2 else "Private"))
    for k, name in enumerate(distractors):
        image_id = f"d{k}d"
        put(name, image_id)
        index_rows.append(image_id)
    put(distractors[0], "eee0")  # an ignored test image
    test_rows.append("eee0")
    solution.append(("eee0", "None", "Ignored"))
    for fname, rows in (("index.csv", index_rows), ("test.csv", test_rows)):
        (tmp_path / fname).write_text("id\n" + "\n".join(rows) + "\n")
    with open(tmp_path / "solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "images", "Usage"])
        w.writerows(solution)
    out = tmp_path / "run"
    argv = ["bench", "gldv2", "--index-csv", str(tmp_path / "index.csv"), "--test-csv", str(tmp_path / "test.csv"),
            "--solution-csv", str(tmp_path / "solution.csv"), "--images-root", str(root), "--max-features", "300",
            "--codebook-size", "64", "--rerank", "--rerank-distance", "0.5", "--out", str(out),
            "--json-out", str(tmp_path / "m.json"), "--quiet"]
    assert main(argv) == 0
    r = json.loads((tmp_path / "m.json").read_text())
    assert set(r) >= {"public", "private", "before_rerank", "timing", "config", "index"}
    assert r["public"]["num_queries"] == 2 and r["private"]["num_queries"] == 1
    for split in ("public", "private"):
        assert set(r[split]) >= {"mAP@100", "mP@1", "mP@5", "mP@10"}
    # Same-landmark photos against 3 distractors: every query finds its landmark at rank 1 or 2.
    assert r["public"]["mAP@100"] >= 50.0 and r["private"]["mAP@100"] >= 50.0, r
    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,images" and len(lines) == 1 + len(test_rows)
    assert all(len(line.split(",")[1].split(" ")) == len(index_rows) for line in lines[1:])
    assert r["dataset"]["indexed"] == len(index_rows)


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
