"""Query expansion records: average query expansion (AQE / αQE) and Hamming query expansion (HQE).

Both build a new query representation from the query and its reliable top-ranked database images; the query
path (:mod:`d2r.query.pipeline`) picks the neighbours and searches again. This module only does the record
arithmetic.

- ``aqe`` (Chum et al. 2007; αQE, Radenović et al. 2018): the weighted average of the query's aggregated
  representation (weight 1) and the neighbours' records as the index holds them (weight ``(max(s_i, 0) / s_q)^α``,
  s_i a neighbour's similarity, s_q the query's self-similarity; α = 0 is the plain average). VLAD: average
  vector, L2-normalised. ASMK: per visual word, the weighted sum of the unit vectors of every record holding the
  word, renormalised. ASMK*: the same sum of ±1 vectors (bit b → 2b − 1), binarised by sign (a weighted majority
  vote per bit; a tie keeps the query's bit, else gives 0). The word set is the union.
- ``hqe`` (Tolias & Jégou, Pattern Recognition 2014): per visual word, the query's local descriptors are joined
  by the neighbours' descriptors assigned to the same word whose binary signature (sign of the residual to the
  word's centroid) is within ``hamming`` × D bits of a query descriptor's signature. A neighbour is reliable
  when it is verified or, without verification, when at least ``min_matches`` query descriptors find such a
  match. The joined set is re-aggregated (ASMK residual sums per word, normalised, binarised for ASMK*): the word
  set stays the query's, so the expanded query costs no more to search.

The expanded query is an :class:`~d2r.aggregate.Aggregated` (whole image, no regions), so it searches a
database in either mode (regional aggregation or regional search).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from d2r.aggregate import Aggregated, Aggregator, get_kernel, similarity
from d2r.codebook import Codebook
from d2r.kernels.aggregate import group_residuals
from d2r.signatures import HAMMING, bit_threshold, hamming_correspondences, signatures


# ---- αQE ------------------------------------------------------------------------------------------------------
def average_expansion(query: Aggregated, neighbours: Sequence[Aggregated], weights) -> Aggregated:
    """The weighted average of ``query`` (weight 1) and ``neighbours`` (``weights`` (n,) float, >= 0).

    All records must share kernel, K and D; regional records are treated like whole-image ones. No neighbours
    (or all weights 0) returns ``query`` itself.
    """
    neighbours = list(neighbours)
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape[0] != len(neighbours):
        raise ValueError(f"weights: expected {len(neighbours)} values, got {w.shape[0]}")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("weights must be finite and >= 0")
    for n in neighbours:
        if (n.kernel, n.num_words, n.dim) != (query.kernel, query.num_words, query.dim):
            raise ValueError(f"neighbour is {n.kernel} K={n.num_words} D={n.dim}; query is {query.kernel} "
                             f"K={query.num_words} D={query.dim}")
    keep = [(n, x) for n, x in zip(neighbours, w) if x > 0]
    if not keep:
        return query
    records = [query] + [n for n, _ in keep]
    ws = np.concatenate([[1.0], [x for _, x in keep]])
    if not get_kernel(query.kernel).per_word:  # VLAD: one dense vector
        v = sum(x * r.vector.astype(np.float64) for r, x in zip(records, ws))
        v = v / np.sqrt(max(float(v @ v), 1e-12))
        return Aggregated(query.kernel, query.dim, query.num_words, 0, vector=v.astype(np.float32))
    words = np.concatenate([r.words.astype(np.int64) for r in records])
    vecs = np.concatenate([_votes(r) * x for r, x in zip(records, ws)])
    uniq, inverse = np.unique(words, return_inverse=True)
    sums = np.zeros((uniq.shape[0], query.dim))
    np.add.at(sums, inverse, vecs)
    if query.bits is not None:
        # Binary records vote ±1 per bit. A tied vote keeps the query's own bit (with an even number of
        # records, one neighbour say, a tie would otherwise clear every bit where the two disagree); only the
        # sign of a sum is used.
        rows = np.searchsorted(uniq, query.words.astype(np.int64))
        block = sums[rows]
        tied = block == 0
        block[tied] = 1e-3 * _votes(query)[tied]
        sums[rows] = block
    return _finish(query, uniq, sums)


def _votes(record: Aggregated) -> np.ndarray:
    """A per-word record's rows as float64 votes (W, D): ASMK's unit vectors, ASMK*'s bits as ±1."""
    if record.bits is not None:  # packed MSB-first signatures (W, B) uint8 -> {−1, +1}
        return np.unpackbits(record.bits, axis=1)[:, :record.dim].astype(np.float64) * 2.0 - 1.0
    return record.descriptors.astype(np.float64)


