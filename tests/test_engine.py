"""End to end: the Engine API and the CLI on real photos, the bad-input corpus, and a killed indexer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import d2r.cli
from d2r.engine import Engine
from d2r.engine.config import EngineConfig
from d2r.features.image import crop
from tests.corpus import CODEBOOK, new_engine, run_cli, small_config, textured, write_corpus, write_photos

GROUPS = ["sacre_coeur", "bundler_et", "ocv_box"]


def _config(**extra):
    cfg = {"features": {"options": {"max_features": 400}}, "codebook": {"size": 256, "iterations": 5},
           "rerank": {"num_to_rerank": 20}, "batch_size": 8}
    cfg.update(extra)
    return EngineConfig.from_dict(cfg)


def _dev_subset(bench_dev, tmp_path, groups=GROUPS, distractors=8) -> Path:
    """A list file of some groups of the dev photos plus distractors (read in place, not copied)."""
    images = bench_dev / "images"
    paths = []
    for g in groups:
        paths += sorted((images / g).iterdir())
    paths += sorted((images / "dis_cbsd68").iterdir())[:distractors]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in paths))
    return listing


def _group(image_id: str) -> str:
    return Path(image_id).parts[-2] if "/" in image_id else image_id


@pytest.mark.dev
def test_api_create_index_search_reopen_add_remove(bench_dev, tmp_path):
    listing = _dev_subset(bench_dev, tmp_path, groups=GROUPS[:2])
    engine = Engine.create(tmp_path / "eng", _config())
    report = engine.index(listing, progress=False)
    assert report.codebook_trained and not report.failed and len(report.indexed) == len(engine) > 10
    query = sorted((bench_dev / "images" / "sacre_coeur").iterdir())[1]
    hits = engine.search(query, top_k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert sum("sacre_coeur" in h.path for h in hits[:5]) >= 4  # the query's group fills the top
    # the query photo itself is indexed: verified first, moved up by its inliers
    assert hits[0].ranked_by == "inliers" and hits[0].inliers >= engine.config.rerank.min_inliers

    again = Engine.open(tmp_path / "eng")
    assert len(again) == len(engine)
    assert [h.image_id for h in again.search(query, top_k=5)] == [h.image_id for h in hits]
    # add another group after reopening: its images become findable
    extra = sorted((bench_dev / "images" / "ocv_box").iterdir())
    report = again.index(extra, progress=False)
    assert len(report.indexed) == len(extra) and not report.codebook_trained
    found = again.search(extra[0], top_k=3)
    assert any("ocv_box" in h.path for h in found[:2])
    # nothing is redone on a repeated call
    assert len(again.index(extra, progress=False).indexed) == 0
    # remove: gone at once and after reopening
    gone = hits[0].image_id
    again.remove(gone)
    assert gone not in {h.image_id for h in again.search(query, top_k=len(again))}
    assert gone not in Engine.open(tmp_path / "eng")


@pytest.mark.dev
def test_regional_search_mode_reports_boxes(bench_dev, tmp_path):
    listing = _dev_subset(bench_dev, tmp_path, groups=["ocv_box", "bundler_et"], distractors=3)
    cfg = _config(regions={"proposer": "grid", "options": {"levels": 2}, "reextract": False},
                  index={"mode": "search"})
    engine = Engine.create(tmp_path / "eng", cfg)
    engine.index(listing, progress=False)
    query = sorted((bench_dev / "images" / "bundler_et").iterdir())[0]
    hits = engine.search(query, top_k=3, rerank=False)
    assert all(h.box is not None and len(h.box) == 4 for h in hits)
    assert all(h.inliers == -1 for h in hits)


def _cli(capsys, *args):
    return run_cli(capsys, *args)  # argparse's usage errors (exit 2) caught


@pytest.mark.dev
def test_cli_create_add_search_remove_info(bench_dev, tmp_path, capsys):
    images = bench_dev / "images"
    eng = tmp_path / "eng"
    listing = _dev_subset(bench_dev, tmp_path, groups=["bundler_et"], distractors=4)
    code, out, _ = _cli(capsys, "index", "create", eng, "--codebook-size", 128, "--images", listing, "--quiet",
                        "--json", "--set", 'features.options={"max_features": 300}')
    assert code == 0 and json.loads(out)["indexed"] == len(listing.read_text().splitlines())
    code, out, _ = _cli(capsys, "index", "add", eng, images / "ocv_box", "--quiet", "--json")
    assert code == 0 and json.loads(out)["indexed"] == 2
    query = sorted((images / "ocv_box").iterdir())[0]
    code, out, _ = _cli(capsys, "search", query, "--index", eng, "--top-k", 3, "--json")
    hits = json.loads(out)["hits"]
    assert code == 0 and len(hits) == 3 and hits[0]["image_id"] == "box"
    code, out, _ = _cli(capsys, "search", query, "--index", eng, "--bbox", "10,10,200,150", "--json")
    assert code == 0 and json.loads(out)["bbox"] == [10, 10, 200, 150]
    code, out, _ = _cli(capsys, "index", "remove", eng, "box", "--json")
    assert code == 0 and json.loads(out)["removed"] == 1
    code, out, err = _cli(capsys, "index", "remove", eng, "box")
    assert code == 1 and "not in the index" in err
    code, out, _ = _cli(capsys, "index", "info", eng, "--json")
    info = json.loads(out)
    assert code == 0 and info["images"] == len(listing.read_text().splitlines()) + 1
    code, out, _ = _cli(capsys, "index", "info", eng)
    assert "asmk_star" in out
    # usage errors exit 2, failures 1, with a message and no traceback
    with pytest.raises(SystemExit) as e:
        d2r.cli.main(["search"])
    assert e.value.code == 2
    code, _, err = _cli(capsys, "search", query, "--index", tmp_path / "missing")
    assert code == 1 and "no d2r engine" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "index", "create", eng)
    assert code == 1 and "already exists" in err


def test_bad_input_corpus(tmp_path, capsys):
    folder = tmp_path / "photos"
    kinds = write_corpus(folder)
    rng = np.random.default_rng(3)
    base = textured(rng, 300, 400)
    for i in range(3):  # good images: the same scene shifted, so they find each other
        Image.fromarray(np.roll(base, 20 * i, axis=1)).save(folder / f"good{i}.jpg")
    engine = Engine.create(tmp_path / "eng", _config(codebook={"size": 64, "iterations": 3}))
    report = engine.index(folder, progress=False)
    bad = {Path(p).name: reason for p, reason in report.failed.items()}
    assert set(bad) == {n for n, k in kinds.items() if k == "bad"}, bad
    for name, reason in bad.items():
        assert reason and len(reason) > 5, name
    indexed = set(report.indexed)
    assert {f"good{i}" for i in range(3)} <= indexed
    assert {Path(n).stem for n, k in kinds.items() if k in ("ok", "empty")} <= indexed
    # searching with each bad file: a clear error through the CLI, never a traceback
    for name, kind in kinds.items():
        code, out, err = _cli(capsys, "search", folder / name, "--index", tmp_path / "eng", "--json")
        if kind == "bad":
            assert code == 1 and name in err and "Traceback" not in err, (name, err)
        elif kind == "empty":  # no features: an error naming the file, never arbitrary hits
            assert code == 1 and name in err and "no local features" in err, (name, err)
            assert engine.search(folder / name) == []
        else:
            assert code == 0, (name, err)
            assert json.loads(out)["hits"]
    code, _, err = _cli(capsys, "search", folder / "missing.jpg", "--index", tmp_path / "eng")
    assert code == 1 and "missing.jpg" in err
    code, _, err = _cli(capsys, "search", folder / "good0.jpg", "--index", tmp_path / "eng", "--bbox",
                        "5000,5000,6000,6000")
    assert code == 1 and "outside" in err
    code, _, err = _cli(capsys, "search", folder / "good0.jpg", "--index", tmp_path / "eng", "--bbox", "1,2,3")
    assert code == 2 and "four numbers" in err  # a malformed flag value: usage
    hits = engine.search(folder / "good0.jpg", top_k=3)
    assert {h.image_id for h in hits} == {"good0", "good1", "good2"}
    # an explicit missing path among good ones is reported, the rest indexed
    report = engine.index([folder / "nope.jpg", folder / "good0.jpg"], progress=False)
    assert "no such file" in report.failed[str(folder / "nope.jpg")]


def test_crop_rules():
    pixels = np.zeros((10, 20, 3), np.uint8)
    assert crop(pixels, (2.4, 1.6, 12.5, 9)).shape == (7, 10, 3)
    assert crop(pixels, (-5, -5, 100, 100)).shape == (10, 20, 3)  # clipped to the image
    for bad in [(5, 5, 5, 9), (30, 0, 40, 5), (1, 2, 3), (0, 0, float("nan"), 4)]:
        with pytest.raises(ValueError):
            crop(pixels, bad)


KILLED = """
import sys
from d2r.engine import Engine
engine = Engine.open(sys.argv[1])
engine.index(sys.argv[2], progress=False, on_done=lambda ids: print("DONE " + " ".join(ids), flush=True))
"""


@pytest.mark.dev
def test_killed_indexer_keeps_every_reported_image(bench_dev, tmp_path):
    listing = _dev_subset(bench_dev, tmp_path, groups=["sacre_coeur", "bundler_et"], distractors=10)
    engine = Engine.create(tmp_path / "eng", _config(batch_size=4))
    first = listing.read_text().splitlines()[:6]
    engine.index(first, progress=False)  # a codebook exists: the child goes straight to batched indexing
    script = tmp_path / "child.py"
    script.write_text(KILLED)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "eng"), str(listing)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    reported = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("DONE"):
            reported += line.split()[1:]
            if len(reported) >= 4:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert reported, "the child reported nothing before it was killed"
    reopened = Engine.open(tmp_path / "eng")
    assert all(i in reopened for i in reported)
    # and a repeated run finishes the job
    reopened.index(listing, progress=False)
    assert len(reopened) == len(listing.read_text().splitlines())


def test_engine_bookkeeping_edges(tmp_path, capsys):
    rng = np.random.default_rng(5)
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    base = textured(rng, 300, 400)
    for i in range(3):
        Image.fromarray(np.roll(base, 15 * i, axis=0)).save(a / f"im{i}.png")
    Image.fromarray(textured(rng, 300, 400)).save(b / "im0.png")  # same id as A/im0.png, another photo
    (a / "broken.jpg").write_bytes(b"not an image")
    # a bad config is refused before anything is written
    for bad in ({"index": {"mode": "serch"}}, {"index": {"kernel": "foo"}}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            Engine.create(tmp_path / "bad", _config(**bad))
        assert not (tmp_path / "bad" / "engine.json").exists()
    eng = tmp_path / "eng"
    code, out, _ = _cli(capsys, "index", "create", eng, "--codebook-size", 32, "--images", a, "--json", "--quiet")
    assert code == 3 and json.loads(out)["indexed"] == 3  # 3: partial failure (broken.jpg)
    assert Engine.open(eng).info()["failures"] == 1
    # the same id from another folder is a conflict, reported, never "skipped"
    code, out, err = _cli(capsys, "index", "add", eng, b, "--json", "--quiet")
    report = json.loads(out)
    assert report["skipped"] == 0 and "already used by" in report["failed"][str(b / "im0.png")]
    assert code == 1 and "none of the 1 image(s)" in err
    # ... which --id-prefix resolves; another spelling of an indexed folder gives the same (skipped) ids
    code, out, _ = _cli(capsys, "index", "add", eng, b, "--id-prefix", "B/", "--json", "--quiet")
    assert code == 0 and json.loads(out)["indexed"] == 1 and "B/im0" in Engine.open(eng)
    code, out, _ = _cli(capsys, "index", "add", eng, tmp_path / "B" / ".." / "A" / ".", "--json", "--quiet")
    assert json.loads(out)["skipped"] == 4 and json.loads(out)["indexed"] == 0  # 3 indexed + 1 known failure
    # a single image path is an image, not a list file
    Image.fromarray(textured(rng, 200, 300)).save(tmp_path / "single.jpg")
    code, out, _ = _cli(capsys, "index", "add", eng, tmp_path / "single.jpg", "--json", "--quiet")
    assert code == 0 and json.loads(out)["indexed"] == 1
    # a repaired file is indexed on retry and leaves the failure list
    Image.fromarray(textured(rng, 200, 300)).save(a / "broken.jpg", format="JPEG")
    code, out, _ = _cli(capsys, "index", "add", eng, a, "--retry-failed", "--json", "--quiet")
    assert json.loads(out)["indexed"] == 1 and Engine.open(eng).info()["failures"] == 0  # conflict resolved
    # removing the same id twice in one call is one removal; an unknown id is a message, not a traceback
    code, out, err = _cli(capsys, "index", "remove", eng, "im1", "im1", "--json")
    assert code == 0 and json.loads(out)["removed"] == 1
    # its features went too: the id comes back with another file, described afresh
    from d2r.features.store import FeatureStore

    assert "im1" not in FeatureStore.open(eng / "features") and "im0" in FeatureStore.open(eng / "features")
    assert not (eng / "features.new").exists() and not (eng / "features.old").exists()
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(textured(rng, 200, 300)).save(other / "im1.png")
    code, out, _ = _cli(capsys, "index", "add", eng, other, "--json", "--quiet")
    assert code == 0 and json.loads(out)["indexed"] == 1
    assert Engine.open(eng).search(other / "im1.png", top_k=1)[0].image_id == "im1"
    assert Engine.open(eng).remove("im1") == 1
    code, _, err = _cli(capsys, "index", "remove", eng, "im1")
    assert code == 1 and "not in the index" in err


def test_failed_save_does_not_lock_the_process_out(photos, tmp_path):
    """A save that failed after the adds (the next generation file could not be written) left the engine's
    database open with its writer lock held: the same process could never write again (LockedError)."""
    engine = Engine.create(tmp_path / "eng", small_config())
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
    """Images removed from an engine, then added back with `d2r index add --store`, were not re-imported:
    their shard was already in the engine's feature store under the same name, so it was not linked
    again and the images stayed out of the index."""
    from d2r.features.store import FeatureStore

    engine = Engine.create(tmp_path / "eng", small_config())
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
    """An image id to index that the feature store does not hold was silently dropped (neither indexed nor
    failed); an image the engine's store already holds must not be extracted again."""
    from d2r.features.store import FeatureStore

    engine = Engine.create(tmp_path / "eng", small_config())
    with FeatureStore.create(tmp_path / "eng" / "features", engine.pipeline.store_info()) as own:
        own.add("im0", engine.extract(photos / "im0.png"))
    report = engine.index(photos, progress=False)  # im0 is stored already: not extracted again
    assert len(report.indexed) == 4 and not report.failed
    with engine._writing(0.0) as store:  # an id asked for that the store does not hold is a failure
        from d2r.engine import IndexReport

        report = IndexReport()
        engine._index_stored(store, ["im1", "ghost"], report, False, None)
    assert "ghost" in report.failed and "not in the feature store" in report.failed["ghost"]


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
    """The type check of `images` (which raised from deep inside on None, and read a dict as paths) must
    refuse no documented form: folder, list file, paths, pairs, iterators."""
    photos = Path(write_photos(tmp_path / "photos", ["p0", "p1", "p2", "p3"], 8))
    listing = tmp_path / "list.txt"
    listing.write_text(str(photos / "p1.png") + "\n")
    engine = Engine.create(tmp_path / "eng", {"features": {"name": "rootsift"}}, codebook=CODEBOOK)
    assert engine.index(str(listing), progress=False).failed == {}
    assert engine.index((p for p in [photos / "p0.png"]), progress=False).failed == {}
    assert engine.index([("pair", str(photos / "p2.png"))], progress=False).failed == {}
    assert engine.index(photos, progress=False).failed == {}
    assert "pair" in engine and len(engine) == 7, len(engine)  # ids differ by form: only "pair" is shared


