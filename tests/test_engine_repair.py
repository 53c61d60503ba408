"""`d2r index repair` of an engine folder: after it, every search works and the index holds only images whose
features the store has (D5, D6, D7 of the reliability trial), and `--reindex` brings back what it can."""

import glob
import json

import numpy as np

import d2r.cli
from tests.test_engine import _photos


def _cli(capsys, *args):
    code = d2r.cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _engine(tmp_path, capsys, n=10):
    photos = _photos(tmp_path / "photos", n)
    eng = tmp_path / "eng"
    assert _cli(capsys, "index", "create", eng, "--codebook-size", 16, "--images", photos, "--quiet")[0] == 0
    return photos, eng


def _search_ids(capsys, eng, query) -> list:
    code, out, err = _cli(capsys, "search", query, "--index", eng, "--top-k", 20, "--json", "--quiet")
    assert code == 0, err
    return [h["image_id"] for h in json.loads(out.splitlines()[0])["hits"]]


def _info_images(capsys, eng) -> int:
    code, out, _ = _cli(capsys, "index", "info", eng, "--json")
    assert code == 0
    return json.loads(out)["images"]


def test_a_reset_removal_table_does_not_bring_back_images_without_features(tmp_path, capsys):
    """D5: `repair` of a damaged removal table brought removed images back into the index without their
    features (remove had deleted them), and every search reaching one failed ("'im3' is not in the feature
    store")."""
    photos, eng = _engine(tmp_path, capsys)
    assert _cli(capsys, "index", "remove", eng, "im3", "--quiet")[0] == 0
    table = glob.glob(str(eng / "index" / "removed-*.npy"))
    assert len(table) == 1
    open(table[0], "wb").close()
    assert _cli(capsys, "index", "check", eng)[0] == 1
    code, out, err = _cli(capsys, "index", "repair", eng, "--json")
    report = json.loads(out)
    assert code == 0 and report["removal_table_reset"] and report["unindexed"] == ["im3"], (out, err)
    assert _cli(capsys, "index", "check", eng)[0] == 0
    assert _info_images(capsys, eng) == 9
    hits = _search_ids(capsys, eng, photos / "im3.png")
    assert "im3" not in hits and len(hits) == 9


def test_repair_reindex_never_indexes_the_phantoms_of_a_damaged_store(tmp_path, capsys):
    """D6: a shard's ids.npy replaced by a valid array of other names: `repair --reindex` indexed every "new"
    id (phantom images: real features under junk ids). Now the digest check drops the shard, the images whose
    features went with it leave the index, and --reindex extracts them again from their files (D7: repair of
    a damaged feature shard left an index whose searches failed)."""
    photos, eng = _engine(tmp_path, capsys)
    ids_file = glob.glob(str(eng / "features" / "shard-*.ids.npy"))[0]
    ids = np.load(ids_file)
    np.save(ids_file, np.array([f"zz{i:08d}" for i in range(len(ids))], ids.dtype))
    code, out, err = _cli(capsys, "index", "repair", eng, "--json")
    report = json.loads(out)
    assert code == 0 and report["features"]["dropped_shards"], (out, err)
    assert sorted(report["unindexed"]) == sorted(f"im{i}" for i in range(10))
    assert _info_images(capsys, eng) == 0  # nothing searchable is left pointing at missing features
    code, out, err = _cli(capsys, "index", "repair", eng, "--reindex", "--json", "--quiet")
    report = json.loads(out)
    assert code == 0 and report["reextracted"] == 10, (out, err)
    assert _info_images(capsys, eng) == 10 and _cli(capsys, "index", "check", eng)[0] == 0
    hits = _search_ids(capsys, eng, photos / "im2.png")
    assert hits[0] == "im2" and not any(h.startswith("zz") for h in hits)


def test_repair_says_what_it_took_out_of_the_index(tmp_path, capsys):
    """D7: after dropping a damaged feature shard, repair said nothing about the indexed images that lost their
    features; it now names how many left the index and how to bring them back."""
    _, eng = _engine(tmp_path, capsys, n=6)
    shard = glob.glob(str(eng / "features" / "shard-*.descriptors.npy"))[0]
    with open(shard, "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\xff" * 16)
    code, out, err = _cli(capsys, "index", "repair", eng)
    assert code == 0, err
    assert "6 indexed image(s) had no stored features" in out and f"`d2r index repair {eng} --reindex`" in out


