"""Stores and indexes written by the previous release (commit a0fe626) open unchanged with this code and read
and search bit for bit as that release did; a writer upgrades them in place and they stay readable and exact.

The fixture under ``tests/data/release_a0fe626/`` was written by the old code (``make.py`` beside it says
how); ``expected.json`` holds what the old code read and ranked there."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2r.features import FeatureStore
from d2r.features.store import check_store
from d2r.index import Database
from d2r.index.manifest import check_database

DATA = Path(__file__).parent / "data" / "release_a0fe626"
REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("release_a0fe626_make", DATA / "make.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)  # the fixture's own helpers: the test reads with what wrote the expectations
digest, features, local, ranking = make.digest, make.features, make.local, make.ranking

EXPECTED = json.loads((DATA / "expected.json").read_text())
DATABASES = sorted(EXPECTED["databases"])


@pytest.fixture
def old(tmp_path):
    """A private copy of the fixture (opening for writing changes it)."""
    shutil.copytree(DATA, tmp_path / "old", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return tmp_path / "old"


def _same_store(store, want):
    assert store.ids() == want["ids"] and store.failures == want["failures"]
    assert {i: digest(store.get(i)) for i in store.ids()} == want["features"]
    assert {i: digest(f) for i, f in store} == want["features"]


def test_old_store_opens_and_reads_bit_for_bit(old):
    store = FeatureStore.open(old / "store")
    _same_store(store, EXPECTED["store"])
    assert store.check() == [] and check_store(old / "store") == []
    assert all(store.source(i) is None for i in store.ids())  # the old format kept no sources


@pytest.mark.parametrize("name", DATABASES)
def test_old_index_opens_and_searches_bit_for_bit(old, name):
    want = EXPECTED["databases"][name]
    store = FeatureStore.open(old / "store")
    db = Database.open(old / name)
    assert [str(i) for i in db.ids()] == want["ids"]
    assert check_database(old / name) == []
    for q, ranked in zip(np.load(old / "queries.npy"), want["queries"]):
        assert ranking(db.search(q, top_k=8)) == ranked
    for i, ranked in zip(store.ids()[:3], want["stored"]):
        assert ranking(db.search(local(store.get(i)).descriptors, top_k=8)) == ranked


def test_old_store_upgraded_by_a_writer_keeps_every_image(old):
    rng = np.random.default_rng(3)
    extra = {f"new{i}": features(rng, regions=i == 1) for i in range(3)}
    with FeatureStore.open(old / "store", mode="a") as store:
        for image_id, f in extra.items():
            store.add(image_id, f, source=f"/photos/{image_id}.jpg")
        store.flush()
        store.compact()
    store = FeatureStore.open(old / "store")
    want = dict(EXPECTED["store"]["features"], **{i: digest(f) for i, f in extra.items()})
    assert {i: digest(store.get(i)) for i in store.ids()} == want
    assert store.failures == EXPECTED["store"]["failures"] and store.check() == []
    assert store.source("new2") == "/photos/new2.jpg" and store.source(EXPECTED["store"]["ids"][0]) is None
    manifest = json.loads((old / "store" / "manifest.json").read_text())
    assert "version" not in manifest and manifest["format_version"] == 3
    assert all("blake2b" in f for r in manifest["shards"] for f in r["files"].values())


@pytest.mark.parametrize("name", DATABASES)
def test_old_index_upgraded_by_a_writer_searches_the_same(old, name):
    want = EXPECTED["databases"][name]
    store = FeatureStore.open(old / "store")
    db = Database.open(old / name, writable=True)
    db.compact()  # every old file is read (and verified) by the merge, then rewritten
    db.save()
    db.close()
    db = Database.open(old / name)
    assert [str(i) for i in db.ids()] == want["ids"] and check_database(old / name) == []
    for q, ranked in zip(np.load(old / "queries.npy"), want["queries"]):
        got = ranking(db.search(q, top_k=8))
        assert got["ids"] == ranked["ids"]
        np.testing.assert_allclose([float.fromhex(s) for s in got["scores"]],
                                   [float.fromhex(s) for s in ranked["scores"]], rtol=0, atol=1e-12)
    assert len(store) == len(EXPECTED["store"]["ids"])


ENGINE = """
import json, sys
import numpy as np
from PIL import Image
import d2r
folder, photos, out = sys.argv[1], sys.argv[2], sys.argv[3]
if sys.argv[4] == "build":
    rng = np.random.default_rng(7)
    for i in range(6):
        base = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(base).resize((160, 120), Image.BICUBIC).save(f"{photos}/p{i}.png")
    cfg = {"features": {"options": {"max_features": 60}}, "codebook": {"size": 16}}
    engine = d2r.Engine.create(folder, cfg)
    engine.index(photos, progress=False)
    engine.remove("p4")
engine = d2r.Engine.open(folder)
hits = [[h.to_dict() for h in engine.search(f"{photos}/p{i}.png", top_k=5)] for i in (0, 2, 5)]
for q in hits:
    for h in q:
        h["score"] = float(h["score"]).hex()
with open(out, "w") as f:
    json.dump({"hits": hits, "ids": sorted(str(i) for i in engine.database.ids())}, f)
"""


@pytest.mark.slow
def test_engine_of_the_previous_release_searches_identically(tmp_path):
    """Built and searched by the code of commit a0fe626 (from this repository's history), then searched by
    this code: the same hits (ids, paths, scores bit for bit, boxes, inliers). Needs git and the commit."""
    old_code = tmp_path / "old_code"
    old_code.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "a0fe626"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip("git history with commit a0fe626 is not available here")
    subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive.stdout, check=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    args = [str(tmp_path / "engine"), str(photos)]
    env = dict(os.environ, PYTHONPATH=str(old_code))
    subprocess.run([sys.executable, "-c", ENGINE, *args, str(tmp_path / "old.json"), "build"], env=env,
                   cwd=tmp_path, check=True, timeout=1200)
    env["PYTHONPATH"] = str(REPO)
    subprocess.run([sys.executable, "-c", ENGINE, *args, str(tmp_path / "new.json"), "search"], env=env,
                   cwd=tmp_path, check=True, timeout=1200)
    before = json.loads((tmp_path / "old.json").read_text())
    after = json.loads((tmp_path / "new.json").read_text())
    # hits gained fields since (``ranked_by``): compare what the old release reported, all of it
    for old_hits, new_hits in zip(before["hits"], after["hits"]):
        for old_hit, new_hit in zip(old_hits, new_hits):
            assert set(old_hit) <= set(new_hit)
            for key in set(new_hit) - set(old_hit):
                del new_hit[key]
    assert before["ids"] and before == after