def _photos(folder, n, seed=7, size=(160, 200)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(textured(rng, *size)).save(folder / f"im{i}.png")
    return folder


def test_a_failed_create_keeps_what_it_extracted(tmp_path, capsys, monkeypatch):
    """A failed `index create --images` deleted the new folder and every feature already
    extracted into it (`shutil.rmtree` on any exception)."""
    photos = _photos(tmp_path / "photos", 3)
    eng = tmp_path / "eng"

    def fails(*args, **kwargs):  # a failure after extraction (a full disk, a codebook that cannot train...)
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Engine, "_index_stored", fails)
        code, _, err = _cli(capsys, "index", "create", eng, "--codebook-size", 8, "--images", photos,
                            "--quiet")
    assert code == 1 and "No space left on device" in err and "3 extracted image(s) are kept" in err, err
    assert f"`d2r index add {eng} {photos}`" in err
    from d2r.features.store import FeatureStore

    assert len(FeatureStore.open(eng / "features")) == 3
    code, out, err = _cli(capsys, "index", "add", eng, photos, "--json", "--quiet")
    assert code == 0 and json.loads(out)["indexed"] == 3, err


def test_interrupted_create_keeps_the_engine_and_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C during `d2r index create --images` deleted the whole engine folder (features extracted so far
    included), so nothing could be resumed."""
    photos = write_photos(tmp_path / "photos", ["p0", "p1", "p2"], 4)
    eng = tmp_path / "eng"

    def interrupted(*args, **kwargs):  # Ctrl-C after the features were extracted and flushed to the store
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Engine, "_index_stored", interrupted)
        code, _, err = run_cli(capsys, "index", "create", eng, "--codebook", CODEBOOK, "--images", photos, "--quiet")
    assert code == 130 and "interrupted" in err and f"d2r index add {eng} {photos}" in err
    assert (eng / "engine.json").is_file()
    from d2r.features.store import FeatureStore

    assert len(FeatureStore.open(eng / "features").ids()) == 3  # the extraction is kept
    code, out, err = run_cli(capsys, "index", "add", eng, photos, "--json", "--quiet")
    assert code == 0 and json.loads(out)["indexed"] == 3 and len(Engine.open(eng)) == 3, err


def test_a_codebook_the_images_cannot_give_is_refused_before_extraction(tmp_path, capsys):
    """`--codebook-size 100000` on 9 photos was refused only after extracting them all."""
    photos = _photos(tmp_path / "photos", 2)
    cfg = {"codebook": {"size": 1000, "sample_per_image": 300}}
    with pytest.raises(ValueError, match=r"codebook.size 1000: .*2 image\(s\) give at most 300 .*most 150"):
        Engine.create(tmp_path / "a", cfg, images=2)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="codebook.max_samples is 100"):
        Engine.create(tmp_path / "b", {"codebook": {"size": 1000, "max_samples": 100}})
    engine = Engine.create(tmp_path / "c", cfg)  # the number of images is known only when indexing
    with pytest.raises(ValueError, match="2 image"):
        engine.index(photos, progress=False)
    from d2r.features.store import FeatureStore

    assert len(FeatureStore.open(tmp_path / "c" / "features")) == 0  # nothing was extracted


@pytest.mark.slow
def test_a_relative_model_path_works_from_another_folder(tmp_path, monkeypatch):
    """`d2r index create eng --features delf --model m` saved "m" in engine.json: every later command run from
    another folder failed to find the model."""
    pytest.importorskip("tensorflow")
    from tests.test_delf import build_delf_model, two_layer_backbone

    from d2r.features.delf import DELF, DELFConfig

    dlf = DELF.from_keras(model=build_delf_model(two_layer_backbone(), attention_hidden=8),
                          config=DELFConfig(scales=(1.0,), score_threshold=0.0))
    dlf.fit_pca([np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)], dim=4)
    dlf.export(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert d2r.cli.main(["index", "create", "eng", "--features", "delf", "--model", "m", "--quiet"]) == 0
    saved = json.loads((tmp_path / "eng" / "engine.json").read_text())["config"]["features"]["model"]
    assert saved == str(tmp_path / "m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Engine.open(tmp_path / "eng").extractor is not None  # the model loads from another folder


def test_index_output_says_what_happened_once(tmp_path, capsys):
    """One `indexed N image(s), saved` line per batch, nothing about the codebook trained,
    the failed file's path printed twice, the label `d2r index:` for `index create`, and blank or tiny
    images counted as indexed without a word."""
    photos = _photos(tmp_path / "photos", 3)
    Image.new("RGB", (64, 64), (90, 90, 90)).save(photos / "blank.png")
    (photos / "empty.jpg").write_bytes(b"")
    eng = tmp_path / "eng"
    code, out, err = _cli(capsys, "index", "create", eng, "--codebook-size", 8, "--images", photos,
                          "--set", "batch_size=1", "--set", "codebook.iterations=2")
    assert code == 3, err
    lines = out.strip().splitlines()
    assert not any("saved" in line for line in lines)
    assert "trained a codebook of K=8 words on " in lines[0] and str(eng / "codebook.npz") in lines[0]
    assert "4 indexed, 0 skipped, 1 failed" in lines[1]
    empty = str(photos / "empty.jpg")
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert failed == [f"failed: {empty}: ImageError: empty file (0 bytes)"]
    assert "d2r index create: warning: 1 image(s) have no local features" in err and "blank" in err
    assert "d2r index create: partial failure" in err


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


def test_quiet_index_and_search_print_no_log_lines(tmp_path):
    """`--quiet` ("no progress bars or log lines") still printed a WARNING log line for each failed image or
    featureless query, besides the command's own listing of the same failure."""
    import os
    import subprocess
    import sys

    eng = new_engine(tmp_path)
    photos = write_photos(tmp_path / "photos", ["p0"], 6)
    (photos / "broken.jpg").write_bytes(b"not an image")
    Image.new("RGB", (200, 200), (90, 90, 90)).save(tmp_path / "blank.png")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    runs = [(["index", "add", eng, photos], 3), (["search", photos / "p0.png", tmp_path / "blank.png",
                                                  "--index", eng], 3)]
    for argv, expected in runs:
        proc = subprocess.run([sys.executable, "-m", "d2r", *map(str, argv), "--quiet"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == expected, proc.stderr
        assert "WARNING" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2, proc.stderr


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    photos = write_photos(root / "photos", [f"p{i}" for i in range(4)], 5)
    engine = Engine.create(root / "eng", {"features": {"options": {"max_features": 200}},
                                          "rerank": {"num_to_rerank": 3}}, codebook=CODEBOOK)
    assert not engine.index(photos, progress=False).failed
    return engine, photos


def test_search_featureless_query_listed_once(small_engine, tmp_path, capsys, caplog):
    """`d2r search blank.png good.png` listed the blank query twice: a WARNING line and the 'error:' line."""
    engine, photos = small_engine
    Image.new("RGB", (40, 40), (0, 0, 0)).save(tmp_path / "blank.png")
    code, out, err = run_cli(capsys, "search", tmp_path / "blank.png", photos / "p1.png", "--index", engine.path,
                          "--no-rerank", "--top-k", 1)
    logged = [r.getMessage() for r in caplog.records if "blank.png" in r.getMessage()]
    assert code == 3 and err.count("blank.png") == 1 and logged == [] and "p1" in out, (err, logged)


@pytest.mark.parametrize("top_k", [-1, 0, 2.5, "3", True])
def test_engine_search_top_k_checked(small_engine, top_k):
    """Engine.search(top_k=-1) returned all hits but the last; 2.5 or '3' raised a TypeError from slicing."""
    engine, photos = small_engine
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        engine.search(photos / "p1.png", top_k=top_k)
    assert [h.rank for h in engine.search(photos / "p1.png", top_k=np.int64(2))] == [1, 2]


def test_engine_search_batch_top_k_checked_once(small_engine):
    """search_batch(top_k=-1) returned, per image, all hits but the last."""
    engine, photos = small_engine
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        engine.search_batch([photos / "p1.png", photos / "p2.png"], top_k=-1)


def test_store_and_engine_mismatch_names_the_option(tmp_path, capsys):
    """The mismatch named two fingerprints, not the option that differs."""
    photos = _photos(tmp_path / "photos", 2)
    store = tmp_path / "store30"
    assert _cli(capsys, "extract", "--images", photos, "--features", "rootsift", "--out", store,
                "--max-features", 30, "--quiet")[0] == 0
    eng = tmp_path / "eng"
    assert _cli(capsys, "index", "create", eng, "--codebook-size", 8, "--quiet",
                "--set", "features.options.max_features=300")[0] == 0
    code, _, err = _cli(capsys, "index", "add", eng, "--store", store, "--quiet")
    assert code == 1 and "max_features: store 30, engine 300" in err and "fingerprint" not in err, err


def test_info_and_repair_explain_their_counts(tmp_path, capsys):
    """`info` showed more items than images (removed, not yet merged) unexplained;
    `repair` counted a dropped segment's removed images as lost and never mentioned --reindex."""
    photos = _photos(tmp_path / "photos", 3)
    eng = tmp_path / "eng"
    assert _cli(capsys, "index", "create", eng, "--codebook-size", 8, "--images", photos, "--quiet",
                "--set", "codebook.iterations=2")[0] == 0
    assert _cli(capsys, "index", "remove", eng, "im0", "--quiet")[0] == 0
    code, out, _ = _cli(capsys, "index", "info", eng)
    assert code == 0 and "1 removed image(s) among them" in out, out
    segment = json.loads((eng / "index" / "manifest.json").read_text())["segments"][0]["name"]
    victim = sorted((eng / "index" / segment).glob("*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:-8])
    code, out, err = _cli(capsys, "index", "repair", eng)
    assert code == 0, err
    assert "removed ones included" in out
    assert "2 image(s) of the feature store are no longer in the index" in out and "--reindex" in out, out
    code, out, _ = _cli(capsys, "index", "repair", eng, "--reindex", "--quiet", "--json")
    assert code == 0 and len(Engine.open(eng)) == 2


def test_index_check_on_an_engine_without_an_index(photos, tmp_path, capsys):
    """`d2r index check` of an engine without an index yet (no codebook file: none until the first add)
    reported the missing index as damage; it is healthy ("no index yet"), and a damaged feature store in it
    is still found."""
    from d2r.features.store import FeatureStore

    eng = tmp_path / "eng"
    cfg = small_config(codebook={"size": 16, "iterations": 2})  # no codebook file: no index until an add
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


@pytest.mark.parametrize("name", ["engine.json", "sources.json", "failures.json"])
def test_index_check_reads_the_engine_tables(tmp_path, capsys, name):
    """With engine.json, sources.json or failures.json garbled, every command failed on it but `d2r index check`
    said "healthy" (exit 0)."""
    photos = write_photos(tmp_path / "photos", ["p0"], 11)
    eng = new_engine(tmp_path)
    assert d2r.cli.main(["index", "add", str(eng), str(photos), "--quiet"]) == 0
    capsys.readouterr()
    (eng / name).write_text("{garbled")
    code, out, err = run_cli(capsys, "index", "check", eng, "--json")
    report = json.loads(out)
    assert code == 1 and not report["healthy"] and [d["file"] for d in report["damaged"]] == [name], err
    assert "invalid JSON" in report["damaged"][0]["problem"]


def test_search_batch_times_each_query(tmp_path, capsys):
    """`d2r search A B --json` gave every query the batch average as its seconds."""
    photos = _photos(tmp_path / "photos", 3, size=(240, 320))
    eng = tmp_path / "eng"
    assert _cli(capsys, "index", "create", eng, "--codebook-size", 8, "--images", photos, "--quiet",
                "--set", "codebook.iterations=2")[0] == 0
    seconds = []
    results = Engine.open(eng).search_batch([photos / f"im{i}.png" for i in range(3)], top_k=2,
                                            seconds=seconds, workers=2)
    assert len(results) == len(seconds) == 3 and all(s > 0 for s in seconds)
    queries = [photos / f"im{i}.png" for i in range(3)]
    code, out, _ = _cli(capsys, "search", *queries, "--index", eng, "--json")
    got = [json.loads(line)["seconds"] for line in out.splitlines()]
    assert code == 0 and len(got) == 3 and len(set(got)) > 1


def test_a_reader_searches_through_a_remove_by_another_process(tmp_path, capsys):
    """D2: an Engine opened before another process's `index remove` failed every search that verified the
    removed image ("'im3' is not in the feature store"): the index and the store commit one after the other,
    and the reader's index generation still listed the image. Now the removed image is verified as nothing and
    left out of the hits; a feature missing while the index has not moved stays an error."""
    photos = _photos(tmp_path / "photos", 8)
    eng = tmp_path / "eng"
    assert _cli(capsys, "index", "create", eng, "--codebook-size", 16, "--images", photos, "--quiet")[0] == 0
    before = [h.image_id for h in Engine.open(eng).search(photos / "im3.png", top_k=8)]
    assert "im3" in before
    reader = Engine.open(eng)  # its index generation lists im3; its store opens at the first search
    removed = subprocess.run([sys.executable, "-m", "d2r", "index", "remove", str(eng), "im3", "--quiet"],
                             env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert removed.returncode == 0
    result = reader.query(photos / "im3.png", top_k=8)
    assert result.info["removed_meanwhile"] == ["im3"]
    hits = [h.image_id for h in reader.search(photos / "im3.png", top_k=8)]
    assert "im3" not in hits and hits == [i for i in before if i != "im3"][:len(hits)], (before, hits)
    # a miss without a newer index generation is damage, not a remove: it still raises
    fresh = Engine.open(eng)
    fresh._store = None
    fresh._whole_image_features = lambda image_id: (_ for _ in ()).throw(KeyError(image_id))
    with pytest.raises(KeyError):
        fresh.search(photos / "im0.png", top_k=8)