def test_side_tables_are_checked_and_repaired(tmp_path, capsys):
    """D13, D15: a failures.json with a list as a reason passed `check` and crashed `index add`; a lost sources
    table and a deleted engine.json passed `check` (hits lost their paths; commands failed later)."""
    photos, eng = _engine(tmp_path, capsys, n=6)
    (eng / "failures.json").write_text('{"x.png": ["x", 1]}')
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "failures.json" in err and "is a list, not a string" in err
    code, out, _ = _cli(capsys, "index", "repair", eng, "--json")
    assert code == 0 and json.loads(out)["failures_reset"] and _cli(capsys, "index", "check", eng)[0] == 0
    (eng / "sources.log").write_bytes(b"")
    (eng / "sources.json").unlink(missing_ok=True)
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "6 indexed image(s) lost their file" in err, err
    code, out, _ = _cli(capsys, "index", "repair", eng, "--json")
    assert code == 0 and json.loads(out)["sources_restored"] == 6
    code, out, _ = _cli(capsys, "search", photos / "im1.png", "--index", eng, "--json", "--quiet")
    assert json.loads(out.splitlines()[0])["hits"][0]["path"] == str(photos / "im1.png")
    (eng / "engine.json").unlink()
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "engine.json" in err and "restore it from a copy" in err, err


