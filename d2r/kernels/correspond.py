"""Tentative correspondences from visual words and binary signatures (Hamming embedding, Jégou 2008)."""

import numpy as np
from numba import njit

from d2r.kernels.binary import popcount


@njit(cache=True)
def hamming_pairs(q_words, q_sigs, x_words, x_sigs, max_bits):
    """All pairs (i, j) with q_words[i] == x_words[j] and Hamming(q_sigs[i], x_sigs[j]) <= max_bits.

    q_words (P,) int64 and x_words (F,) int64 SORTED ascending; q_sigs (P, B), x_sigs (F, B) packed signatures
    (uint8 or uint64, same B). Returns (qi, xj) int64 in row-major order of (i, j). Two passes over the
    blocks of equal words: count, then fill, so the output is allocated once.
    """
    out_n = 0
    for phase in range(2):
        if phase == 1:
            qi = np.empty(out_n, np.int64)
            xj = np.empty(out_n, np.int64)
        n = 0
        i = 0
        j = 0
        while i < q_words.shape[0] and j < x_words.shape[0]:
            if q_words[i] < x_words[j]:
                i += 1
            elif x_words[j] < q_words[i]:
                j += 1
            else:
                w = q_words[i]
                j_end = j
                while j_end < x_words.shape[0] and x_words[j_end] == w:
                    j_end += 1
                while i < q_words.shape[0] and q_words[i] == w:
                    for jj in range(j, j_end):
                        h = 0
                        for b in range(q_sigs.shape[1]):
                            h += popcount(q_sigs[i, b] ^ x_sigs[jj, b])
                        if h <= max_bits:
                            if phase == 1:
                                qi[n] = i
                                xj[n] = jj
                            n += 1
                    i += 1
                j = j_end
        out_n = n
    return qi, xj
