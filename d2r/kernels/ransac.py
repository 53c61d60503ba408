"""Affine RANSAC inlier counting for geometric verification (3-point minimal samples).

Random samples come from a counter-free splitmix64 stream seeded per pair, so a pair's result depends only on its
matches, the seed and the trial count — never on the thread that runs it or on the other pairs in the batch.

Sampling sequence (the tests' numpy twin replays it): state = seed; each draw advances state by 0x9E3779B97F4A7C15
and mixes it (splitmix64); ``below(m)`` = ((draw >> 32) * m) >> 32. A trial draws a = below(n), b = below(n - 1)
(+1 if b >= a), c = below(n - 2) (+1 if c >= min(a, b), then +1 if c >= max(a, b)).
"""

import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S32 = np.uint64(32)


@njit(cache=True, inline="always")
def _next(state):
    """splitmix64: returns (new_state, 64 random bits), all uint64."""
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return state, z ^ (z >> _S31)


@njit(cache=True, inline="always")
def _below(bits, m):
    """Map 64 random bits to [0, m) for 0 < m < 2**32 (multiply-shift on the high 32 bits)."""
    return np.int64(((bits >> _S32) * np.uint64(m)) >> _S32)


@njit(cache=True)
def ransac_affine(src, dst, max_trials, residual_threshold, seed):
    """Best inlier count of affine models fitted to random 3-point samples of ``src -> dst``.

    src, dst: (n, 2) float64 matched point coordinates, n >= 3; residual_threshold: pixels (a point is an inlier
    when ‖A·src + t − dst‖ < threshold, strict); seed: uint64. Samples whose three source points are (nearly)
    collinear are skipped (they still use up a trial). Returns (count int64, sample (3,) int64 of the first
    sample reaching it; all -1 when every sample was degenerate).
    """
    n = src.shape[0]
    thr2 = residual_threshold * residual_threshold
    state = np.uint64(seed)
    best = np.int64(0)
    best_sample = np.full(3, -1, np.int64)
    for _ in range(max_trials):
        state, r = _next(state)
        a = _below(r, n)
        state, r = _next(state)
        b = _below(r, n - 1)
        if b >= a:
            b += 1
        state, r = _next(state)
        c = _below(r, n - 2)
        lo = min(a, b)
        hi = max(a, b)
        if c >= lo:
            c += 1
        if c >= hi:
            c += 1

        u1x = src[b, 0] - src[a, 0]
        u1y = src[b, 1] - src[a, 1]
        u2x = src[c, 0] - src[a, 0]
        u2y = src[c, 1] - src[a, 1]
        det = u1x * u2y - u1y * u2x
        if abs(det) <= 1e-9 * (u1x * u1x + u1y * u1y + u2x * u2x + u2y * u2y):
            continue
        v1x = dst[b, 0] - dst[a, 0]
        v1y = dst[b, 1] - dst[a, 1]
        v2x = dst[c, 0] - dst[a, 0]
        v2y = dst[c, 1] - dst[a, 1]
        a11 = (v1x * u2y - v2x * u1y) / det
        a12 = (v2x * u1x - v1x * u2x) / det
        a21 = (v1y * u2y - v2y * u1y) / det
        a22 = (v2y * u1x - v1y * u2x) / det
        tx = dst[a, 0] - a11 * src[a, 0] - a12 * src[a, 1]
        ty = dst[a, 1] - a21 * src[a, 0] - a22 * src[a, 1]

        count = np.int64(0)
        for i in range(n):
            ex = a11 * src[i, 0] + a12 * src[i, 1] + tx - dst[i, 0]
            ey = a21 * src[i, 0] + a22 * src[i, 1] + ty - dst[i, 1]
            if ex * ex + ey * ey < thr2:
                count += 1
        if count > best:
            best = count
            best_sample[0] = a
            best_sample[1] = b
            best_sample[2] = c
    return best, best_sample


@njit(parallel=True, cache=True)
def ransac_affine_batch(src, dst, offsets, max_trials, residual_threshold, seed, min_matches):
    """``ransac_affine`` for many pairs at once, in parallel over pairs.

    src, dst: (M, 2) float64, pair p's matches are rows offsets[p]:offsets[p+1]; offsets: (P+1,) int64.
    Pairs with fewer than ``min_matches`` (>= 3) matches score 0. Returns (counts (P,) int64, samples (P, 3) int64).
    Every pair starts from the same ``seed``.
    """
    p_count = offsets.shape[0] - 1
    counts = np.zeros(p_count, np.int64)
    samples = np.full((p_count, 3), -1, np.int64)
    for p in prange(p_count):
        s = offsets[p]
        e = offsets[p + 1]
        if e - s < min_matches:
            continue
        c, smp = ransac_affine(src[s:e], dst[s:e], max_trials, residual_threshold, seed)
        counts[p] = c
        samples[p, 0] = smp[0]
        samples[p, 1] = smp[1]
        samples[p, 2] = smp[2]
    return counts, samples
