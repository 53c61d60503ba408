"""Global pooling of a CNN feature map: PyRetri's menu as plain numpy functions.

Every function takes ``x``, a (C, H, W) float32 feature map (non-negative: the output of a ReLU/ReLU6, as
every backbone here gives), and returns a (D,) float32 vector, NOT normalised (the extractor L2-normalises).
An empty map (H·W = 0) is refused with ValueError. References (formulas as in the papers; PyRetri read for
understanding):

- :func:`gap` global average pooling, :func:`gmp` / :func:`mac` global max (Tolias et al. 2016), (C,).
- :func:`spoc` sum pooling with a Gaussian centre prior, σ = min(H, W) / 3 / 2 (Babenko & Lempitsky 2015),
  (C,).
- :func:`crow` cross-dimensional weighting (Kalantidis et al. 2016), (C,).
- :func:`scda` selective convolutional descriptor aggregation (Wei et al. 2017), (2C,): [mean, max] over the
  largest 4-connected component of positions whose channel sum exceeds its mean.
- :func:`gem` generalised mean (Radenović et al. 2018), (C,): p = 1 is GAP, p → ∞ tends to MAC.
- :func:`rmac` regional MAC (Tolias, Sicre, Jégou, ICLR 2016), (C,): the sum of the L2-normalised MACs of the
  regions of :func:`rmac_regions` (the paper's multi-scale grid; the regions only, as in the paper).
- :func:`pwa` part-based weighting aggregation (Xu et al. 2018), (n·C,): one weighted sum per selected channel
  (:func:`select_pwa_channels` learns them on a training set).
- :func:`pcb` part-based stripes (Sun et al. 2018), ((stripes + 1)·D,): ``pool`` of each horizontal stripe
  and of the whole map, concatenated.

No numba: each function is a handful of vectorised numpy passes over a map of ~10⁶ values (SCDA's connected
components use scipy.ndimage, which is compiled already); the backbone costs 100-1000× more per image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

EPS = 1e-6


def _map(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise ValueError(f"feature map: expected a (C, H, W) array, got shape {x.shape}")
    if x.shape[1] * x.shape[2] == 0 or x.shape[0] == 0:
        raise ValueError(f"feature map: empty (C, H, W) = {x.shape}")
    return x


def gap(x) -> np.ndarray:
    """Global average pooling: (C,) mean over the H·W positions."""
    x = _map(x)
    return x.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)


def gmp(x) -> np.ndarray:
    """Global max pooling (MAC): (C,) maximum over positions."""
    return _map(x).max(axis=(1, 2))


mac = gmp


def centre_prior(h: int, w: int) -> np.ndarray:
    """SPoC's (H, W) Gaussian weights centred on the map, σ = min(H, W) / 3 / 2 (Babenko & Lempitsky)."""
    sigma = min(h, w) / 3.0 / 2.0
    ys = (np.arange(h) - (h - 1) / 2.0)[:, None]
    xs = (np.arange(w) - (w - 1) / 2.0)[None, :]
    return np.exp(-(xs ** 2 + ys ** 2) / (2.0 * sigma ** 2))


def spoc(x, prior: bool = True) -> np.ndarray:
    """Sum pooling, weighted by :func:`centre_prior` (``prior``) or not: (C,) Σ_hw α_hw x_chw."""
    x = _map(x)
    if not prior:
        return x.sum(axis=(1, 2), dtype=np.float64).astype(np.float32)
    return _weighted_sum(x, centre_prior(x.shape[1], x.shape[2]))


def _weighted_sum(x: np.ndarray, wts: np.ndarray) -> np.ndarray:
    """(C,) Σ_hw w_hw x_chw as one float32 BLAS matrix-vector product (the maps are ~10⁶ values)."""
    c = x.shape[0]
    return (x.reshape(c, -1) @ np.ascontiguousarray(wts, np.float32).reshape(-1)).astype(np.float32)