def test_check_and_info_report_stored_images_missing_from_the_index(tmp_path, capsys):
    """D19: a `repair` that dropped a damaged segment (or a `repair --reindex` killed before reindexing) left
    a healthy index without images the feature store holds, and `check` and `info` said nothing: searches
    silently missed them. Both now count them and give `repair --reindex`; a running writer is no damage."""
    import os
    import subprocess
    import sys
    import time

    _, eng = _engine(tmp_path, capsys, n=6)
    more = _photos(tmp_path / "more", 4, seed=8)
    assert _cli(capsys, "index", "add", eng, more, "--id-prefix", "b", "--quiet")[0] == 0
    segs = sorted(glob.glob(str(eng / "index" / "seg-*")))
    assert len(segs) == 2
    with open(os.path.join(segs[-1], "items.npy"), "r+b") as f:  # the second add's segment
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    code, out, err = _cli(capsys, "index", "repair", eng)
    assert code == 0 and "4 image(s) of the feature store are no longer in the index" in out, (out, err)
    hint = f"`d2r index repair {eng} --reindex`"
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "4 image(s) of the feature store are not in the index" in err and hint in err, err
    assert len(err.strip().splitlines()) == 1
    code, out, err = _cli(capsys, "index", "info", eng)
    assert code == 1 and "INCOMPLETE" in out and "4 image(s) of the feature store" in err and hint in err, err
    code, out, _ = _cli(capsys, "index", "info", eng, "--json")
    assert code == 1 and json.loads(out)["unindexed"] == 4
    hold = ("import sys, time; from d2r._lock import WriterLock; "
            "lock = WriterLock(sys.argv[1], what='index').acquire(); print(flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(eng)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    try:  # an `index add` between extracting and indexing: stored images waiting is no damage
        holder.stdout.readline()
        assert _cli(capsys, "index", "check", eng)[0] == 0
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    code, out, err = _cli(capsys, "index", "repair", eng, "--reindex", "--json", "--quiet")
    assert code == 0 and json.loads(out)["reindexed"] == 4, (out, err)
    assert _cli(capsys, "index", "check", eng)[0] == 0 and _cli(capsys, "index", "info", eng)[0] == 0
    assert _info_images(capsys, eng) == 10


def test_an_indexed_image_without_stored_features_is_named_by_search_info_check_and_repair(tmp_path, capsys):
    """D13, D18: an image gone from the feature store only (or whose id was damaged in a segment's
    image_ids.npy) failed every search reaching it with "'im3' is not in the feature store", naming neither
    the damage nor a remedy, and `info` called the engine healthy."""
    from d2r.engine import Engine

    photos, eng = _engine(tmp_path, capsys, n=6)
    with Engine.open(eng)._writing(0) as store:  # as a remove killed between the store and the index
        store.remove(["im3"])
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "1 indexed image(s) have no stored features (e.g. 'im3')" in err, err
    code, out, err = _cli(capsys, "index", "info", eng)
    assert code == 1 and "DAMAGED" in out and "'im3'" in err and f"`d2r index check {eng}`" in err, err
    code, _, err = _cli(capsys, "search", photos / "im3.png", "--index", eng, "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "'im3' has no stored features" in err and f"`d2r index check {eng}`" in err, err
    code, out, err = _cli(capsys, "index", "repair", eng, "--json")
    assert code == 0 and json.loads(out)["unindexed"] == ["im3"], (out, err)
    assert _cli(capsys, "index", "check", eng)[0] == 0 and _cli(capsys, "index", "info", eng)[0] == 0
    ids_file = glob.glob(str(eng / "index" / "seg-*" / "image_ids.npy"))[0]
    raw = bytearray(open(ids_file, "rb").read())
    raw[raw.index("im1".encode("utf-32-le"))] = ord("x")  # same size and dtype: 'xm1'
    open(ids_file, "wb").write(raw)
    code, _, err = _cli(capsys, "search", photos / "im1.png", "--index", eng, "--quiet")
    assert code == 1 and "'xm1' has no stored features" in err and f"`d2r index check {eng}`" in err, err
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "image_ids.npy: checksum mismatch" in err, err


def test_sources_pointing_outside_the_indexed_files_are_flagged_and_set_back(tmp_path, capsys):
    """D10: `check` accepted a sources table whose entries pointed at /etc/passwd or ../../../../etc/passwd
    (the files serve would read for those images). Check now names them; repair sets each back to the file
    the feature store records, and drops a relative entry nothing knows."""
    photos, eng = _engine(tmp_path, capsys, n=4)
    with open(eng / "sources.log", "a") as log:
        log.write('{"set": {"im1": "/etc/passwd", "im2": "../../../../etc/passwd", "zz": "rel/x.png"}}\n')
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "2 image file(s) are not absolute paths" in err and "'../../../../etc/passwd'" in err
    assert "1 indexed image(s) name another file than the one their features came from" in err, err
    assert "'/etc/passwd' for 'im1'" in err and repr(str(photos / "im1.png")) in err
    code, out, err = _cli(capsys, "index", "repair", eng, "--json")
    report = json.loads(out)
    assert code == 0 and (report["sources_corrected"], report["sources_dropped"]) == (2, 1), (out, err)
    assert _cli(capsys, "index", "check", eng)[0] == 0
    code, out, _ = _cli(capsys, "search", photos / "im1.png", "--index", eng, "--json", "--quiet")
    hits = {h["image_id"]: h["path"] for h in json.loads(out.splitlines()[0])["hits"]}
    assert hits["im1"] == str(photos / "im1.png") and hits["im2"] == str(photos / "im2.png")


def test_an_interrupted_remove_is_finished_by_repair_never_undone_by_reindex(tmp_path, capsys):
    """D19: a `remove` killed after committing the index but before the feature store left the removed
    image's features behind, and `repair --reindex` (indexing every stored image the index lacks) brought it
    back. Check now names the leftover, repair deletes it, and --reindex leaves removed images out."""
    from d2r.engine import Engine

    photos, eng = _engine(tmp_path, capsys, n=5)
    engine = Engine.open(eng)
    with engine._writing(0):  # the index's half of `index remove im3`
        engine.database.remove("im3")
        engine.database.save()
    code, _, err = _cli(capsys, "index", "check", eng)
    assert code == 1 and "1 removed image(s) still have stored features (e.g. 'im3'" in err, err
    assert "not in the index" not in err
    code, out, err = _cli(capsys, "index", "repair", eng, "--reindex", "--json", "--quiet")
    report = json.loads(out)
    assert code == 0 and report["features_deleted"] == ["im3"] and report["reindexed"] == 0, (out, err)
    assert report.get("reextracted", 0) == 0
    assert _cli(capsys, "index", "check", eng)[0] == 0 and _info_images(capsys, eng) == 4
    assert "im3" not in _search_ids(capsys, eng, photos / "im3.png")
