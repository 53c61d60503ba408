"""Query expansion: average query expansion (AQE / αQE) and Hamming query expansion (HQE).

Both build a new query representation from the query and its reliable top-ranked database images, then the
database is searched again. Reliable images are the verified ones (at least ``rerank.min_inliers`` inliers) when
geometric verification ran, else the top-scored ones.

- ``aqe`` (Chum et al. 2007; αQE, Radenović et al. 2018): the weighted average of the query's aggregated
  representation (weight 1) and the neighbours' whole-image representations (weight ``(max(s_i, 0) / s_q)^α``,
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

- database-side augmentation, DBA (Arandjelović & Zisserman 2012; with αQE, Gordo et al. 2017): offline, every
  database image's representation is replaced by the αQE average of itself and its ``dba_top`` nearest
  database images (the verified ones among them when verification is on), re-binarised for ASMK*; queries then
  search the augmented database as usual (and may be expanded as well).

The expanded query is an :class:`~d2r.aggregate.Aggregated` (whole image, no regions), so it searches a
database in either mode (regional aggregation or regional search).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from d2r.aggregate import MIN_WORD_NORM, Aggregated, similarity
from d2r.codebook import Codebook
from d2r.config import Config
from d2r.kernels.aggregate import group_residuals, normalize_words
from d2r.kernels.binary import pack_bits
from d2r.signatures import hamming_matches, signatures

QE_METHODS = ("none", "aqe", "hqe")
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.int64)


@dataclass
class ExpansionConfig(Config):
    """Query-expansion parameters (the method is ``query_expansion`` in the engine/bench config).

    Attributes:
        top: at most this many reliable top-ranked images expand the query (``--qe-top``).
        alpha: αQE exponent of the neighbour weights (0: plain average).
        hamming: HQE: a neighbour descriptor joins a query descriptor of the same word when their signatures
            differ in at most ``hamming`` × D bits (0.375: Hamming embedding's 24 of 64 bits, Jégou et al. 2008).
        min_matches: HQE without verification: a top image is reliable with at least this many query
            descriptors matched (and it must then reach ``min_matches`` to add anything at all).
        dba_top: database-side augmentation: each database image is averaged with (the verified ones of) its
            ``dba_top`` nearest database images at index time (αQE weights with ``alpha``); 0 = off.
    """

    top: int = 10
    alpha: float = 0.0
    hamming: float = 0.375
    min_matches: int = 10
    dba_top: int = 0

    def validate(self) -> "ExpansionConfig":
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1:
            raise ValueError(f"qe.top must be a positive integer, got {self.top!r}")
        if not self.alpha >= 0:
            raise ValueError(f"qe.alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.hamming <= 1:
            raise ValueError(f"qe.hamming must be a fraction of the descriptor bits in [0, 1], got {self.hamming}")
        if isinstance(self.dba_top, bool) or not isinstance(self.dba_top, int) or self.dba_top < 0:
            raise ValueError(f"qe.dba_top must be a non-negative integer, got {self.dba_top!r}")
        n = self.min_matches
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"qe.min_matches must be a non-negative integer, got {self.min_matches!r}")
        return self


def check_method(method: str) -> str:
    if method not in QE_METHODS:
        raise ValueError(f"query_expansion must be one of {list(QE_METHODS)}, got {method!r}")
    return method


# ---- αQE ------------------------------------------------------------------------------------------------------
def average_expansion(query: Aggregated, neighbours: Sequence[Aggregated], weights) -> Aggregated:
    """The weighted average of ``query`` (weight 1) and ``neighbours`` (``weights`` (n,) float, >= 0).

    All records must share kernel, K and D; regional records are treated like whole-image ones. No neighbours
    (or all weights 0 for VLAD) returns ``query`` itself.
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
    if query.kernel == "vlad":
        v = sum(x * r.vector.astype(np.float64) for r, x in zip(records, ws))
        v = v / np.sqrt(max(float(v @ v), 1e-12))
        return Aggregated("vlad", query.dim, query.num_words, 0, vector=v.astype(np.float32))
    words = np.concatenate([r.words.astype(np.int64) for r in records])
    if query.kernel == "asmk":
        vecs = np.concatenate([r.descriptors.astype(np.float64) * x for r, x in zip(records, ws)])
    else:
        vecs = np.concatenate([_signs(r.bits, r.dim) * x for r, x in zip(records, ws)])
    uniq, inverse = np.unique(words, return_inverse=True)
    sums = np.zeros((uniq.shape[0], query.dim))
    np.add.at(sums, inverse, vecs)
    if query.kernel == "asmk_star":
        # A tied vote keeps the query's own bit (with an even number of records, one neighbour say, a tie
        # would otherwise clear every bit where the two disagree); only the sign of a sum is used.
        rows = np.searchsorted(uniq, query.words.astype(np.int64))
        block = sums[rows]
        tied = block == 0
        block[tied] = 1e-3 * _signs(query.bits, query.dim)[tied]
        sums[rows] = block
    return _finish(query.kernel, query.dim, query.num_words, uniq, sums)


def _signs(bits: np.ndarray, dim: int) -> np.ndarray:
    """Packed MSB-first signatures (W, B) uint8 -> (W, dim) float64 in {−1, +1}."""
    return np.unpackbits(bits, axis=1)[:, :dim].astype(np.float64) * 2.0 - 1.0


def _finish(kernel: str, dim: int, num_words: int, words: np.ndarray, sums: np.ndarray) -> Aggregated:
    """Per-word normalisation (words with norm <= 1e-6 dropped) and, for ASMK*, sign binarisation."""
    keep, unit = normalize_words(np.ascontiguousarray(sums, np.float64), 1.0, MIN_WORD_NORM)
    kept = words[keep].astype(np.uint32)
    if kernel == "asmk":
        return Aggregated("asmk", dim, num_words, 0, words=kept, descriptors=unit)
    bits = pack_bits(unit, kept.astype(np.int64), np.zeros((0, dim), np.float32))
    return Aggregated("asmk_star", dim, num_words, 0, words=kept, bits=bits)


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


def augment_database(records: dict, neighbours: dict, alpha: float = 0.0, normalize: bool = True) -> dict:
    """Database-side augmentation: {id: αQE average of records[id] and records[n] for n in neighbours[id]}.

    records: id -> whole-image :class:`Aggregated`; neighbours: id -> ids (the image itself is skipped; ids
    without an entry keep their record). Every average uses the ORIGINAL records, so the result does not
    depend on the order of the images. Returns a new dict with the same keys."""
    out = {}
    for i, rec in records.items():
        nb = [records[n] for n in neighbours.get(i, ()) if n != i]
        out[i] = average_expansion(rec, nb, aqe_weights(rec, nb, alpha, normalize)) if nb else rec
    return out


def hamming_expansion(codebook: Codebook, kernel: str, query_descriptors: np.ndarray, query_words: np.ndarray,
                      neighbours: Sequence[tuple[np.ndarray, np.ndarray]], hamming: float = 0.375,
                      min_matches: int = 0):
    """HQE: the query re-aggregated with the Hamming-agreeing descriptors of its neighbours.

    query_descriptors (N, D) float32, query_words (N, m) int64 (the query's assignments); neighbours: per
    reliable image (descriptors (F, D) float32, words (F,) int64, its nearest words). A neighbour descriptor joins
    (once) when a query descriptor with the same word is within ``floor(hamming · D)`` bits; a neighbour whose
    matches cover fewer than ``min_matches`` query descriptors adds nothing. Returns (Aggregated ASMK or ASMK*,
    added (n,) int64: descriptors added per neighbour).
    """
    if kernel not in ("asmk", "asmk_star"):
        raise ValueError(f"hqe needs an ASMK kernel (asmk or asmk_star), not {kernel!r}")
    c = codebook.centroids
    d = codebook.dim
    qx = np.ascontiguousarray(query_descriptors, np.float32)
    qw = np.ascontiguousarray(query_words, np.int64).reshape(qx.shape[0], -1)
    m = qw.shape[1]
    flat_w = qw.reshape(-1)
    flat_f = np.repeat(np.arange(qx.shape[0]), m)
    q_sigs = signatures(qx[flat_f], flat_w, c) if flat_w.size else np.zeros((0, (d + 7) // 8), np.uint8)
    max_bits = int(np.floor(hamming * d + 1e-9))
    add_x, add_w, added = [], [], []
    for x, w in neighbours:
        x = np.ascontiguousarray(x, np.float32)
        w = np.asarray(w, np.int64).reshape(-1)
        qi, fi = hamming_matches(flat_w, q_sigs, w, signatures(x, w, c) if w.size else q_sigs[:0], max_bits)
        if np.unique(flat_f[qi]).size < max(min_matches, 1):
            added.append(0)
            continue
        f = np.unique(fi)
        add_x.append(x[f])
        add_w.append(w[f])
        added.append(int(f.size))
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
    return _finish(kernel, d, codebook.size, keys, sums), np.asarray(added, np.int64)