def _finish(like: Aggregated, words: np.ndarray, sums: np.ndarray) -> Aggregated:
    """The kernel's finish (as :meth:`Aggregator.finish`) of merged sums, a whole-image record like ``like``."""
    return get_kernel(like.kernel).finish(like.dim, like.num_words, words, sums, 0, None)


def aqe_weights(query: Aggregated, neighbours: Sequence[Aggregated], alpha: float, normalize: bool = True):
    """αQE weights (n,) float64: (max(s_i, 0) / s_q)^α with s_i = similarity(query, neighbour_i) and s_q the
    query's self-similarity (ASMK kinds: σ_{3,0}, normalised as ``normalize``). α = 0 gives ones."""
    if alpha == 0 or not neighbours:
        return np.ones(len(neighbours))
    sq = similarity(query, query, normalize=normalize)
    if sq <= 0:
        return np.ones(len(neighbours))
    s = np.array([max(similarity(query, n, normalize=normalize), 0.0) for n in neighbours])
    return (s / sq) ** float(alpha)


# ---- HQE ------------------------------------------------------------------------------------------------------
def hamming_expansion(codebook: Codebook, kernel: str, query_descriptors: np.ndarray, query_words: np.ndarray,
                      neighbours: Sequence[tuple[np.ndarray, np.ndarray]], hamming: float = HAMMING,
                      min_matches: int = 0):
    """HQE: the query re-aggregated with the Hamming-agreeing descriptors of its neighbours.

    query_descriptors (N, D) float32, query_words (N, m) int64 (the query's assignments); neighbours: per
    reliable image (descriptors (F, D) float32, words (F,) int64, its nearest words). A neighbour descriptor joins
    (once) when a query descriptor with the same word is within ``floor(hamming · D)`` bits; a neighbour whose
    matches cover fewer than ``min_matches`` query descriptors adds nothing. Returns (Aggregated ASMK or ASMK*,
    added (n,) int64: descriptors added per neighbour).
    """
    if not get_kernel(kernel).per_word:
        raise ValueError(f"hqe needs an ASMK kernel (asmk or asmk_star), not {kernel!r}")
    c = codebook.centroids
    d = codebook.dim
    qx = np.ascontiguousarray(query_descriptors, np.float32)
    qw = np.ascontiguousarray(query_words, np.int64).reshape(qx.shape[0], -1)
    m = qw.shape[1]
    flat_w = qw.reshape(-1)
    flat_f = np.repeat(np.arange(qx.shape[0]), m)
    q_sigs = signatures(qx[flat_f], flat_w, c) if flat_w.size else np.zeros((0, (d + 7) // 8), np.uint8)
    bits = bit_threshold(hamming, d)
    add_x, add_w, added = [], [], []
    for x, w in neighbours:
        x = np.ascontiguousarray(x, np.float32)
        w = np.asarray(w, np.int64).reshape(-1)
        qi, fi = hamming_correspondences(flat_w, q_sigs, w, signatures(x, w, c) if w.size else q_sigs[:0], bits)
        if np.unique(flat_f[qi]).size < max(min_matches, 1):
            added.append(0)
            continue
        f = np.unique(fi)
        add_x.append(x[f])
        add_w.append(w[f])
        added.append(int(f.size))
    agg = Aggregator(codebook, kernel)
    zero = np.zeros(qx.shape[0], np.int64)
    keys, sums = group_residuals(qx, c, qw, zero, codebook.size)
    if add_x:
        ax = np.concatenate(add_x)
        aw = np.concatenate(add_w).reshape(-1, 1)
        k2, s2 = group_residuals(ax, c, aw, np.zeros(ax.shape[0], np.int64), codebook.size)
        allk = np.concatenate([keys, k2])
        uniq, inv = np.unique(allk, return_inverse=True)
        merged = np.zeros((uniq.shape[0], d))
        np.add.at(merged, inv, np.concatenate([sums, s2]))
        keys, sums = uniq, merged
    return agg.finish(keys, sums), np.asarray(added, np.int64)
