"""Global pooling functions against plain-loop numpy twins written from the papers' formulas."""

import math

import numpy as np
import pytest

from d2r.globaldesc import pooling as P

RNG = np.random.default_rng(7)


def relu_map(c=5, h=7, w=9, zeros=0.3, rng=RNG):
    x = rng.gamma(2.0, 1.0, size=(c, h, w)).astype(np.float32)
    x[rng.random(x.shape) < zeros] = 0.0  # ReLU maps have many exact zeros
    return x


SHAPES = [(3, 1, 1), (4, 5, 5), (6, 7, 9), (2, 12, 4), (8, 3, 11)]


@pytest.mark.parametrize("shape", SHAPES)
def test_gap_gmp_spoc_match_loops(shape):
    x = relu_map(*shape)
    c, h, w = shape
    sigma = min(h, w) / 3.0 / 2.0
    for k in range(c):
        vals = [x[k, i, j] for i in range(h) for j in range(w)]
        assert P.gap(x)[k] == pytest.approx(sum(vals) / len(vals), rel=1e-5)
        assert P.gmp(x)[k] == max(vals)
        prior = sum(x[k, i, j] * math.exp(-((j - (w - 1) / 2) ** 2 + (i - (h - 1) / 2) ** 2)
                                          / (2 * sigma ** 2))
                    for i in range(h) for j in range(w))
        assert P.spoc(x)[k] == pytest.approx(prior, rel=1e-5, abs=1e-6)
        assert P.spoc(x, prior=False)[k] == pytest.approx(sum(vals), rel=1e-5)
    assert P.mac is P.gmp


@pytest.mark.parametrize("shape", SHAPES)
def test_gem_matches_formula(shape):
    x = relu_map(*shape)
    for p in (0.5, 1.0, 3.0, 7.5):
        want = [(sum(max(v, 1e-6) ** p for v in x[k].ravel()) / x[k].size) ** (1 / p)
                for k in range(shape[0])]
        np.testing.assert_allclose(P.gem(x, p), want, rtol=1e-5)


def test_gem_p1_is_spoc_without_prior_and_large_p_tends_to_mac():
    x = relu_map(6, 8, 10, zeros=0.0) + 0.01
    hw = x.shape[1] * x.shape[2]
    np.testing.assert_allclose(P.gem(x, 1.0) * hw, P.spoc(x, prior=False), rtol=1e-5)
    mac = P.gmp(x)
    prev = P.gem(x, 1.0)
    for p in (2, 8, 32, 128, 1024):
        g = P.gem(x, p)
        assert np.all(g >= prev - 1e-6)  # the generalised mean grows with p
        assert np.all(g <= mac * (1 + 1e-6)) and np.all(g >= mac * hw ** (-1.0 / p) * (1 - 1e-6))
        prev = g
    np.testing.assert_allclose(P.gem(x, 1024), mac, rtol=1e-2)
    np.testing.assert_array_equal(P.gem(x, math.inf), mac)


@pytest.mark.parametrize("shape", SHAPES)
def test_crow_matches_loops(shape):
    x = relu_map(*shape)
    c, h, w = shape
    a = b = 2.0
    s = [[sum(x[k, i, j] for k in range(c)) for j in range(w)] for i in range(h)]
    norm = sum(s[i][j] ** a for i in range(h) for j in range(w)) ** (1 / a)
    q = [sum(1 for i in range(h) for j in range(w) if x[k, i, j] != 0) / (h * w) + 1e-6 for k in range(c)]
    got = P.crow(x, a, b)
    for k in range(c):
        spatial = sum(x[k, i, j] * (s[i][j] / norm) ** (1 / b) for i in range(h) for j in range(w))
        assert got[k] == pytest.approx(spatial * math.log(sum(q) / q[k]), rel=1e-4, abs=1e-6)
    assert not P.crow(np.zeros((3, 4, 4), np.float32)).any()


