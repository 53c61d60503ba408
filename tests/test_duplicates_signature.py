"""The Goldberg signature (d2r.duplicates.signature) equals image-match 1.1.2's
``ImageSignature().generate_signature`` array for array on real photos, and its words and distances equal the
package's; it also equals a step-by-step numpy reference written from the paper (always run).

The peer runs in its own Python (``D2R_IMAGE_MATCH_PYTHON``: a venv with ``image-match``, e.g.
``python3 -m venv /opt/im && /opt/im/bin/pip install --no-deps image-match==1.1.2 numpy scikit-image pillow``),
so the project's environment never needs it; the tests skip, saying why, where it is not set up. Both sides get
the same decoded pixels (d2r's loader): the parity is of the signature, not of two JPEG decoders; on the dev
photos the files are also compared as each side reads them (image-match's bytestream path).
"""

import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from d2r.duplicates.signature import signature, signature_of_pixels, words
from d2r.features.image import load_image
from d2r.kernels.signature import normalized_distances
from tests import reference as ref
from tests.conftest import in_ci

PEER = Path(__file__).with_name("image_match_peer.py")


def _peer_python() -> str:
    """The peer's Python; a skip with the reason where it is not set up, a failure under CI (.ci/run sets it
    up: CI never passes by skipping the parity test)."""
    give_up = pytest.fail if in_ci() else pytest.skip
    exe = os.environ.get("D2R_IMAGE_MATCH_PYTHON", "")
    if not exe:
        give_up("D2R_IMAGE_MATCH_PYTHON is not set (a Python with image-match 1.1.2 installed)")
    probe = subprocess.run([exe, "-c", "import image_match.goldberg"], capture_output=True, text=True)
    if probe.returncode:
        give_up(f"image-match does not import under {exe}: {probe.stderr.strip().splitlines()[-1:]}")
    return exe


def _run_peer(images, tmp_path, paths=()):
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, paths=np.array([str(p) for p in paths]), **{f"image_{i}": a for i, a in enumerate(images)})
    subprocess.run([_peer_python(), str(PEER), str(src), str(dst)], check=True, timeout=600)
    return np.load(dst)


def _edge_cases():
    """Featureless, tiny (P = 2 below 30 px, one-pixel sides), black-against-white (a difference of exactly 1.0
    that a later bin re-labels)."""
    bw = np.zeros((100, 100, 3), np.uint8)
    bw[:, 50:] = 255
    stripes = np.zeros((37, 211, 3), np.uint8)
    stripes[:, ::7] = 255
    rng = np.random.default_rng(0)
    tiny = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((1, 1), (1, 50), (50, 1), (3, 700),
                                                                              (29, 31), (39, 41))]
    return [np.full((40, 60, 3), 128, np.uint8), np.zeros((5, 5, 3), np.uint8), bw, stripes] + tiny


def _compare(images, tmp_path, paths=()):
    out = _run_peer(images, tmp_path, paths)
    if len(paths):  # the files as each side reads them (both decode with Pillow; no EXIF rotation in these)
        mine = np.stack([signature(p) for p in paths])
        same = (mine == out["file_signatures"]).all(axis=1)
        assert same.all(), f"file signatures differ for {[str(p) for p in np.array(paths)[~same]]}"
    mine = np.stack([signature_of_pixels(a) for a in images])
    same = (mine == out["signatures"]).all(axis=1)
    assert same.all(), f"signatures differ for images {np.flatnonzero(~same).tolist()}"
    np.testing.assert_array_equal(words(mine), out["words"])
    for i in range(len(images)):
        d = np.empty(len(images))
        normalized_distances(mine[i], mine, np.arange(len(images)), d)
        np.testing.assert_array_equal(d, out["distances"][i])


@pytest.mark.dev
def test_equal_to_image_match_on_the_dev_photos(bench_dev, tmp_path):
    files = sorted(p for p in (bench_dev / "images").rglob("*") if p.is_file())[::12]
    assert len(files) >= 20
    _compare([load_image(f) for f in files] + _edge_cases(), tmp_path, paths=files)


def test_equal_to_image_match_on_bundled_photos_and_their_copies(bundled_photos, tmp_path):
    images = []
    for a in bundled_photos.values():
        small = cv2.resize(a, (a.shape[1] // 3, a.shape[0] // 3), interpolation=cv2.INTER_AREA)
        jpeg = cv2.imdecode(cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 15])[1], cv2.IMREAD_COLOR)
        images += [a, small, jpeg, np.ascontiguousarray(a[10:-25, 30:])]
    _compare(images + _edge_cases(), tmp_path)


def test_equal_to_the_numpy_reference_from_the_paper(bundled_photos):
    for name, a in bundled_photos.items():
        for im in (a, np.ascontiguousarray(a[::2, 5:]), cv2.resize(a, (97, 61))):
            np.testing.assert_array_equal(signature_of_pixels(im), ref.goldberg_signature(im), err_msg=name)
    for im in _edge_cases():
        np.testing.assert_array_equal(signature_of_pixels(im), ref.goldberg_signature(im))


def test_shape_values_and_what_it_separates(bundled_photos, tmp_path):
    cat, coffee = bundled_photos["chelsea"], bundled_photos["coffee"]
    s = signature_of_pixels(cat)
    assert s.shape == (648,) and s.dtype == np.int8 and set(np.unique(s)) <= {-2, -1, 0, 1, 2}
    assert not signature_of_pixels(np.full((30, 30, 3), 7, np.uint8)).any()  # featureless: all zero
    cv2.imwrite(str(tmp_path / "cat.jpg"), cv2.cvtColor(cat, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 30])
    copies = np.stack([signature(tmp_path / "cat.jpg"), signature_of_pixels(cv2.resize(cat, (150, 115)))])
    d = np.empty(3)
    normalized_distances(s, np.concatenate([copies, signature_of_pixels(coffee)[None]]), np.arange(3), d)
    assert d[0] < 0.2 and d[1] < 0.2 and d[2] > 0.45
