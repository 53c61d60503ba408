"""Nearest-visual-word selection after a BLAS distance GEMM."""

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=False)
def smallest_per_row(dots, centroid_sq_norms, c):
    """Indices of the ``c`` smallest ``‖c_k‖² − 2⟨x, c_k⟩`` per row (ascending; equal values keep the lower index).

    dots: (n, K) float32 ⟨x_i, c_k⟩; centroid_sq_norms: (K,) float32. Returns (n, c) int64. One pass over each row
    with a small insertion buffer: O(n·K) comparisons, no sort of the K distances.
    """
    n, K = dots.shape
    out = np.empty((n, c), np.int64)
    for i in prange(n):
        best_d = np.full(c, np.inf, np.float32)
        best_i = np.full(c, -1, np.int64)
        worst = np.float32(np.inf)
        row = dots[i]
        for k in range(K):
            d = centroid_sq_norms[k] - np.float32(2.0) * row[k]
            if d < worst:
                j = c - 1
                while j > 0 and best_d[j - 1] > d:
                    best_d[j] = best_d[j - 1]
                    best_i[j] = best_i[j - 1]
                    j -= 1
                best_d[j] = d
                best_i[j] = k
                worst = best_d[c - 1]
        for j in range(c):
            out[i, j] = best_i[j]
    return out


@njit(cache=True)
def refine_exact(x, centroids, candidates, m):
    """Re-rank candidate words by exact float64 squared L2 and keep the ``m`` nearest, ties by lower word index.

    x: (n, D) float32; centroids: (K, D) float32; candidates: (n, c) int64 with c ≥ m. Returns (n, m) int64.
    The float32 GEMM shortlist can misorder words whose distances differ by less than its rounding error; this
    makes the assignment exact (and equal to a float64 brute force) at a cost of n·c·D flops.
    """
    n, c = candidates.shape
    D = x.shape[1]
    out = np.empty((n, m), np.int64)
    dist = np.empty(c, np.float64)
    idx = np.empty(c, np.int64)
    for i in range(n):
        for j in range(c):
            k = candidates[i, j]
            s = 0.0
            for t in range(D):
                diff = np.float64(x[i, t]) - np.float64(centroids[k, t])
                s += diff * diff
            dist[j] = s
            idx[j] = k
        for a in range(m):  # partial selection sort on (distance, index)
            best = a
            for b in range(a + 1, c):
                if dist[b] < dist[best] or (dist[b] == dist[best] and idx[b] < idx[best]):
                    best = b
            dist[a], dist[best] = dist[best], dist[a]
            idx[a], idx[best] = idx[best], idx[a]
            out[i, a] = idx[a]
    return out
