"""Selective match kernel σ_{α,τ} summed over the visual words two ASMK/ASMK* representations share."""

import numpy as np
from numba import njit

from d2r.kernels.binary import popcount


@njit(cache=True, inline="always")
def selectivity(u, alpha, tau, tau_inclusive):
    """σ(u) = sign(u)·|u|^α if u > τ (or u ≥ τ when inclusive), else 0."""
    if u > tau or (tau_inclusive and u == tau):
        a = abs(u)
        p = a * a * a if alpha == 3.0 else a ** alpha  # α = 3 is the default: skip pow
        return p if u >= 0.0 else -p
    return 0.0


@njit(cache=True)
def asmk_score(words_a, desc_a, words_b, desc_b, alpha, tau, tau_inclusive, weights):
    """Σ_c w_c σ(⟨a_c, b_c⟩) over common words c of two sorted word lists (float32 unit vectors).

    ``weights`` (K,) float64 per-word weights (IDF²), or an empty array for none. Returns the raw sum.
    """
    i = 0
    j = 0
    total = 0.0
    use_w = weights.shape[0] > 0
    D = desc_a.shape[1]
    while i < words_a.shape[0] and j < words_b.shape[0]:
        wa = words_a[i]
        wb = words_b[j]
        if wa < wb:
            i += 1
        elif wb < wa:
            j += 1
        else:
            u = 0.0
            for t in range(D):
                u += np.float64(desc_a[i, t]) * np.float64(desc_b[j, t])
            s = selectivity(u, alpha, tau, tau_inclusive)
            total += s * weights[wa] if use_w else s
            i += 1
            j += 1
    return total


@njit(cache=True)
def asmk_star_score(words_a, bits_a, words_b, bits_b, dim, alpha, tau, tau_inclusive, weights):
    """Like :func:`asmk_score` with u = 1 − 2·hamming(a_c, b_c)/D on packed signatures (uint8, or uint64 views)."""
    i = 0
    j = 0
    total = 0.0
    use_w = weights.shape[0] > 0
    chunks = bits_a.shape[1]
    while i < words_a.shape[0] and j < words_b.shape[0]:
        wa = words_a[i]
        wb = words_b[j]
        if wa < wb:
            i += 1
        elif wb < wa:
            j += 1
        else:
            h = 0
            for t in range(chunks):
                h += popcount(bits_a[i, t] ^ bits_b[j, t])
            u = 1.0 - 2.0 * h / dim
            s = selectivity(u, alpha, tau, tau_inclusive)
            total += s * weights[wa] if use_w else s
            i += 1
            j += 1
    return total
