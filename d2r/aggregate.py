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

KERNELS = ("vlad", "asmk", "asmk_star")
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
        if self.kernel == "vlad":
            return not np.any(self.vector)
        return self.words.shape[0] == 0

    def __len__(self) -> int:
        """Number of visual words kept (ASMK kinds); K·D for VLAD."""
        return int(self.vector.shape[0] if self.kernel == "vlad" else self.words.shape[0])


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
        thresholds: ASMK* only: (K, D) per-word binarisation thresholds (e.g. :func:`median_thresholds`, the
            Hamming-embedding variant); None binarises by sign as the official code.

    Call ``agg(descriptors)`` for one image, ``agg(descriptors, regions=counts)`` for the regional variants
    (descriptors concatenated region by region, ``counts[r]`` of them in region r, zeros allowed).
    """

    def __init__(self, codebook, kernel: str = "asmk_star", num_assignments: int = 1, l2_normalize=None,
                 thresholds=None):
        self.codebook = codebook if isinstance(codebook, Codebook) else Codebook(codebook)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        k, d = self.codebook.size, self.codebook.dim
        if not 1 <= int(num_assignments) <= k:
            raise ValueError(f"num_assignments must be in [1, K={k}], got {num_assignments}")
        self.num_assignments = int(num_assignments)
        if l2_normalize is not None and kernel != "vlad":
            raise ValueError(f"l2_normalize applies to VLAD only; for {kernel!r} normalisation is chosen at "
                             "comparison time: similarity(..., normalize=True/False)")
        self.l2_normalize = l2_normalize
        if thresholds is not None:
            if kernel != "asmk_star":
                raise ValueError("thresholds apply to kernel='asmk_star' only")
            thresholds = np.asarray(thresholds)
            if thresholds.shape != (k, d):
                raise ValueError(f"thresholds: expected shape ({k}, {d}), got {thresholds.shape}")
            thresholds = as_descriptors(thresholds, d, name="thresholds")
        self.thresholds = thresholds

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
        k, d = self.codebook.size, self.codebook.dim
        regional = counts is not None
        num_regions = int(counts.shape[0]) if regional else 0
        region_of = (np.repeat(np.arange(num_regions, dtype=np.int64), counts) if regional
                     else np.zeros(x.shape[0], np.int64))
        keys, sums = group_residuals(x, self.codebook.centroids, assignments, region_of, k)
        if regional:
            words, sums = combine_regions(keys, sums, k, L2_EPSILON)
        else:
            words = keys  # a single region 0: keys are the words
        if self.kernel == "vlad":
            return self._vlad(words, sums, num_regions)
        scale = 1.0 / num_regions if num_regions else 1.0
        keep, unit = normalize_words(sums, scale, MIN_WORD_NORM)
        kept = words[keep].astype(np.uint32)
        if self.kernel == "asmk":
            return Aggregated("asmk", d, k, num_regions, words=kept, descriptors=unit)
        thr = self.thresholds if self.thresholds is not None else np.zeros((0, d), np.float32)
        bits = pack_bits(unit, kept.astype(np.int64), thr)
        return Aggregated("asmk_star", d, k, num_regions, words=kept, bits=bits)

    def _vlad(self, words, sums, num_regions) -> Aggregated:
        k, d = self.codebook.size, self.codebook.dim
        v = np.zeros((k, d), np.float64)
        v[words] = sums
        v = v.ravel()
        l2 = self.l2_normalize if self.l2_normalize is not None else num_regions == 0
        if l2:
            v /= np.sqrt(max(float(v @ v), L2_EPSILON))
        elif num_regions:
            v /= num_regions
        return Aggregated("vlad", d, k, num_regions, vector=v.astype(np.float32))


def similarity(a: Aggregated, b: Aggregated, alpha: float = 3.0, tau: float = 0.0, normalize: bool = True,
               tau_inclusive: bool = False, idf=None) -> float:
    """Similarity of two aggregated images.

    VLAD kinds: the dot product. ASMK kinds: S = Σ_{c ∈ W_a ∩ W_b} w_c σ_{α,τ}(u_c) with u_c = ⟨a_c, b_c⟩ (ASMK)
    or 1 − 2·h(a_c, b_c)/D (ASMK*, h the Hamming distance), σ(u) = sign(u)|u|^α if u > τ (u ≥ τ with
    ``tau_inclusive``, as jenicek/asmk) else 0; −1.0 if either side has no words. With ``normalize``,
    S / sqrt(Σ_{W_a} w · Σ_{W_b} w), i.e. S / sqrt(|W_a||W_b|) without IDF. ``idf``: optional (K,) IDF values;
    w_c = idf_c² (the original ASMK weighting); None means w_c = 1 (the official D2R code).
    """
    if a.kernel != b.kernel:
        raise ValueError(f"cannot compare a {a.kernel!r} representation with a {b.kernel!r} one")
    if (a.dim, a.num_words) != (b.dim, b.num_words):
        raise ValueError(f"representations differ in shape: D={a.dim}, K={a.num_words} vs D={b.dim}, "
                         f"K={b.num_words}")
    if a.kernel == "vlad":
        return float(np.dot(a.vector.astype(np.float64), b.vector.astype(np.float64)))
    weights = idf_weights(idf, a.num_words)
    if a.words.shape[0] == 0 or b.words.shape[0] == 0:
        return -1.0
    wa, wb = a.words, b.words
    if a.kernel == "asmk":
        s = asmk_score(wa, a.descriptors, wb, b.descriptors, float(alpha), float(tau), bool(tau_inclusive),
                       weights)
    else:
        s = asmk_star_score(wa, as_words64(a.bits), wb, as_words64(b.bits), a.dim, float(alpha), float(tau), bool(tau_inclusive),
                            weights)
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


def median_thresholds(aggregator: Aggregator, descriptor_sets) -> np.ndarray:
    """Learn per-word binarisation thresholds (K, D) float32: the median of each component of the per-word unit
    vectors over a training set of images (Hamming embedding, as the original ASMK*). Words never seen get 0
    (plain sign binarisation)."""
    asmk = Aggregator(aggregator.codebook, "asmk", aggregator.num_assignments)
    k, d = asmk.codebook.size, asmk.codebook.dim
    words, units = [], []
    for x in descriptor_sets:
        r = asmk(x)
        words.append(r.words.astype(np.int64))
        units.append(r.descriptors)
    thresholds = np.zeros((k, d), np.float32)
    if not words:
        return thresholds
    words = np.concatenate(words)
    units = np.concatenate(units)
    order = np.argsort(words, kind="stable")
    words, units = words[order], units[order]
    bounds = np.flatnonzero(np.diff(words)) + 1
    for w, block in zip(words[np.concatenate([[0], bounds])] if words.size else [], np.split(units, bounds)):
        thresholds[w] = np.median(block, axis=0)
    return thresholds