def flood_largest(mask):
    """Largest 4-connected component by breadth-first flood fill; first found (raster order) wins ties."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best = []
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                comp, todo = [], [(i, j)]
                seen[i, j] = True
                while todo:
                    y, x = todo.pop()
                    comp.append((y, x))
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            todo.append((ny, nx))
                if len(comp) > len(best):
                    best = comp
    out = np.zeros_like(mask)
    for y, x in best:
        out[y, x] = True
    return out


@pytest.mark.parametrize("seed", range(8))
def test_scda_matches_flood_fill(seed):
    rng = np.random.default_rng(seed)
    x = relu_map(4, int(rng.integers(3, 12)), int(rng.integers(3, 12)), zeros=0.5, rng=rng)
    s = x.sum(axis=0)
    mask = flood_largest(s > s.mean())
    np.testing.assert_array_equal(P.scda_mask(x), mask)
    sel = x[:, mask]
    np.testing.assert_allclose(P.scda(x), np.concatenate([sel.mean(axis=1), sel.max(axis=1)]), rtol=1e-6)


def test_scda_constant_map_uses_every_position():
    x = np.ones((3, 4, 5), np.float32)
    assert P.scda_mask(x).all()
    np.testing.assert_array_equal(P.scda(x), np.ones(6, np.float32))


def test_rmac_regions_square_map_by_hand():
    """Tolias et al. 2016 on a 10×10 map, L = 3: the whole map, 2×2 regions of side 6 at 0/4, 3×3 of side 5 at
    0/2/5 (14 regions)."""
    want = [(0, 0, 10, 10)]
    want += [(x, y, 6, 6) for y in (0, 4) for x in (0, 4)]
    want += [(x, y, 5, 5) for y in (0, 2, 5) for x in (0, 2, 5)]
    assert P.rmac_regions(10, 10, 3).tolist() == [list(r) for r in want]


def test_rmac_regions_wide_map_by_hand():
    """A 10 (high) × 16 (wide) map: the overlap rule picks 2 regions at level 1 along the width (40% overlap
    for b = 6), so levels have 2×1, 3×2 and 4×3 regions of sides 10, 6, 5 (20 regions)."""
    want = [(x, 0, 10, 10) for x in (0, 6)]
    want += [(x, y, 6, 6) for y in (0, 4) for x in (0, 5, 10)]
    want += [(x, y, 5, 5) for y in (0, 2, 5) for x in (0, 3, 7, 11)]
    assert P.rmac_regions(10, 16, 3).tolist() == [list(r) for r in want]
    tall = P.rmac_regions(16, 10, 3)  # the transpose: the same regions with x and y swapped
    assert sorted(tall[:, [1, 0, 3, 2]].tolist()) == sorted(list(r) for r in want)


@pytest.mark.parametrize("hw", [(10, 10), (10, 16), (7, 23), (1, 5), (30, 17)])
def test_rmac_regions_stay_inside_and_rmac_sums_normalised_region_macs(hw):
    h, w = hw
    regions = P.rmac_regions(h, w, 3)
    assert len(regions) > 0
    assert (regions[:, 0] >= 0).all() and (regions[:, 0] + regions[:, 2] <= w).all()
    assert (regions[:, 1] >= 0).all() and (regions[:, 1] + regions[:, 3] <= h).all()
    x = relu_map(5, h, w)
    want = np.zeros(5)
    for x0, y0, rw, rh in regions.tolist():
        v = np.array([max(x[k, i, j] for i in range(y0, y0 + rh) for j in range(x0, x0 + rw))
                      for k in range(5)])
        want += v / (math.sqrt((v ** 2).sum()) + 1e-6)
    np.testing.assert_allclose(P.rmac(x, 3), want, rtol=1e-5)


def test_pwa_matches_loops_and_channel_selection():
    x = relu_map(6, 5, 7)
    ch = [4, 1]
    got = P.pwa(x, ch, alpha=2.0, beta=2.0)
    assert got.shape == (12,)
    for n, k in enumerate(ch):
        norm = math.sqrt(sum(float(v) ** 2 for v in x[k].ravel()))
        wts = (x[k] / (norm + 1e-5)) ** 0.5
        for c in range(6):
            assert got[n * 6 + c] == pytest.approx(float((wts * x[c]).sum()), rel=1e-5, abs=1e-7)
    train = RNG.normal(size=(50, 6)) * np.array([1, 5, 2, 9, 0.1, 3])
    assert P.select_pwa_channels(train, 3).tolist() == [5, 1, 3]  # largest variance last
    with pytest.raises(ValueError, match="channels"):
        P.pwa(x, [6])


def test_pcb_concatenates_stripes_and_whole_map():
    x = relu_map(3, 7, 4)
    got = P.pcb(x, P.gap, stripes=3)  # stripes of 2 rows; the 7th row only counts in the whole map
    want = [x[:, 0:2].mean(axis=(1, 2)), x[:, 2:4].mean(axis=(1, 2)), x[:, 4:6].mean(axis=(1, 2)),
            x.mean(axis=(1, 2))]
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-6)
    with pytest.raises(ValueError, match="stripes"):
        P.pcb(x, P.gap, stripes=8)


def test_bad_maps_are_refused():
    for bad in (np.zeros((3, 0, 4), np.float32), np.zeros((4, 4), np.float32)):
        for fn in (P.gap, P.gmp, P.gem, P.rmac, P.scda, P.crow):
            with pytest.raises(ValueError, match="feature map"):
                fn(bad)
    with pytest.raises(ValueError, match="p must be"):
        P.gem(relu_map(), 0.0)