def crow(x, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    """CroW: spatial weights S = (s / ‖s‖_a)^(1/b) of the channel sum s_hw = Σ_c x_chw, channel weights
    log(Σ_k Q_k / Q_c) of the fraction Q_c of non-zero positions (+1e-6), (C,) = weight_c · Σ_hw S_hw x_chw.
    An all-zero map gives zeros."""
    x = _map(x)
    s = x.sum(axis=0, dtype=np.float64)
    norm = (s ** a).sum() ** (1.0 / a)
    if norm <= 0:
        return np.zeros(x.shape[0], np.float32)
    spatial = (s / norm) ** (1.0 / b)
    q = np.count_nonzero(x.reshape(x.shape[0], -1), axis=1) / (x.shape[1] * x.shape[2]) + EPS
    channel = np.log(q.sum() / q)
    return (_weighted_sum(x, spatial) * channel).astype(np.float32)


def scda_mask(x) -> np.ndarray:
    """SCDA's (H, W) bool mask: the largest 4-connected component (first in raster order on ties) of the
    positions whose channel sum exceeds the mean channel sum; all positions when none does (a constant
    map)."""
    s = _map(x).sum(axis=0, dtype=np.float64)
    above = s > s.mean()
    if not above.any():
        return np.ones_like(above)
    labels, n = ndimage.label(above)  # 4-connectivity (the default cross structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == 1 + int(np.argmax(sizes))


def scda(x) -> np.ndarray:
    """SCDA: (2C,) [mean, max] of the descriptors at the :func:`scda_mask` positions (the paper's avg+max of
    the selected descriptors)."""
    x = _map(x)
    sel = x[:, scda_mask(x)]  # (C, n)
    return np.concatenate([sel.mean(axis=1, dtype=np.float64).astype(np.float32), sel.max(axis=1)])


def gem(x, p: float = 3.0, eps: float = EPS) -> np.ndarray:
    """Generalised mean: (C,) (mean_hw max(x, eps)^p)^(1/p), p > 0; ``p = inf`` is MAC. Computed relative to
    the channel maximum so large p does not overflow."""
    p = float(p)
    if not p > 0:
        raise ValueError(f"gem: p must be > 0, got {p}")
    x = np.maximum(_map(x), np.float32(eps))
    top = x.max(axis=(1, 2))
    if math.isinf(p):
        return top
    rel = x / top[:, None, None]  # in (0, 1]: no overflow for any p
    if p.is_integer() and p <= 16:  # GeM's usual p = 3: repeated multiplication, ~10x faster than a power
        powed = rel.copy()
        for _ in range(int(p) - 1):
            powed *= rel
    else:
        powed = rel ** np.float32(p)
    mean = powed.mean(axis=(1, 2), dtype=np.float64)
    return (top * mean ** (1.0 / p)).astype(np.float32)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> np.ndarray:
    """The R-MAC region grid of Tolias, Sicre, Jégou (ICLR 2016) on an (h, w) map: (R, 4) int64 rows
    [x, y, width, height] (0-based top-left corners, in map cells).

    Level l = 1..L has square regions of side ⌊2·min(h, w) / (l + 1)⌋, l (+ the extra count chosen once so
    that neighbouring regions of the long side overlap by about ``overlap``) along the long side and l along
    the short side, evenly spread from edge to edge (the paper's ``rmac_regions``)."""
    if levels < 1:
        raise ValueError(f"rmac: levels must be >= 1, got {levels}")
    side = min(h, w)
    steps = np.arange(2, 8, dtype=np.float64)  # candidate region counts along the long side
    b = (max(h, w) - side) / (steps - 1)
    # the first minimum, as MATLAB's min
    idx = int(np.argmin(np.abs((side ** 2 - side * b) / side ** 2 - overlap)))
    wd = idx + 1 if h < w else 0
    hd = idx + 1 if h > w else 0
    out = []
    for lev in range(1, levels + 1):
        wl = int(math.floor(2 * side / (lev + 1)))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        bw = (w - wl) / (lev + wd - 1) if lev + wd > 1 else 0.0
        bh = (h - wl) / (lev + hd - 1) if lev + hd > 1 else 0.0
        xs = [int(math.floor(wl2 + i * bw) - wl2) for i in range(lev + wd)]
        ys = [int(math.floor(wl2 + i * bh) - wl2) for i in range(lev + hd)]
        out += [(x0, y0, wl, wl) for y0 in ys for x0 in xs]
    return np.array(out, np.int64).reshape(-1, 4)


def rmac(x, levels: int = 3) -> np.ndarray:
    """R-MAC: (C,) Σ over :func:`rmac_regions` of the L2-normalised MAC of each region (eps 1e-6)."""
    x = _map(x)
    out = np.zeros(x.shape[0], np.float64)
    for x0, y0, rw, rh in rmac_regions(x.shape[1], x.shape[2], levels):
        v = x[:, y0:y0 + rh, x0:x0 + rw].max(axis=(1, 2)).astype(np.float64)
        out += v / (np.linalg.norm(v) + EPS)
    return out.astype(np.float32)


def select_pwa_channels(gap_vectors, n: int = 25) -> np.ndarray:
    """PWA's part detectors: the ``n`` channels of largest variance over a training set's GAP vectors
    ((N, C) float), as (n,) int64 in increasing order of variance (ties by channel index)."""
    g = np.asarray(gap_vectors, np.float64)
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"pwa: expected (N >= 2, C) training GAP vectors, got shape {g.shape}")
    if not 1 <= n <= g.shape[1]:
        raise ValueError(f"pwa: n must be in [1, C={g.shape[1]}], got {n}")
    return np.argsort(g.std(axis=0), kind="stable")[-n:].astype(np.int64)


