"""RootSIFT on real photos (shipped with scikit-image), plus PCA and its official file format."""

import cv2
import numpy as np
import pytest

from d2r.features import PCA, RootSIFT, load_image
from d2r.features.pca import datum_from_bytes, datum_to_bytes, read_datum, write_datum
from d2r.features.rootsift import RootSIFTConfig, rootsift


@pytest.fixture(scope="module")
def photos(bundled_photos, tmp_path_factory):
    """Three real photos written as JPEG files (the extractor reads paths as users give them)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "chelsea", "coffee"):
        paths.append(folder / f"{name}.jpg")
        Image.fromarray(bundled_photos[name]).save(paths[-1], quality=92)
    return paths


def test_rootsift_on_real_photos(photos):
    ex = RootSIFT()
    for p in photos:
        img = load_image(p)
        f = ex.extract(p)
        n = len(f)
        assert 50 < n <= 1000
        assert f.descriptors.shape == (n, 128) and f.descriptors.dtype == np.float32
        assert f.locations.shape == (n, 2) and f.locations.dtype == np.float32
        assert f.scales.dtype == np.float32 and f.scores.dtype == np.float32
        assert (f.descriptors >= 0).all()
        np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
        assert np.all(np.diff(f.scores) <= 0)  # strongest first
        h, w = img.shape[:2]
        assert (f.locations[:, 0] >= -1).all() and (f.locations[:, 0] <= w).all()
        assert (f.locations[:, 1] >= -1).all() and (f.locations[:, 1] <= h).all()


def test_rootsift_deterministic_and_thread_independent(photos):
    p = photos[0]
    a = RootSIFT().extract(p)
    b = RootSIFT().extract(load_image(p))
    old = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        c = RootSIFT().extract(p)
    finally:
        cv2.setNumThreads(old)
    for x in (b, c):
        np.testing.assert_array_equal(a.descriptors, x.descriptors)
        np.testing.assert_array_equal(a.locations, x.locations)
        np.testing.assert_array_equal(a.scores, x.scores)


def test_max_features_keeps_the_strongest(photos):
    full = RootSIFT().extract(photos[1])
    top = RootSIFT(max_features=50).extract(photos[1])
    assert len(top) == 50
    np.testing.assert_array_equal(top.descriptors, full.descriptors[:50])
    np.testing.assert_array_equal(top.locations, full.locations[:50])


def test_locations_mapped_back_to_original_pixels(photos):
    img = load_image(photos[2])
    h, w = img.shape[:2]
    small = load_image(img, max_side=512)
    ref = RootSIFT(max_side=None).extract(small)
    f = RootSIFT(max_side=512).extract(img)
    np.testing.assert_array_equal(f.descriptors, ref.descriptors)
    sx, sy = small.shape[1] / w, small.shape[0] / h
    np.testing.assert_allclose(f.locations[:, 0], (ref.locations[:, 0] + 0.5) / sx - 0.5, rtol=1e-5)
    np.testing.assert_allclose(f.locations[:, 1], (ref.locations[:, 1] + 0.5) / sy - 0.5, rtol=1e-5)
    assert f.locations[:, 0].max() > 512  # really in original pixels


def test_blank_and_tiny_images_give_no_features():
    for img in (np.full((200, 300, 3), 128, np.uint8), np.zeros((9, 50, 3), np.uint8)):
        f = RootSIFT().extract(img)
        assert len(f) == 0 and f.descriptors.shape == (0, 128)


def test_rootsift_formula():
    d = np.array([[4.0, 0, 12, 0], [0, 0, 0, 0]])
    out = rootsift(d)
    np.testing.assert_allclose(out[0], [0.5, 0, np.sqrt(0.75), 0], rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)


def test_config_and_fingerprint():
    a, b = RootSIFT(), RootSIFT(RootSIFTConfig(max_features=500))
    assert a.fingerprint() == RootSIFT().fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert RootSIFT(max_features=500).config == b.config
    assert a.name == "rootsift" and a.dim == 128
    with pytest.raises(ValueError):
        RootSIFTConfig(max_features=0)
    with pytest.raises(TypeError):
        RootSIFT(nope=1)


def test_rootsift_with_pca(photos, tmp_path):
    base = RootSIFT()
    train = np.concatenate([base.extract(p).descriptors for p in photos])
    pca = PCA(dim=32).fit(train)
    ex = RootSIFT(pca=pca)
    f = ex.extract(photos[0])
    assert ex.dim == 32 and f.descriptors.shape[1] == 32
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(f.descriptors, pca.transform(base.extract(photos[0]).descriptors), atol=1e-6)
    assert ex.fingerprint() != base.fingerprint()
    pca.save(tmp_path / "pca")
    ex2 = RootSIFT(pca=tmp_path / "pca", pca_dim=32)
    assert ex2.fingerprint() == ex.fingerprint()


# ------------------------------------------------------------------------------------------------- PCA
def test_datum_bytes_hand_computed():
    arr = np.array([[1.0, 2.0], [3.0, 4.0]])
    floats = np.array([1, 2, 3, 4], "<f4").tobytes()
    expected = (b"\x0a\x04" + b"\x0a\x02\x02\x02"  # shape {dim: [2, 2] packed}
                + b"\x12\x12" + b"\x0a\x10" + floats)  # float_list {value: packed 4 floats}
    assert datum_to_bytes(arr) == expected
    np.testing.assert_array_equal(datum_from_bytes(expected), arr)
    # unpacked encodings (also valid protobuf) and a multi-byte varint dimension
    dims = b"\x08\x02\x08\x83\x01"  # dim: 2, dim: 131 (unpacked varints)
    vals = np.arange(262, dtype="<f4")
    fl = b"".join(b"\x0d" + v.tobytes() for v in vals)  # value: fixed32, unpacked
    msg = (b"\x0a" + bytes([len(dims)]) + dims + b"\x12" + _varint(len(fl)) + fl)
    np.testing.assert_array_equal(datum_from_bytes(msg), vals.reshape(2, 131))
    with pytest.raises(ValueError, match="shape"):
        datum_from_bytes(b"\x0a\x04\x0a\x02\x02\x03" + b"\x12\x12\x0a\x10" + floats)


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_datum_file_roundtrip(tmp_path, rng):
    a = rng.standard_normal((7, 5, 3))
    write_datum(tmp_path / "x.datum", a)
    np.testing.assert_array_equal(read_datum(tmp_path / "x.datum"), a.astype(np.float32).astype(np.float64))


def test_pca_fit_transform_semantics(rng):
    x = rng.standard_normal((500, 16)) * np.linspace(3, 0.1, 16)
    pca = PCA(dim=4).fit(x.astype(np.float32))
    P = pca.components_
    np.testing.assert_allclose(P @ P.T, np.eye(16), atol=1e-8)
    assert np.all(np.diff(pca.variances_) <= 1e-12)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = (xn - pca.mean_) @ P[:4].T
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(pca.transform(x.astype(np.float32)), y, atol=1e-5)
    w = PCA.from_arrays(pca.mean_, P, pca.variances_, dim=4, whiten=True)
    yw = (xn - pca.mean_) @ P[:4].T / np.sqrt(pca.variances_[:4])
    yw /= np.linalg.norm(yw, axis=1, keepdims=True)
    np.testing.assert_allclose(w.transform(x.astype(np.float32)), yw, atol=1e-5)
    assert pca.transform(np.zeros((0, 16), np.float32)).shape == (0, 4)
    with pytest.raises(ValueError, match="D=16"):
        pca.transform(np.zeros((3, 8), np.float32))


@pytest.mark.parametrize("fmt", ["datum", "npy"])
def test_pca_save_load(tmp_path, rng, fmt):
    x = rng.standard_normal((200, 12)).astype(np.float32)
    pca = PCA(dim=5).fit(x)
    pca.save(tmp_path, format=fmt)
    names = {p.name for p in tmp_path.iterdir()}
    if fmt == "datum":
        assert {"mean.datum", "pca_proj_mat.datum", "pca_vars.datum"} <= names
        np.testing.assert_allclose(read_datum(tmp_path / "pca_proj_mat.datum"), pca.components_, atol=1e-6)
    else:
        assert {"mean.npy", "pca_proj_mat.npy"} <= names
    back = PCA.load(tmp_path)
    assert back.dim == 5 and back.fingerprint() == pca.fingerprint()
    np.testing.assert_allclose(back.transform(x), pca.transform(x), atol=1e-5)
    # official folders carry no pca.json: defaults 128 / no whitening; dim overridable
    (tmp_path / "pca.json").unlink()
    assert PCA.load(tmp_path, dim=3).dim == 3
    with pytest.raises(ValueError, match="dim=128"):
        PCA.load(tmp_path)


def _upright_reference(gray, max_features):
    """Slow reference for ``upright``: OpenCV detect, one keypoint per (response, x, y, size), angle 0."""
    sift = cv2.SIFT_create()
    kps = sorted(sift.detect(gray, None), key=lambda k: (-k.response, k.pt[1], k.pt[0], k.size, k.angle))
    seen, kept = set(), []
    for k in kps:
        key = (k.response, k.pt[1], k.pt[0], k.size)
        if key not in seen:
            seen.add(key)
            kept.append(cv2.KeyPoint(k.pt[0], k.pt[1], k.size, 0.0, k.response, k.octave, k.class_id))
    kept, desc = sift.compute(gray, kept[:max_features])
    return np.array([k.pt for k in kept], dtype=np.float32), rootsift(desc)


def test_upright_dedupes_orientations_and_matches_reference(bundled_photos):
    img = bundled_photos["astronaut"]
    plain = RootSIFT(max_side=None, max_features=100000).extract(img)
    up = RootSIFT(max_side=None, max_features=100000, upright=True).extract(img)
    loc_plain = {tuple(x) for x in np.c_[plain.locations, plain.scales].tolist()}
    loc_up = [tuple(x) for x in np.c_[up.locations, up.scales].tolist()]
    assert len(plain) > len(up)  # SIFT gives some keypoints two or more orientations
    assert len(set(loc_up)) == len(loc_up) == len(loc_plain)  # one upright keypoint per location
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    loc, desc = _upright_reference(gray, 300)
    top = RootSIFT(max_side=None, max_features=300, upright=True).extract(img)
    np.testing.assert_array_equal(top.locations, loc)
    np.testing.assert_allclose(top.descriptors, desc, atol=1e-6)


def test_upright_descriptors_change_under_rotation_plain_do_not(bundled_photos):
    img = bundled_photos["astronaut"]
    w = img.shape[1]
    rot = np.ascontiguousarray(np.rot90(img))  # (x, y) -> (y, w - 1 - x), no interpolation
    for upright, lo, hi in ((False, 0.0, 0.2), (True, 0.6, 2.0)):
        ex = RootSIFT(max_side=None, upright=upright)
        a, b = ex.extract(img), ex.extract(rot)
        mapped = np.stack([a.locations[:, 1], w - 1 - a.locations[:, 0]], axis=1)
        dist = np.linalg.norm(mapped[:, None] - b.locations[None], axis=2)
        j = dist.argmin(axis=1)
        same = dist[np.arange(len(j)), j] < 0.5  # the same keypoint detected in the rotated copy
        assert same.sum() > 200
        d = np.linalg.norm(a.descriptors[same] - b.descriptors[j[same]], axis=1)
        assert lo <= np.median(d) < hi, (upright, np.median(d))


def test_affine_simulation_matches_a_strong_tilt(bundled_photos):
    """ASIFT: a 4× horizontal compression (tilt 4) defeats SIFT; the simulated views recover it."""
    img = bundled_photos["astronaut"]
    h, w = img.shape[:2]
    tilted = cv2.resize(img, (w // 4, h), interpolation=cv2.INTER_AREA)
    correct = {}
    for affine in (False, True):
        ex = RootSIFT(max_side=None, affine_simulation=affine)
        a, b = ex.extract(img), ex.extract(tilted)
        assert len(a) <= 1000 and np.all(np.diff(a.scores) <= 0)
        np.testing.assert_allclose(np.linalg.norm(a.descriptors, axis=1), 1.0, atol=1e-5)
        dist = np.linalg.norm(a.descriptors[:, None] - b.descriptors[None], axis=2)
        nn = np.sort(dist, axis=1)
        j = dist.argmin(axis=1)
        ok = nn[:, 0] < 0.8 * nn[:, 1]  # Lowe's ratio test
        pa, pb = a.locations[ok], b.locations[j[ok]]
        good = (np.abs((pa[:, 0] + 0.5) / 4 - 0.5 - pb[:, 0]) < 3) & (np.abs(pa[:, 1] - pb[:, 1]) < 3)
        correct[affine] = int(good.sum())
    assert correct[False] < 20 and correct[True] > 100, correct


def test_upright_and_affine_simulation_exclusive():
    with pytest.raises(ValueError, match="upright and affine_simulation"):
        RootSIFTConfig(upright=True, affine_simulation=True)
    assert RootSIFTConfig().upright is False and RootSIFTConfig().affine_simulation is False


def test_new_options_off_keep_the_old_fingerprint():
    """Stores and codebooks made before ``upright``/``affine_simulation`` existed stay valid."""
    assert RootSIFT().fingerprint() == "582bb514a08b7358"
    assert RootSIFT(upright=False, affine_simulation=False).fingerprint() == RootSIFT().fingerprint()
    assert len({RootSIFT().fingerprint(), RootSIFT(upright=True).fingerprint(),
                RootSIFT(affine_simulation=True).fingerprint()}) == 3
    # the spread radius only matters with ASIFT on (its default is √2 px)
    assert RootSIFT(affine_min_distance=0).fingerprint() == RootSIFT().fingerprint()
    assert (RootSIFT(affine_simulation=True).fingerprint()
            != RootSIFT(affine_simulation=True, affine_min_distance=0).fingerprint())


def test_spread_keypoints_matches_brute_force(rng):
    from d2r.features.rootsift import spread_keypoints

    for _ in range(20):
        pts = rng.uniform(0, 20, size=(int(rng.integers(1, 300)), 2))
        order = rng.permutation(len(pts))
        radius, limit = float(rng.uniform(0.3, 3.0)), int(rng.integers(1, 400))
        ref = []
        for i in order:  # O(N^2) greedy
            if all(np.hypot(*(pts[i] - pts[j])) >= radius for j in ref):
                ref.append(i)
        np.testing.assert_array_equal(spread_keypoints(pts, order, radius, limit), ref[:limit])


def test_affine_min_distance_spreads_asift_keypoints(bundled_photos):
    img = bundled_photos["astronaut"]
    f = RootSIFT(max_side=None, affine_simulation=True).extract(img)  # default radius √2
    assert len(f) == 1000 and np.all(np.diff(f.scores) <= 0)
    d = np.linalg.norm(f.locations[:, None] - f.locations[None], axis=2) + np.eye(len(f)) * 99
    assert d.min() >= 2 ** 0.5 - 1e-4
    full = RootSIFT(max_side=None, affine_simulation=True, affine_min_distance=0).extract(img)
    dfull = np.linalg.norm(full.locations[:, None] - full.locations[None], axis=2) + np.eye(len(full)) * 99
    assert dfull.min() < 1  # without it, ASIFT repeats points seen in several views
    with pytest.raises(ValueError, match="affine_min_distance"):
        RootSIFTConfig(affine_min_distance=-1.0)
