"""Inverted-file scan: σ_{α,τ} scores of one query against every posting of its words."""

import numpy as np
from numba import njit

from d2r.kernels.binary import popcount
from d2r.kernels.match import selectivity


@njit(cache=True, nogil=True)
def scan_bits(q_words, q_bits, offsets, items, bits, dim, alpha, tau, tau_inclusive, weights, scores):
    """Accumulate Σ_c w_c σ(1 − 2·h/D) into ``scores[item]`` for every posting of every query word.

    q_words (Wq,) int; q_bits (Wq, B) and bits (E, B) packed signatures of the same unsigned dtype; offsets
    (K+1,) int64 CSR word offsets into items/bits; items (E,) uint32 item ids; weights (K,) float64 or empty;
    scores (num_items,) float64, updated in place. Cost: the total length of the query words' posting lists.
    σ depends only on the Hamming distance h ∈ [0, D], so it is tabulated once and added without a branch.
    """
    table = np.empty(dim + 1)
    for h in range(dim + 1):
        table[h] = selectivity(1.0 - 2.0 * h / dim, alpha, tau, tau_inclusive)
    use_w = weights.shape[0] > 0
    chunks = q_bits.shape[1]
    for qi in range(q_words.shape[0]):
        w = q_words[qi]
        wt = weights[w] if use_w else 1.0
        q = q_bits[qi]
        for e in range(offsets[w], offsets[w + 1]):
            h = 0
            for t in range(chunks):
                h += popcount(q[t] ^ bits[e, t])
            scores[items[e]] += table[h] * wt


@njit(cache=True, nogil=True)
def scan_residuals(q_words, q_desc, offsets, items, desc, alpha, tau, tau_inclusive, weights, scores):
    """As :func:`scan_bits` with u = ⟨q_c, d_c⟩ on float32 unit vectors (ASMK)."""
    use_w = weights.shape[0] > 0
    D = q_desc.shape[1]
    for qi in range(q_words.shape[0]):
        w = q_words[qi]
        wt = weights[w] if use_w else 1.0
        for e in range(offsets[w], offsets[w + 1]):
            u = 0.0
            for t in range(D):
                u += np.float64(q_desc[qi, t]) * np.float64(desc[e, t])
            s = selectivity(u, alpha, tau, tau_inclusive)
            if s != 0.0:
                scores[items[e]] += s * wt


@njit(cache=True, nogil=True)
def max_per_image(item_scores, item_image, num_images, empty_value):
    """Image score = max over its items; images without items get ``empty_value``."""
    out = np.full(num_images, -np.inf)
    seen = np.zeros(num_images, np.bool_)
    for i in range(item_scores.shape[0]):
        img = item_image[i]
        seen[img] = True
        if item_scores[i] > out[img]:
            out[img] = item_scores[i]
    for j in range(num_images):
        if not seen[j]:
            out[j] = empty_value
    return out


@njit(cache=True)
def document_frequency(offsets, items, item_live):
    """Number of live items holding each word: (K,) int64."""
    K = offsets.shape[0] - 1
    df = np.zeros(K, np.int64)
    for w in range(K):
        for e in range(offsets[w], offsets[w + 1]):
            if item_live[items[e]]:
                df[w] += 1
    return df


@njit(cache=True)
def item_weight_sums(offsets, items, weights, num_items):
    """Σ_{c ∈ W_i} w_c for every item i (the IDF-weighted word count used to normalise)."""
    out = np.zeros(num_items)
    K = offsets.shape[0] - 1
    for w in range(K):
        for e in range(offsets[w], offsets[w + 1]):
            out[items[e]] += weights[w]
    return out
