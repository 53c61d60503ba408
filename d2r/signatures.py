"""Binary signatures sign(x − c_w) of descriptors against their visual words, and same-word Hamming pairs.

One implementation for geometric verification (Hamming correspondences) and Hamming query expansion.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np
from d2r.kernels.binary import as_words64
from d2r.kernels.correspond import hamming_pairs

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.int64)
_SIG_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


# ---- HQE ------------------------------------------------------------------------------------------------------
def signatures(descriptors: np.ndarray, words: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Binary signatures of descriptors in their words: sign(x − c_w) packed MSB-first, (N, ceil(D/8)) uint8.

    descriptors (N, D) float32, words (N,) int, centroids (K, D)."""
    r = descriptors.astype(np.float64) - centroids[words].astype(np.float64)
    return np.packbits(r > 0, axis=1)


def hamming_matches(q_words: np.ndarray, q_sigs: np.ndarray, n_words: np.ndarray, n_sigs: np.ndarray,
                    max_bits: int):
    """Pairs (i, f) with q_words[i] == n_words[f] and Hamming(q_sigs[i], n_sigs[f]) <= max_bits.

    q_words (P,) int, q_sigs (P, B) uint8 (one row per query descriptor-assignment); n_words (F,), n_sigs (F, B).
    Returns (query_rows, neighbour_rows) int64, sorted by query row then neighbour row.
    """
    if q_words.shape[0] == 0 or n_words.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(n_words, kind="stable")
    sw = n_words[order]
    lo = np.searchsorted(sw, q_words, "left")
    hi = np.searchsorted(sw, q_words, "right")
    cnt = hi - lo
    qi = np.repeat(np.arange(q_words.shape[0]), cnt)
    if qi.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt)
    fi = order[starts + np.arange(qi.size)]
    dist = _POPCOUNT8[np.bitwise_xor(q_sigs[qi], n_sigs[fi])].sum(axis=1)
    ok = dist <= max_bits
    return qi[ok].astype(np.int64), fi[ok].astype(np.int64)


# ---- "hamming" correspondences (Hamming embedding) -------------------------------------------------------
def word_signatures(descriptors: np.ndarray, codebook, num_assignments: int = 1):
    """The ``num_assignments`` (m) nearest visual words of each descriptor (N·m,) int64 and the binary
    signature in each, sign(x − c_w) packed MSB-first (N·m, ceil(D/8)) uint8; row r belongs to descriptor r // m."""
    x = np.ascontiguousarray(descriptors, np.float32)
    m = int(num_assignments)
    if x.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros((0, (codebook.dim + 7) // 8), np.uint8)
    words = np.asarray(codebook.assign(x, m), np.int64).reshape(-1)
    rows = np.repeat(np.arange(x.shape[0]), m)
    return words, np.ascontiguousarray(signatures(x[rows], words, codebook.centroids))


_SIG_CACHE_SIZE = 2048  # images; ~24 kB each at 1,000 RootSIFT features


_SIG_LOCK = threading.Lock()


def _sig_key(descriptors: np.ndarray, codebook, num_assignments: int) -> tuple:
    x = np.ascontiguousarray(descriptors, np.float32)
    return (id(codebook), codebook.size, x.shape, hashlib.blake2b(x.tobytes(), digest_size=16).digest(),
            int(num_assignments))


def _sig_get(key, codebook):
    """The cached (words, signatures) of ``key`` (made with this very ``codebook``), or None."""
    with _SIG_LOCK:
        hit = _SIG_CACHE.get(key)
        if hit is None or hit[0] is not codebook:
            return None
        _SIG_CACHE.move_to_end(key)
        return hit[1], hit[2]


def _sig_put(key, codebook, words, sigs) -> None:
    with _SIG_LOCK:
        _SIG_CACHE[key] = (codebook, words, sigs)
        while len(_SIG_CACHE) > _SIG_CACHE_SIZE:
            _SIG_CACHE.popitem(last=False)


def cached_word_signatures(descriptors: np.ndarray, codebook, num_assignments: int = 1):
    """:func:`word_signatures` memoised by (codebook, BLAKE2b of the descriptor bytes), LRU over the last
    2,048 images: a database image verified for many queries is assigned once."""
    key = _sig_key(descriptors, codebook, num_assignments)
    hit = _sig_get(key, codebook)
    if hit is None:
        hit = word_signatures(descriptors, codebook, num_assignments)
        _sig_put(key, codebook, *hit)
    return hit


def hamming_correspondences(q_words, q_sigs, x_words, x_sigs, max_bits: int):
    """Pairs (i, j) of query row i and candidate row j with the same word and Hamming distance <= ``max_bits``
    (any order of the inputs). Returns (query_ids, index_ids) int64 sorted by (i, j)."""
    if len(q_words) == 0 or len(x_words) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    oq = np.argsort(q_words, kind="stable")
    ox = np.argsort(x_words, kind="stable")
    a, b = hamming_pairs(np.ascontiguousarray(q_words[oq], np.int64),
                         as_words64(np.ascontiguousarray(q_sigs[oq])),
                         np.ascontiguousarray(x_words[ox], np.int64),
                         as_words64(np.ascontiguousarray(x_sigs[ox])), int(max_bits))
    qi, xi = oq[a], ox[b]
    order = np.lexsort((xi, qi))
    return qi[order].astype(np.int64), xi[order].astype(np.int64)


def cached_word_signatures_many(descriptor_sets, codebook) -> list:
    """:func:`cached_word_signatures` (one assignment) of many images: those not cached are assigned in one call
    (it parallelises itself), then cached. Returns ``[(words, sigs)]`` in order."""
    keys = [_sig_key(d, codebook, 1) for d in descriptor_sets]
    found = [_sig_get(key, codebook) for key in keys]
    todo = [k for k, hit in enumerate(found) if hit is None]
    if todo:
        allw, alls = word_signatures(
            np.concatenate([descriptor_sets[k] for k in todo]).reshape(-1, codebook.dim), codebook)
        cuts = np.cumsum([len(descriptor_sets[k]) for k in todo])[:-1]
        for k, w, sg in zip(todo, np.split(allw, cuts), np.split(alls, cuts)):
            found[k] = (w, sg)
            _sig_put(keys[k], codebook, w, sg)
    return found
