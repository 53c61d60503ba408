"""``d2r duplicates``: on the demo photos with planted copies (resized, re-compressed, slightly cropped) the
copies come out grouped with their originals and nothing else is grouped with them; --json; the results page;
an engine's images with the verified second opinion for a crop the signature misses; bad options and
unreadable images (one line naming the file or option, the exit codes of the other commands)."""

import json

import cv2
import numpy as np
import pytest

from d2r.demo import make_dataset
from tests.corpus import new_engine, run_cli
from tests.test_query_path import _run_probe

PLANTED = ("temple-dusk", "cat-viewpoint", "coffee-in-scene", "rocket-dusk", "distractor-moon", "flower-dusk")


def _save(path, rgb, quality=92):
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])


def _copies(a):
    """The planted copies of one photo: half size, JPEG quality 15, 2 % cropped off each side (the signature is
    crop-sensitive: 5 % is near its threshold), 1.5 × larger."""
    h, w = a.shape[:2]
    m = (int(h * 0.02), int(w * 0.02))
    return {"small": (cv2.resize(a, (w // 2, h // 2), interpolation=cv2.INTER_AREA), 92),
            "q15": (a, 15), "crop": (np.ascontiguousarray(a[m[0]:h - m[0], m[1]:w - m[1]]), 90),
            "large": (cv2.resize(a, (w * 3 // 2, h * 3 // 2), interpolation=cv2.INTER_CUBIC), 85)}


@pytest.fixture(scope="module")
def demo_photos(tmp_path_factory):
    """The demo's database photos, with planted copies of six of them (copies/<name>-<kind>.jpg)."""
    folder = tmp_path_factory.mktemp("demo") / "photos"
    (folder / "copies").mkdir(parents=True)
    database, _ = make_dataset(0)
    for item in database:
        _save(folder / f"{item.name}.jpg", item.pixels)
        if item.name in PLANTED:
            for kind, (pixels, quality) in _copies(item.pixels).items():
                _save(folder / "copies" / f"{item.name}-{kind}.jpg", pixels, quality)
    return folder


def test_the_planted_copies_are_grouped_with_their_originals(demo_photos, capsys, tmp_path):
    page = tmp_path / "dups.html"
    code, out, err = run_cli(capsys, "duplicates", demo_photos, "--json", "--quiet", "--page", page)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["images"] == 55 + 4 * len(PLANTED) and doc["parameters"]["threshold"] == 0.45
    groups = [{i["id"] for i in g["images"]} for g in doc["groups"]]
    for name in PLANTED:
        want = {name} | {f"copies/{name}-{k}" for k in ("small", "q15", "crop", "large")}
        mine = [g for g in groups if name in g]
        assert mine and want <= mine[0], (name, mine)
        # besides the copies, only other views of the same demo instance (rocket-viewpoint is a mild warp of
        # the rocket photo, 0.44 from rocket-dusk) may join: no unrelated image
        same = name if name.startswith("distractor-") else name.split("-")[0]
        assert all(i.split("/")[-1].startswith(same) for i in mine[0]), mine[0]
    for p in doc["pairs"]:
        assert p["rule"] == "signature" and 0 <= p["distance"] < 0.45
    text = page.read_text()
    assert text.count("<figure>") == sum(len(g) for g in groups) and "data:image/jpeg;base64," in text

    code, out, err = run_cli(capsys, "duplicates", demo_photos, "--threshold", "0.2", "--quiet")
    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"{out.count('# group')} groups of near-duplicates (")
    assert "signature distance < 0.2" in out and "copies/temple-dusk-q15" in out


def test_a_list_file_and_an_unreadable_image(demo_photos, capsys, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{demo_photos / 'temple-dusk.jpg'}\n{demo_photos / 'copies' / 'temple-dusk-small.jpg'}\n"
                   f"broken.jpg\n")
    code, out, err = run_cli(capsys, "duplicates", lst, "--quiet")
    assert code == 3, err  # partial failure: the run goes on past the bad image
    assert "broken.jpg" in err and "partial failure: 1 of 3" in err
    assert "# group 1: 2 images" in out and "1 unreadable" in out


@pytest.mark.parametrize("argv, code, needle", [
    (["--threshold", "0"], 2, "--threshold"),
    (["--threshold", "1.5"], 2, "--threshold"),
    (["--threshold", "abc"], 2, "--threshold"),
    (["--workers", "0"], 2, "--workers"),
    (["--second-opinion"], 2, "--second-opinion"),
    (["--page", "{tmp}"], 1, "--page"),
    (["--page", "{tmp}/no/such/page.html"], 1, "--page"),
])
def test_bad_options_are_one_line_naming_the_option(demo_photos, capsys, tmp_path, argv, code, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, out, err = run_cli(capsys, "duplicates", demo_photos, *argv)
    lines = [line for line in err.splitlines() if "error:" in line]  # argparse prints its usage lines before
    assert got == code and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not out


def test_a_missing_or_empty_source_is_named(capsys, tmp_path):
    code, _, err = run_cli(capsys, "duplicates", tmp_path / "nowhere")
    assert code == 1 and "nowhere" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "duplicates", tmp_path / "empty")
    assert code == 1 and "no images found" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_engine_gives_a_verified_second_opinion_for_a_crop(demo_photos, capsys, tmp_path):
    """A 60 % crop, enlarged: too far for the signature, found by ASMK* + verification on the engine."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    database, _ = make_dataset(0)
    pixels = {d.name: d.pixels for d in database}
    for name in ("temple-dusk", "cat-viewpoint", "coffee-dusk", "distractor-brick", "rocket-dusk"):
        _save(folder / f"{name}.jpg", pixels[name])
    a = pixels["temple-dusk"]
    h, w = a.shape[:2]
    crop = cv2.resize(a[int(h * .2):int(h * .8), int(w * .15):int(w * .75)], (w, h))
    _save(folder / "temple-crop.jpg", crop)
    _save(folder / "cat-small.jpg", cv2.resize(pixels["cat-viewpoint"], (200, 150)))
    eng = new_engine(tmp_path)
    code, _, err = run_cli(capsys, "index", "add", eng, folder, "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "duplicates", eng, "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(out)
    pairs = {(p["a"], p["b"]): p for p in doc["pairs"]}
    assert pairs[("cat-small", "cat-viewpoint")]["rule"] == "signature"
    assert pairs[("temple-crop", "temple-dusk")]["rule"] == "verified"
    assert doc["parameters"]["second_opinion"]["min_inliers"] > 0
    code, out, err = run_cli(capsys, "duplicates", eng, "--json", "--quiet", "--no-second-opinion")
    plain = {(p["a"], p["b"]) for p in json.loads(out)["pairs"]}
    assert code == 0 and ("temple-crop", "temple-dusk") not in plain
    # --keep: the signatures kept in ENGINE/signatures, used by later runs (which read no image again)
    code, out, err = run_cli(capsys, "duplicates", eng, "--json", "--quiet", "--keep")
    assert code == 0 and (eng / "signatures" / "manifest.json").is_file(), err
    kept = json.loads(out)
    code, out, err = run_cli(capsys, "duplicates", eng, "--json", "--quiet")
    again = json.loads(out)
    assert kept["parameters"]["images_read"] == 7 and again["parameters"]["images_read"] == 0
    assert again["pairs"] == kept["pairs"] == doc["pairs"] and again["groups"] == doc["groups"]
    code, _, err = run_cli(capsys, "index", "check", eng, "--quiet")
    assert code == 0, err  # the kept signatures disturb nothing of the engine's


def test_a_second_process_compiles_nothing(demo_photos, tmp_path):
    """The kernels are cached (cache=True): a fresh `d2r duplicates` process loads machine code."""
    cache = str(tmp_path / "numba-cache")  # an empty cache: the first process must compile
    args = ["duplicates", demo_photos / "copies", "--quiet", "--json"]
    first = _run_probe(tmp_path, "first", args, NUMBA_CACHE_DIR=cache)
    assert first["code"] == 0 and "word_search" in first["compiled"], first
    second = _run_probe(tmp_path, "second", args, NUMBA_CACHE_DIR=cache)
    assert second["code"] == 0 and second["compiled"] == [], second
