"""The VLAD / ASMK / ASMK* family over whole images and over regions (R-VLAD, R-ASMK, R-ASMK*).

Notation: codebook C (K×D), an image's local descriptors X, residuals x − c_k of the words each x is assigned to.

- VLAD: V_k = Σ_{x→k} (x − c_k), flattened to K·D, optionally L2-normalised (ε 1e-12 on the squared norm).
- R-VLAD: the VLAD of each region r = 1..R, each L2-normalised, summed; then L2 (``l2_normalize``) or ÷R, where R
  counts empty regions too.
- ASMK: the unnormalised (R-)VLAD as K×D; words with ‖V_k‖ > 1e-6 are kept, each divided by its norm.
- ASMK*: those unit vectors binarised by sign (> 0 → 1), packed MSB-first (16 bytes per word for D = 128).

These are the official Detect-to-Retrieve semantics (see shared/REFERENCE.md), reproduced to 1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2r._validate import as_counts, as_descriptors
from d2r.codebook import Codebook
from d2r.kernels.aggregate import combine_regions, group_residuals, normalize_words
from d2r.kernels.binary import as_words64, pack_bits
from d2r.kernels.match import asmk_score, asmk_star_score

_NO_WEIGHTS = np.zeros(0, np.float64)
L2_EPSILON = 1e-12  # on the squared norm, as tf.nn.l2_normalize
MIN_WORD_NORM = 1e-6  # ASMK drops words whose aggregated residual is not larger than this


@dataclass(frozen=True, eq=False)
class Aggregated:
    """One image's aggregated representation.

    Attributes:
        kernel: "vlad", "asmk" or "asmk_star".
        dim: D, the local-descriptor dimensionality.
        num_words: K, the codebook size.
        num_regions: R for a regional aggregation (R-VLAD/R-ASMK/R-ASMK*), 0 for a whole-image one.
        vector: VLAD kinds: (K·D,) float32; else None.
        words: ASMK kinds: (W,) uint32 sorted visual words; else None.
        descriptors: ASMK: (W, D) float32 unit vectors; else None.
        bits: ASMK*: (W, ceil(D/8)) uint8 signatures packed MSB-first; else None.
    """

    kernel: str
    dim: int
    num_words: int
    num_regions: int = 0
    vector: np.ndarray | None = None
    words: np.ndarray | None = None
    descriptors: np.ndarray | None = None
    bits: np.ndarray | None = None

    @property
    def is_empty(self) -> bool:
        """True when no visual word survives (ASMK kinds) or the vector is all zero (VLAD)."""
        if not get_kernel(self.kernel).per_word:
            return not np.any(self.vector)
        return self.words.shape[0] == 0

    def __len__(self) -> int:
        """Number of visual words kept (ASMK kinds); K·D for VLAD."""
        return int(self.words.shape[0] if get_kernel(self.kernel).per_word else self.vector.shape[0])


class Aggregator:
    """Aggregate an image's local descriptors with one of the match kernels.

    Args:
        codebook: a :class:`~d2r.codebook.Codebook` (or a (K, D) centroid array).
        kernel: "vlad", "asmk" or "asmk_star".
        num_assignments: m, the number of nearest words each descriptor is assigned to (each gets the full
            residual; official default 1).
        l2_normalize: VLAD kinds only. None follows the official configs: True for VLAD, False for R-VLAD
            (which is then divided by R). ASMK kinds normalise at comparison time (``similarity(normalize=...)``),
            so passing a value for them is an error.

    Call ``agg(descriptors)`` for one image, ``agg(descriptors, regions=counts)`` for the regional variants
    (descriptors concatenated region by region, ``counts[r]`` of them in region r, zeros allowed).
    """

    def __init__(self, codebook, kernel: str = "asmk_star", num_assignments: int = 1, l2_normalize=None):
        self.codebook = codebook if isinstance(codebook, Codebook) else Codebook(codebook)
        self.kernel = get_kernel(kernel).name
        k = self.codebook.size
        if not 1 <= int(num_assignments) <= k:
            raise ValueError(f"num_assignments must be in [1, K={k}], got {num_assignments}")
        self.num_assignments = int(num_assignments)
        if l2_normalize is not None and get_kernel(kernel).per_word:
            raise ValueError(f"l2_normalize applies to VLAD only; for {kernel!r} normalisation is chosen at "
                             "comparison time: similarity(..., normalize=True/False)")
        self.l2_normalize = l2_normalize

    def __repr__(self) -> str:
        return (f"Aggregator(kernel={self.kernel!r}, K={self.codebook.size}, D={self.codebook.dim}, "
                f"num_assignments={self.num_assignments})")

    def __call__(self, descriptors, regions=None, *, assignments=None) -> Aggregated:
        """Aggregate one image (or, with ``regions``, its regions). ``assignments`` (N, m) int may be passed
        to reuse words already computed by ``codebook.assign``. N = 0 gives the empty result (zero vector /
        no words); so do regions that are all empty."""
        x = as_descriptors(descriptors, self.codebook.dim)
        n = x.shape[0]
        counts = None if regions is None else as_counts(regions, n)
        if assignments is None:
            assignments = self.codebook.assign(x, self.num_assignments)
        else:
            assignments = np.ascontiguousarray(assignments, dtype=np.int64)
            if assignments.ndim != 2 or assignments.shape[0] != n:
                raise ValueError(f"assignments: expected shape ({n}, m), got {assignments.shape}")
            if n and (assignments.min() < 0 or assignments.max() >= self.codebook.size):
                raise ValueError(f"assignments: word ids must be in [0, {self.codebook.size})")
        return self._aggregate(x, assignments, counts)

    def per_region(self, descriptors, regions, *, assignments=None) -> list[Aggregated]:
        """Aggregate each region on its own (regional search: every region is an item). Returns R records."""
        x = as_descriptors(descriptors, self.codebook.dim)
        counts = as_counts(regions, x.shape[0])
        if assignments is None:
            assignments = self.codebook.assign(x, self.num_assignments)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        return [self._aggregate(x[a:b], assignments[a:b], None) for a, b in zip(bounds[:-1], bounds[1:])]

    def _aggregate(self, x, assignments, counts) -> Aggregated:
        k = self.codebook.size
        regional = counts is not None
        num_regions = int(counts.shape[0]) if regional else 0
        region_of = (np.repeat(np.arange(num_regions, dtype=np.int64), counts) if regional
                     else np.zeros(x.shape[0], np.int64))
        keys, sums = group_residuals(x, self.codebook.centroids, assignments, region_of, k)
        if regional:
            words, sums = combine_regions(keys, sums, k, L2_EPSILON)
        else:
            words = keys  # a single region 0: keys are the words
        return self.finish(words, sums, num_regions)

    def finish(self, words, sums, num_regions: int = 0) -> Aggregated:
        """The kernel's representation of per-word residual sums: ``words`` (W,) int sorted ascending,
        ``sums`` (W, D) float64 (the R-averaged sums for a regional aggregation over ``num_regions`` regions).
        ASMK kinds normalise each word (near-zero words dropped) and ASMK* binarises by sign; VLAD builds the
        dense vector. Query expansion finishes its merged sums here too."""
        return get_kernel(self.kernel).finish(self.codebook.dim, self.codebook.size, words, sums, num_regions,
                                              self.l2_normalize)


# ---- the kernels, by name ----------------------------------------------------------------------------------
def _asmk_words(words, sums, num_regions):
    """ASMK kinds: per-word unit vectors of the (region-averaged) residual sums; near-zero words dropped."""
    scale = 1.0 / num_regions if num_regions else 1.0
    keep, unit = normalize_words(np.ascontiguousarray(sums, np.float64), scale, MIN_WORD_NORM)
    return np.asarray(words)[keep].astype(np.uint32), unit


def _finish_asmk(dim, num_words, words, sums, num_regions, l2_normalize) -> Aggregated:
    kept, unit = _asmk_words(words, sums, num_regions)
    return Aggregated("asmk", dim, num_words, num_regions, words=kept, descriptors=unit)


def _finish_asmk_star(dim, num_words, words, sums, num_regions, l2_normalize) -> Aggregated:
    kept, unit = _asmk_words(words, sums, num_regions)
    bits = pack_bits(unit)  # sign bits (official)
    return Aggregated("asmk_star", dim, num_words, num_regions, words=kept, bits=bits)


def _finish_vlad(dim, num_words, words, sums, num_regions, l2_normalize) -> Aggregated:
    """VLAD: the dense (K·D,) residual sum; L2-normalised (whole image) or divided by R (R-VLAD)."""
    v = np.zeros((num_words, dim), np.float64)
    v[np.asarray(words, np.int64)] = sums
    v = v.ravel()
    l2 = l2_normalize if l2_normalize is not None else num_regions == 0
    if l2:
        v /= np.sqrt(max(float(v @ v), L2_EPSILON))
    elif num_regions:
        v /= num_regions
    return Aggregated("vlad", dim, num_words, num_regions, vector=v.astype(np.float32))


def _score_vlad(a: Aggregated, b: Aggregated, alpha, tau, tau_inclusive, weights) -> float:
    return float(np.dot(a.vector.astype(np.float64), b.vector.astype(np.float64)))


def _score_asmk(a: Aggregated, b: Aggregated, alpha, tau, tau_inclusive, weights) -> float:
    return asmk_score(a.words, a.descriptors, b.words, b.descriptors, float(alpha), float(tau),
                      bool(tau_inclusive), weights)


def _score_asmk_star(a: Aggregated, b: Aggregated, alpha, tau, tau_inclusive, weights) -> float:
    return asmk_star_score(a.words, as_words64(a.bits), b.words, as_words64(b.bits), a.dim, float(alpha),
                           float(tau), bool(tau_inclusive), weights)


@dataclass(frozen=True)
class Kernel:
    """One match kernel, the one table entry everything dispatches through.

    ``finish``: how an image's residual sums become its representation; ``score``: how two representations
    score (before normalisation); ``per_word``: a sparse set of visual words (ASMK kinds: IDF and score
    normalisation apply) rather than one dense vector (VLAD); ``field``: the :class:`Aggregated` attribute that
    holds the representation's payload (per word for ASMK kinds); ``payload``: the file stem under which an
    index segment stores it (``bits.npy``, ``residuals.npy``, ``vectors.npy``)."""

    name: str
    per_word: bool
    finish: object
    score: object
    field: str
    payload: str

    def record(self, dim: int, num_words: int, payload, words=None, num_regions: int = 0) -> Aggregated:
        """An :class:`Aggregated` from its stored parts: ``payload`` (the ``field`` array: (W, ...) rows of
        ``words`` (W,) for ASMK kinds, the (K·D,) vector for VLAD), e.g. as read back from an index."""
        if self.per_word:
            words = np.ascontiguousarray(words, np.uint32)
            return Aggregated(self.name, dim, num_words, num_regions, words=words, **{self.field: payload})
        return Aggregated(self.name, dim, num_words, num_regions, **{self.field: payload})


# The one table of kernels: a config string maps to one entry here.
KERNEL_REGISTRY: dict[str, Kernel] = {
    "vlad": Kernel("vlad", False, _finish_vlad, _score_vlad, "vector", "vectors"),
    "asmk": Kernel("asmk", True, _finish_asmk, _score_asmk, "descriptors", "residuals"),
    "asmk_star": Kernel("asmk_star", True, _finish_asmk_star, _score_asmk_star, "bits", "bits"),
}
KERNELS = tuple(KERNEL_REGISTRY)


def get_kernel(name) -> Kernel:
    """The registry entry of a kernel name; ValueError listing the known ones."""
    kernel = KERNEL_REGISTRY.get(name) if isinstance(name, str) else None
    if kernel is None:
        raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")
    return kernel


def similarity(a: Aggregated, b: Aggregated, alpha: float = 3.0, tau: float = 0.0, normalize: bool = True,
               tau_inclusive: bool = False, idf=None) -> float:
    """Similarity of two aggregated images.

    VLAD kinds: the dot product. ASMK kinds: S = Σ_{c ∈ W_a ∩ W_b} w_c σ_{α,τ}(u_c) with u_c = ⟨a_c, b_c⟩ (ASMK)
    or 1 − 2·h(a_c, b_c)/D (ASMK*, h the Hamming distance), σ(u) = sign(u)|u|^α if u > τ (u ≥ τ with
    ``tau_inclusive``, as jenicek/asmk) else 0; −1.0 if either side has no words. With ``normalize``,
    S / sqrt(Σ_{W_a} w · Σ_{W_b} w), i.e. S / sqrt(|W_a||W_b|) without IDF. ``idf``: optional (K,) IDF values;
    w_c = idf_c² (the original ASMK weighting); None means w_c = 1 (the official D2R code).
    """
    for x in (a, b):
        if not isinstance(x, Aggregated):  # raw descriptors: AttributeError 'ndarray' has no 'kernel'
            raise TypeError("similarity compares Aggregated records (Aggregator(codebook)(descriptors)), "
                            f"got {type(x).__name__}")
    if a.kernel != b.kernel:
        raise ValueError(f"cannot compare a {a.kernel!r} representation with a {b.kernel!r} one")
    if (a.dim, a.num_words) != (b.dim, b.num_words):
        raise ValueError(f"representations differ in shape: D={a.dim}, K={a.num_words} vs D={b.dim}, "
                         f"K={b.num_words}")
    kernel = get_kernel(a.kernel)
    if not kernel.per_word:
        return kernel.score(a, b, alpha, tau, tau_inclusive, None)
    weights = idf_weights(idf, a.num_words)
    if a.words.shape[0] == 0 or b.words.shape[0] == 0:
        return -1.0
    wa, wb = a.words, b.words
    s = kernel.score(a, b, alpha, tau, tau_inclusive, weights)
    if normalize:
        if weights.shape[0]:
            norm = np.sqrt(weights[wa].sum() * weights[wb].sum())
            s = s / norm if norm > 0 else s  # all-zero IDF (e.g. a one-image database): as the database does
        else:
            s /= (float(wa.shape[0]) * float(wb.shape[0])) ** 0.5
    return float(s)


def idf_weights(idf, num_words: int) -> np.ndarray:
    """Per-word weights w_c = idf_c² as (K,) float64, or an empty array when ``idf`` is None."""
    if idf is None:
        return _NO_WEIGHTS
    idf = np.asarray(idf, dtype=np.float64)
    if idf.shape != (num_words,):
        raise ValueError(f"idf: expected shape ({num_words},), got {idf.shape}")
    return idf * idf
