"""The one extraction loop (d2r.features.extract, d2r.build): every entry point runs it, so a bad image is
reported the same way by all of them; results in input order, threads or serial; a failure never stops the
batch; flushed batches survive an interruption; ``source=`` reaches a store that records it."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from d2r.build import extract_into, extract_to_store
from d2r.codebook.kmeans import load_training_descriptors
from d2r.distributed.extract import _Worker
from d2r.distributed.kmeans import _Sampler
from d2r.engine import Engine
from d2r.features import FeatureStore, RootSIFT, extractor_info, get_extractor, list_images
from d2r.features.extract import _ordered_map, extract_each, extract_image, failure_line
from tests.corpus import textured, write_photos

OPTIONS = {"max_features": 150}


@pytest.fixture
def bad_folder(tmp_path):
    """Three good photos, a broken JPEG, an empty file and a symbolic-link loop."""
    folder = write_photos(tmp_path / "mixed", ["good0", "good1", "good2"], 21)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "a.jpg").symlink_to("b.jpg")
    (folder / "b.jpg").symlink_to("a.jpg")
    return folder


BAD = {"broken", "empty", "a", "b"}


def _reasons_by_id(folder, failures_by_path):
    return {path.rsplit("/", 1)[-1].rsplit(".", 1)[0]: reason for path, reason in failures_by_path.items()}


def test_every_entry_point_reports_a_bad_folder_identically(bad_folder, tmp_path, caplog):
    """Six extraction loops (d2r extract, Engine.index, train-codebook --images, the Ray extraction worker,
    the Ray sampler, the bench's stores) each caught and worded failures their own way; now one loop gives
    every one of them the same reason for the same file."""
    extractor = get_extractor("rootsift", **OPTIONS)
    # d2r extract (and the bench, which calls the same extract_to_store)
    summary = extract_to_store(bad_folder, extractor, tmp_path / "store", progress=False, workers=2)
    assert (summary["extracted"], summary["failed"]) == (3, 4)
    by_store = FeatureStore.open(tmp_path / "store").failures
    # Engine.index (failures by path)
    engine = Engine.create(tmp_path / "eng", {"features": {"options": OPTIONS}, "codebook": {"size": 8}})
    report = engine.index(bad_folder, progress=False)
    by_engine = _reasons_by_id(bad_folder, report.failed)
    # the Ray workers, run in this process (the same classes Ray runs as actors)
    spec = {"name": "rootsift", "model": None, "pca": None, "options": OPTIONS}
    pairs = [(i, str(p)) for i, p in list_images(bad_folder)]
    FeatureStore.create(tmp_path / "ray-store", extractor_info(extractor)).close()
    worker = _Worker(spec, str(tmp_path / "ray-store"), 128, 1 << 20, "t")
    by_worker = worker.run(pairs)["failures"]
    by_sampler = {image_id: error for _, image_id, _, _, error in
                  _Sampler(features=spec).sample([(k, i, p) for k, (i, p) in enumerate(pairs)], 10, 0)
                  if error is not None}
    # train-codebook --images: the failures are logged, one line each, the same reason
    with caplog.at_level(logging.WARNING):
        _, meta = load_training_descriptors(images=bad_folder, feature="rootsift", per_image=20,
                                            progress=False)
    assert meta["training_images_failed"] == 4
    logged = {r.getMessage() for r in caplog.records if "good" not in r.getMessage()}
    assert set(by_store) == set(by_engine) == set(by_worker) == set(by_sampler) == BAD
    for image_id in BAD:
        reasons = {by_store[image_id], by_engine[image_id], by_worker[image_id], by_sampler[image_id]}
        assert len(reasons) == 1, reasons
        path = str(bad_folder / f"{image_id}.jpg")
        assert failure_line(path, by_store[image_id]) in logged, (logged, image_id)
    assert "symbolic link loop" in by_store["a"] and "empty file" in by_store["empty"]


def test_failure_line_names_the_file_once():
    """`d2r index` printed `failed: mixed/empty.jpg: ImageError: mixed/empty.jpg: empty file (0 bytes)`."""
    assert failure_line("m/e.jpg", "ImageError: m/e.jpg: empty file (0 bytes)") == \
        "m/e.jpg: ImageError: empty file (0 bytes)"
    assert failure_line("m/e.jpg", "ValueError: other") == "m/e.jpg: ValueError: other"


def test_the_loop_keeps_input_order_with_threads_and_records_failures():
    def fn(image_id, source):
        if source % 7 == 3:
            raise ValueError(f"{source} is bad")
        return source * source

    todo = [(f"i{k}", k) for k in range(40)]
    for workers in (1, 4):
        got = list(extract_each(todo, fn, workers, progress=False))
        assert [g[0] for g in got] == [i for i, _ in todo]
        for image_id, source, feats, error in got:
            if source % 7 == 3:
                assert feats is None and error == f"ValueError: {source} is bad"
            else:
                assert feats == source * source and error is None
    assert list(_ordered_map(lambda i: i * i, list(range(50)), 4)) == [i * i for i in range(50)]


def test_an_interrupt_cancels_the_images_not_started():
    """Ctrl-C in a threaded run waited for every queued image before the process could stop."""
    started = []

    def fn(image_id, source):
        started.append(image_id)
        if source == 5:
            raise KeyboardInterrupt
        return source

    with pytest.raises(KeyboardInterrupt):
        list(extract_each([(k, k) for k in range(1000)], fn, 3, progress=False))
    assert len(started) < 100  # a bounded window ahead, the rest cancelled


class _Sink:
    """A store that records the source of each image (as FeatureStore.add(..., source=) does)."""
    def __init__(self):
        self.added, self.flushes = [], 0

    def add(self, image_id, features, source=None):
        self.added.append((image_id, source))

    def flush(self):
        self.flushes += 1


class _OldSink(_Sink):
    def add(self, image_id, features):  # a store without sources
        self.added.append((image_id, None))


def test_batches_are_flushed_and_sources_passed_when_the_store_takes_them(tmp_path):
    paths = [(f"i{k}", tmp_path / f"{k}.jpg") for k in range(5)]
    sink, batches = _Sink(), []
    counts = extract_into(sink, paths, lambda i, p: i, batch_size=2, on_batch=lambda: batches.append(1),
                          progress=False)
    assert counts == {"extracted": 5, "failed": 0} and sink.flushes == 3 and len(batches) == 3
    assert sink.added == [(i, str(p)) for i, p in paths]
    pixels = [("x", np.zeros((4, 4, 3), np.uint8))]
    extract_into(sink, pixels, lambda i, p: i, progress=False)
    assert sink.added[-1] == ("x", None)
    old = _OldSink()
    extract_into(old, paths, lambda i, p: i, progress=False)
    assert len(old.added) == 5 and old.flushes == 0  # no batch_size: the store rolls over by itself


def test_the_per_image_worker_is_the_extractor_on_whole_images(tmp_path):
    rng = np.random.default_rng(2)
    Image.fromarray(textured(rng, 160, 200)).save(tmp_path / "x.png")
    ex = RootSIFT(max_features=100)
    a, b = extract_image(ex, tmp_path / "x.png"), ex.extract(tmp_path / "x.png")
    np.testing.assert_array_equal(a.descriptors, b.descriptors)


def test_extract_summary_counts_a_bad_folder(bad_folder, tmp_path, capsys):
    from d2r.cli import main

    out = tmp_path / "store"
    code = main(["extract", "--images", str(bad_folder), "--features", "rootsift", "--out", str(out),
                 "--max-features", "100", "--quiet", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert code == 3 and (s["extracted"], s["failed"]) == (3, 4)


def test_every_flushed_batch_is_committed_before_an_interruption(tmp_path):
    """The loop's promise: a batch is committed (visible to a reader, so it survives a kill) before the next
    one starts, and a rerun extracts only what is missing."""
    folder = write_photos(tmp_path / "photos", [f"im{k}" for k in range(7)], 4)
    extractor = RootSIFT(max_features=100)
    path = tmp_path / "store"
    seen = []

    def fn(image_id, source):
        if image_id == "im4":  # two batches of two done: a reader must see them committed
            seen.append(sorted(FeatureStore.open(path).ids()))
            raise KeyboardInterrupt
        return extract_image(extractor, source)

    with pytest.raises(KeyboardInterrupt):
        extract_to_store(folder, extractor, path, fn=fn, batch_size=2, progress=False, workers=1)
    assert seen == [["im0", "im1", "im2", "im3"]]
    again = extract_to_store(folder, extractor, path, batch_size=2, progress=False)
    assert (again["skipped"], again["extracted"]) == (4, 3) and len(FeatureStore.open(path)) == 7
