"""The engine's image-id policy (d2r.engine.sources.assign_ids): one id, one file; the same file twice is
skipped; a clash is that file's failure; a symbolic-link loop never aborts the batch."""

import json
from pathlib import Path

from d2r.engine import Engine
from d2r.engine.sources import assign_ids
from tests.corpus import CODEBOOK, new_engine, run_cli, small_config, write_photos


def _photos(folder: Path, n: int) -> Path:
    return write_photos(folder, [f"im{i}" for i in range(n)], 5)


def test_assign_ids_rules(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    sources, failures = {"known": str(b.resolve())}, {str(a): "image id 'p/x' is already used by y"}
    kept, skipped, failed = assign_ids([("x", a), ("x", a), ("x", tmp_path / "." / "a.jpg"), ("known", a),
                                        ("y", b)], sources, failures, id_prefix="p/")
    assert kept == [("p/x", a), ("p/known", a), ("p/y", b)] and skipped == 2 and not failed
    assert str(a) not in failures  # the earlier conflict is resolved by the prefix
    kept, _, failed = assign_ids([("known", a)], sources, failures)
    assert kept == [] and "already used by" in failed[str(a)] == failures[str(a)]
    assert sources["p/x"] == str(a.resolve())


def test_the_same_file_twice_is_skipped_a_conflict_is_not(photos, tmp_path):
    """A file listed twice under one id was passed on twice (extracted and indexed twice) instead of being
    skipped once; the same id for another file must stay that file's failure."""
    engine = Engine.create(tmp_path / "eng", small_config())
    p = photos / "im0.png"
    report = engine.index([("a", p), ("a", p), ("b", photos / "im1.png")], progress=False)
    assert sorted(report.indexed) == ["a", "b"] and report.skipped == 1 and not report.failed
    report = engine.index([("c", p), ("c", photos / "im2.png")], progress=False)
    assert report.indexed == ["c"] and "already used by" in report.failed[str(photos / "im2.png")]


def test_index_add_takes_several_folders_and_list_files(tmp_path, capsys):
    """`d2r index add DIR A B` failed both folders ("is a directory, not an image file", exit 1)."""
    a = write_photos(tmp_path / "A", ["a0", "a1"], 1)
    b = write_photos(tmp_path / "B" / "sub", ["b0"], 2).parent
    c = write_photos(tmp_path / "C", ["c0"], 3)
    listing = tmp_path / "list.txt"
    listing.write_text("C/c0.png\n")
    eng = new_engine(tmp_path)
    code, out, err = run_cli(capsys, "index", "add", eng, a, b, listing, "--json", "--quiet")
    report = json.loads(out)
    assert code == 0 and report["failed"] == {} and report["indexed"] == 4, err
    engine = Engine.open(eng)
    assert {"a0", "a1", "sub/b0", "C/c0"} <= set(engine._sources)  # ids relative to each folder / list file
    assert c.is_dir()


def test_a_symbolic_link_loop_is_one_failure_not_the_end_of_the_batch(tmp_path, capsys):
    """D9: `Path.resolve()` raised `RuntimeError: Symlink loop` in the id policy: exit 1, no image indexed,
    and `index create` deleted the new engine folder."""
    photos = _photos(tmp_path / "photos", 3)
    (photos / "a.jpg").symlink_to("b.jpg")
    (photos / "b.jpg").symlink_to("a.jpg")
    eng = tmp_path / "eng"
    code, out, err = run_cli(capsys, "index", "create", eng, "--codebook", CODEBOOK, "--images", photos,
                             "--set", "features.options.max_features=200", "--json", "--quiet")
    report = json.loads(out)
    assert code == 3 and report["indexed"] == 3, err
    assert "symbolic link loop" in report["failed"][str(photos / "a.jpg")]
    assert len(Engine.open(eng)) == 3


def test_a_broken_symbolic_link_in_a_folder_is_reported(tmp_path, capsys):
    """A dangling symbolic link named like an image was silently skipped by `d2r index add FOLDER` (exit 0)."""
    photos = write_photos(tmp_path / "photos", ["p0"], 9)
    (photos / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    eng = new_engine(tmp_path)
    code, out, err = run_cli(capsys, "index", "add", eng, photos, "--json", "--quiet")
    report = json.loads(out)
    assert code == 3 and report["indexed"] == 1, err
    assert "broken symbolic link" in report["failed"][str(photos / "gone.jpg")]


def test_a_list_file_naming_a_photo_twice_indexes_it_once(tmp_path):
    """D16: a file listed twice aborted `index add` ("image id 'x' is given by two files: x and x")."""
    _photos(tmp_path / "photos", 2)
    lst = tmp_path / "list.txt"
    lst.write_bytes("photos/im0.png\nphotos/im1.png\nphotos/im0.png\n".encode("utf-8-sig"))
    engine = Engine.create(tmp_path / "eng", {"codebook": {"path": str(CODEBOOK)},
                                              "features": {"options": {"max_features": 200}}})
    report = engine.index(lst, progress=False)
    assert sorted(report.indexed) == ["photos/im0", "photos/im1"] and not report.failed
