"""Residual aggregation per visual word, per region, and the per-word normalisation of ASMK."""

import numpy as np
from numba import njit


@njit(cache=True)
def group_residuals(x, centroids, assignments, region_of_feature, num_words):
    """Sum residuals x_i − c_k per (region, word) pair.

    x: (N, D) float32; centroids: (K, D) float32; assignments: (N, m) int64 words of each feature (each chosen
    word receives the full residual); region_of_feature: (N,) int64; num_words: K.
    Returns ``keys`` (G,) int64 sorted unique ``region·K + word`` and ``sums`` (G, D) float64.
    """
    n, m = assignments.shape
    D = x.shape[1]
    keys = np.empty(n * m, np.int64)
    for i in range(n):
        for j in range(m):
            keys[i * m + j] = region_of_feature[i] * num_words + assignments[i, j]
    order = np.argsort(keys, kind="mergesort")
    groups = 0
    for p in range(n * m):
        if p == 0 or keys[order[p]] != keys[order[p - 1]]:
            groups += 1
    out_keys = np.empty(groups, np.int64)
    sums = np.zeros((groups, D), np.float64)
    g = -1
    for p in range(n * m):
        f = order[p]
        key = keys[f]
        if p == 0 or key != keys[order[p - 1]]:
            g += 1
            out_keys[g] = key
        i = f // m
        k = assignments[i, f % m]
        for t in range(D):
            sums[g, t] += np.float64(x[i, t]) - np.float64(centroids[k, t])
    return out_keys, sums


@njit(cache=True)
def combine_regions(keys, sums, num_words, eps):
    """Σ over regions of each region's globally L2-normalised VLAD (the R-VLAD sum before /R or final L2).

    keys/sums: output of :func:`group_residuals` (sorted by region then word). A region's VLAD is divided by
    sqrt(max(‖V_r‖², eps)); regions without features contribute nothing. Returns (words (W,) int64 sorted,
    sums (W, D) float64).
    """
    G, D = sums.shape
    scaled = np.empty((G, D), np.float64)
    start = 0
    while start < G:
        region = keys[start] // num_words
        stop = start
        sq = 0.0
        while stop < G and keys[stop] // num_words == region:
            for t in range(D):
                sq += sums[stop, t] * sums[stop, t]
            stop += 1
        inv = 1.0 / np.sqrt(max(sq, eps))
        for g in range(start, stop):
            for t in range(D):
                scaled[g, t] = sums[g, t] * inv
        start = stop
    words = keys % num_words
    order = np.argsort(words, kind="mergesort")
    count = 0
    for p in range(G):
        if p == 0 or words[order[p]] != words[order[p - 1]]:
            count += 1
    out_words = np.empty(count, np.int64)
    out = np.zeros((count, D), np.float64)
    w = -1
    for p in range(G):
        g = order[p]
        if p == 0 or words[g] != words[order[p - 1]]:
            w += 1
            out_words[w] = words[g]
        for t in range(D):
            out[w, t] += scaled[g, t]
    return out_words, out


@njit(cache=True)
def normalize_words(sums, scale, min_norm):
    """ASMK per-word step: scale the sums, keep words whose norm exceeds ``min_norm``, divide each by its norm.

    sums: (W, D) float64. Returns (keep (W,) bool, unit (W_kept, D) float32).
    """
    W, D = sums.shape
    keep = np.zeros(W, np.bool_)
    norms = np.empty(W, np.float64)
    kept = 0
    for w in range(W):
        sq = 0.0
        for t in range(D):
            v = sums[w, t] * scale
            sq += v * v
        norms[w] = np.sqrt(sq)
        if norms[w] > min_norm:
            keep[w] = True
            kept += 1
    unit = np.empty((kept, D), np.float32)
    r = 0
    for w in range(W):
        if keep[w]:
            inv = scale / norms[w]
            for t in range(D):
                unit[r, t] = np.float32(sums[w, t] * inv)
            r += 1
    return keep, unit
