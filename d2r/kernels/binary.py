"""Binary signatures (ASMK*): sign or threshold binarisation packed MSB-first, and popcount Hamming distance."""

import numpy as np
from numba import njit


@njit(cache=True)
def pack_bits(unit, words, thresholds):
    """Binarise rows of ``unit`` (W, D) float32 and pack them MSB-first into (W, ceil(D/8)) uint8.

    Bit t of row w is 1 iff unit[w, t] > threshold, the threshold being 0 (sign, the official rule) when
    ``thresholds`` has no rows, else thresholds[words[w], t] (per-word medians, Hamming embedding).
    Padding bits of the last byte are 0.
    """
    W, D = unit.shape
    nbytes = (D + 7) // 8
    out = np.zeros((W, nbytes), np.uint8)
    use_thr = thresholds.shape[0] > 0
    for w in range(W):
        for t in range(D):
            thr = thresholds[words[w], t] if use_thr else np.float32(0.0)
            if unit[w, t] > thr:
                out[w, t >> 3] |= np.uint8(1 << (7 - (t & 7)))
    return out


@njit(cache=True, inline="always")
def popcount8(b):
    b = b - ((b >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return (b + (b >> 4)) & 0x0F


@njit(cache=True)
def hamming(a, b):
    """Number of differing bits between two packed rows (uint8, same length)."""
    h = 0
    for i in range(a.shape[0]):
        h += popcount8(np.int64(a[i] ^ b[i]))
    return h
