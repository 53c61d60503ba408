"""The engine's image-id policy (d2r.engine.sources.assign_ids): one id, one file; the same file twice is
skipped; a clash is that file's failure; a symbolic-link loop never aborts the batch."""

import json
from pathlib import Path

from d2r.engine import Engine
from d2r.engine.sources import assign_ids
from tests.corpus import run_cli, write_photos

CODEBOOK = Path(__file__).resolve().parents[1] / "codebooks" / "rootsift-128d-k256-skimage-s0.npz"


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


def test_a_list_file_naming_a_photo_twice_indexes_it_once(tmp_path):
    """D16: a file listed twice aborted `index add` ("image id 'x' is given by two files: x and x")."""
    _photos(tmp_path / "photos", 2)
    lst = tmp_path / "list.txt"
    lst.write_bytes("photos/im0.png\nphotos/im1.png\nphotos/im0.png\n".encode("utf-8-sig"))
    engine = Engine.create(tmp_path / "eng", {"codebook": {"path": str(CODEBOOK)},
                                              "features": {"options": {"max_features": 200}}})
    report = engine.index(lst, progress=False)
    assert sorted(report.indexed) == ["photos/im0", "photos/im1"] and not report.failed
