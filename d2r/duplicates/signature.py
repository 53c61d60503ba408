"""The Goldberg image signature (Wong, Bern & Goldberg, "An image signature for any kind of image", ICIP 2002)
with the parameters and the arithmetic of ``image-match`` 1.1.2 (``ImageSignature().generate_signature``), so
that signatures are equal array for array (tests/test_duplicates_signature.py checks it on real photos).

Steps, on an (H, W, 3) uint8 RGB image:

1. grey levels in [0, 1]: ``rgb / 255`` (float64) times the Rec. 709 luma weights (0.2125, 0.7154, 0.0721), as
   scikit-image's ``rgb2gray``;
2. the window: the rows (columns) where the cumulative sum of absolute horizontal (vertical) grey differences
   passes its 5th and 95th percentiles (a featureless image keeps 5 %-95 % of each side);
3. an n × n grid (n = 9) of points spread evenly inside the window, the border points left out;
4. the mean grey of a P × P square at each point, P = max(2, int(0.5 + min(H, W) / 20)), clipped at the border;
5. at each grid point, the differences "point minus neighbour" to its 8 neighbours (upper left, up, upper right,
   left, right, lower left, down, lower right; 0 where the neighbour is off the grid);
6. differences with |d| < 2/255 are 0; the positive ones are binned by their percentiles into 1, 2, then the
   negative ones into −1, −2 (``n_levels`` = 2), in place and in that order (a value that a bin already set is
   seen by the later bins, as in image-match).

The flattened (n, n, 8) array is the signature: (648,) int8 in {−2, −1, 0, 1, 2}. Two signatures are compared by
the normalised distance ``‖a − b‖ / (‖a‖ + ‖b‖)`` (:func:`d2r.kernels.signature.normalized_distances`); image-match
calls a pair a match below 0.45. For candidate retrieval each signature yields ``n_words`` = 63 words of
``word_length`` = 16 consecutive values (evenly spaced starts, the last ones zero-padded), clipped to {−1, 0, 1}
and read as base-3 integers (:func:`words`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2r.features.image import load_image

# Rec. 709 luma, the weights of scikit-image's rgb2gray (and so of image-match).
GREY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721], np.float64)
# Neighbour offsets (row, column) in the order of a signature's 8 values per grid point.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class SignatureConfig:
    """Parameters of the signature and of its words (the defaults are image-match's and the paper's).

    grid: grid points per side; crop_percentiles: the window's cumulative-gradient percentiles;
    identical_tolerance: differences below this are 0; n_levels: bins per sign; word_length, n_words: the words
    of candidate retrieval (image-match's k and N); threshold: pairs with a normalised distance below this are
    near-duplicates (image-match's distance_cutoff)."""
    grid: int = 9
    crop_percentiles: tuple = (5, 95)
    identical_tolerance: float = 2 / 255
    n_levels: int = 2
    word_length: int = 16
    n_words: int = 63
    threshold: float = 0.45

    def __post_init__(self):
        lo, hi = self.crop_percentiles
        if not (isinstance(self.grid, int) and self.grid >= 2) or not 0 <= lo < hi <= 100 \
                or not 0 <= self.identical_tolerance <= 1 or self.n_levels < 1:
            raise ValueError(f"signature config: bad parameters {self}")
        if not 1 <= self.word_length <= self.length or not 1 <= self.n_words <= self.length:
            raise ValueError(f"signature config: word_length and n_words must be 1..{self.length}")
        if self.word_length > 39:  # 3**40 > 2**63: a word must fit an int64
            raise ValueError("signature config: word_length must be at most 39")

    @property
    def length(self) -> int:
        """Values per signature: grid² × 8."""
        return self.grid * self.grid * len(NEIGHBOURS)


DEFAULT = SignatureConfig()


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float64 grey levels in [0, 1] of an (H, W, 3) uint8 RGB image (scikit-image's rgb2gray)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    # the same two numpy operations as rgb2gray (uint8 -> float by multiplying by 1/255, then a matmul), so that
    # the grey levels are equal bit for bit and no threshold below sees another value
    return np.multiply(rgb, 1.0 / 255, dtype=np.float64) @ GREY_WEIGHTS


def _window(grey: np.ndarray, lower: float, upper: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) of the window holding the middle of the image's gradient mass."""
    row_mass = np.cumsum(np.sum(np.abs(np.diff(grey, axis=1)), axis=1))
    col_mass = np.cumsum(np.sum(np.abs(np.diff(grey, axis=0)), axis=0))
    out = []
    for mass, side in ((row_mass, grey.shape[0]), (col_mass, grey.shape[1])):
        first = int(np.searchsorted(mass, np.percentile(mass, lower), side="right"))
        last = int(np.searchsorted(mass, np.percentile(mass, upper), side="left"))
        if first > last:  # (nearly) featureless along this axis: a fixed window
            first, last = int(lower / 100.0 * side), int(upper / 100.0 * side)
        out.append((first, last))
    return out[0], out[1]


def _grid_means(grey: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(n, n) float64 mean grey of the P × P square at each grid point (clipped to the image)."""
    h, w = grey.shape
    p = max(2, int(0.5 + min(h, w) / 20.0))
    half = (p + 1) // 2  # the square starts at int(max(x - P/2, 0)): x - P/2 rounded down
    means = np.zeros((rows.size, cols.size))
    for i, r in enumerate(rows.tolist()):
        r0 = max(r - half, 0)
        for j, c in enumerate(cols.tolist()):
            c0 = max(c - half, 0)
            # np.mean of the same slice: the same pairwise summation as image-match, the same last bit
            means[i, j] = np.mean(grey[r0:min(r0 + p, h), c0:min(c0 + p, w)])
    return means


def _differences(means: np.ndarray) -> np.ndarray:
    """(n, n, 8) float64: grid point minus each neighbour (0 off the grid)."""
    n, m = means.shape
    out = np.zeros((n, m, len(NEIGHBOURS)))
    for k, (dr, dc) in enumerate(NEIGHBOURS):
        r0, r1 = max(0, -dr), n - max(0, dr)  # rows whose neighbour is on the grid
        c0, c1 = max(0, -dc), m - max(0, dc)
        out[r0:r1, c0:c1, k] = means[r0:r1, c0:c1] - means[r0 + dr:r1 + dr, c0 + dc:c1 + dc]
    return out


def _quantise(d: np.ndarray, tolerance: float, n_levels: int) -> None:
    """Bin the flat differences ``d`` in place into {−n_levels .. n_levels} (see the module docstring)."""
    small = np.abs(d) < tolerance
    d[small] = 0.0
    if small.all():
        return
    # each difference appears once per sign (a − b and b − a), so both sides are non-empty here
    pos_edges = np.percentile(d[d > 0.0], np.linspace(0, 100, n_levels + 1))
    neg_edges = np.percentile(d[d < 0.0], np.linspace(100, 0, n_levels + 1))
    # one bin after the other on the array being rewritten: a value set by a bin can fall into a later bin
    # (a difference of exactly 1.0, black against white), as in image-match
    for level in range(n_levels):
        lo, hi = pos_edges[level], pos_edges[level + 1]
        d[(d >= lo) & (d <= hi)] = level + 1
    for level in range(n_levels):
        hi, lo = neg_edges[level], neg_edges[level + 1]
        d[(d <= hi) & (d >= lo)] = -(level + 1)


def signature_of_pixels(rgb: np.ndarray, config: SignatureConfig = DEFAULT) -> np.ndarray:
    """(grid² × 8,) int8 signature of an (H, W, 3) uint8 RGB image ((648,) with the defaults)."""
    grey = grey_levels(rgb)
    (top, bottom), (left, right) = _window(grey, *config.crop_percentiles)
    n = config.grid
    rows = np.linspace(top, bottom, n + 2, dtype=int)[1:-1]
    cols = np.linspace(left, right, n + 2, dtype=int)[1:-1]
    d = _differences(_grid_means(grey, rows, cols)).ravel()
    _quantise(d, config.identical_tolerance, config.n_levels)
    return d.astype(np.int8)


def signature(image, config: SignatureConfig = DEFAULT) -> np.ndarray:
    """(648,) int8 signature of an image: a path, a PIL image or an array (read by
    :func:`d2r.features.image.load_image`: EXIF orientation applied, any mode converted to RGB)."""
    return signature_of_pixels(load_image(image), config)


def words(signatures: np.ndarray, config: SignatureConfig = DEFAULT) -> np.ndarray:
    """(N, n_words) int64 word keys of (N, L) int8 signatures: word w is the ``word_length`` values from start
    ``int(w · L / n_words)`` (zero-padded past the end), clipped to {−1, 0, 1}, read as base-3 digits (+1), the
    first value least significant (image-match's simple words)."""
    sig = np.asarray(signatures)
    if sig.ndim != 2 or sig.shape[1] != config.length:
        raise ValueError(f"signatures: expected (N, {config.length}), got {sig.shape}")
    k, length = config.word_length, config.length
    starts = np.linspace(0, length, config.n_words, endpoint=False).astype(int)
    padded = np.zeros((sig.shape[0], length + k), np.int64)
    padded[:, :length] = np.sign(sig)
    out = np.zeros((sig.shape[0], config.n_words), np.int64)
    for j in range(k):  # digit j of every word at once: (N, n_words) at a time, not (N, n_words, k)
        out += (padded[:, starts + j] + 1) * 3 ** j
    return out