def pwa(x, channels, alpha: float = 2.0, beta: float = 2.0) -> np.ndarray:
    """PWA: for each selected channel k, weights w_k = (x_k / (‖x_k‖_α + 1e-5))^(1/β) over positions and the
    weighted sum Σ_hw w_k,hw x_chw; (n·C,) concatenated in the order of ``channels``."""
    x = _map(x)
    ch = np.asarray(channels, np.int64).reshape(-1)
    if ch.size == 0 or ch.min() < 0 or ch.max() >= x.shape[0]:
        raise ValueError(f"pwa: channels must be non-empty indices in [0, C={x.shape[0]}), got {ch[:8]}")
    parts = x[ch].astype(np.float64)  # (n, H, W)
    norm = ((parts ** alpha).sum(axis=(1, 2), keepdims=True)) ** (1.0 / alpha)
    wts = ((parts / (norm + 1e-5)) ** (1.0 / beta)).astype(np.float32)
    c = x.shape[0]
    return (wts.reshape(ch.size, -1) @ x.reshape(c, -1).T).reshape(-1).astype(np.float32)  # (n, C) GEMM


def pcb(x, pool, stripes: int = 2) -> np.ndarray:
    """PCB: ``pool`` (a function of a (C, h, W) map) of ``stripes`` horizontal stripes of height ⌊H / stripes⌋
    (from the top; the remainder rows only count in the whole map) and of the whole map, concatenated."""
    x = _map(x)
    if not 1 <= stripes <= x.shape[1]:
        raise ValueError(f"pcb: stripes must be in [1, H={x.shape[1]}], got {stripes}")
    step = x.shape[1] // stripes
    parts = [pool(x[:, i * step:(i + 1) * step, :]) for i in range(stripes)]
    return np.concatenate(parts + [pool(x)]).astype(np.float32)


# name -> (function, output dim as a function of C): the one list of what exists (config strings map here).
POOLINGS = {
    "gap": gap, "gmp": gmp, "mac": mac, "spoc": spoc, "crow": crow, "scda": scda, "gem": gem, "rmac": rmac,
    "pwa": pwa,
}
