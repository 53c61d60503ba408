"""Pre-processing views for global descriptors: resize modes, centre and ten crops, two-flip, scales."""

import numpy as np
import pytest

from d2r.globaldesc.preprocess import PAD_RGB, crops, resize, views


def image(h=300, w=400):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_resize_modes():
    im = image()
    assert resize(im, "longer", 200).shape == (150, 200, 3)
    assert resize(im, "longer", 1000) is im  # never upscaled
    assert resize(im, "shorter", 600).shape == (600, 800, 3)
    assert resize(im, "direct", 128).shape == (128, 128, 3)
    pad = resize(im, "pad", 200)
    assert pad.shape == (200, 200, 3)
    assert (pad[:25] == PAD_RGB).all() and (pad[-25:] == PAD_RGB).all()  # 150 rows centred on 200
    assert not (pad[25:175] == PAD_RGB).all(axis=2).all()
    with pytest.raises(ValueError, match="global.resize"):
        resize(im, "fit", 10)


def test_centre_and_ten_crops():
    im = image(10, 12)
    (c,) = crops(im, "center", 4)
    np.testing.assert_array_equal(c, im[3:7, 4:8])
    ten = crops(im, "ten", 4)
    assert len(ten) == 10
    np.testing.assert_array_equal(ten[0], im[:4, :4])
    np.testing.assert_array_equal(ten[3], im[6:, 8:])
    np.testing.assert_array_equal(ten[5], im[:4, :4][:, ::-1])
    assert crops(im, "center", 50)[0].shape == (10, 12, 3)  # clipped to the image


def test_views_order_and_counts():
    im = image()
    v = views(im, "longer", 200, flip=True, scales=(1.0, 0.5))
    assert [x.shape for x in v] == [(150, 200, 3), (75, 100, 3), (150, 200, 3), (75, 100, 3)]
    np.testing.assert_array_equal(v[2], v[0][:, ::-1])
    assert len(views(im, "shorter", 256, crop="ten", crop_size=224, flip=True)) == 10
    assert len(views(im, "direct", 64, crop="center", crop_size=32, scales=(1, 0.7071, 0.5))) == 3
