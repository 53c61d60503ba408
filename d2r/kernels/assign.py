"""Nearest-visual-word selection after a BLAS distance GEMM.

All serial, ``cache=True`` and ``nogil=True``: :meth:`d2r.Codebook.assign` runs the GEMM in blocks and, for large
inputs, spreads the row blocks over Python threads (BLAS held at one thread meanwhile), so one thread pool does
all the work and no OpenMP pool ever spins beside BLAS.
"""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def update_shortlist(dots, centroid_sq_norms, k0, best_d, best_i):
    """Merge one column block of words into each row's running shortlist of the ``c`` smallest distances.

    dots: (n, B) float32 ⟨x_i, c_k⟩ for words k0 … k0 + B − 1; centroid_sq_norms: (B,) float32 ‖c_k‖² of the same
    words; best_d: (n, c) float32 running smallest ``‖c_k‖² − 2⟨x_i, c_k⟩`` ascending (start at +inf), best_i:
    (n, c) int64 their word indices (start at -1); both updated in place. Equal values keep the lower index when
    blocks come in increasing k0. One pass with a small insertion buffer: O(n·B) comparisons, no sort.
    """
    n, B = dots.shape
    c = best_d.shape[1]
    two = np.float32(2.0)
    for i in range(n):
        bd = best_d[i]
        bi = best_i[i]
        worst = bd[c - 1]
        row = dots[i]
        for k in range(B):
            d = centroid_sq_norms[k] - two * row[k]
            if d < worst:
                j = c - 1
                while j > 0 and bd[j - 1] > d:
                    bd[j] = bd[j - 1]
                    bi[j] = bi[j - 1]
                    j -= 1
                bd[j] = d
                bi[j] = k0 + k
                worst = bd[c - 1]


@njit(cache=True, nogil=True)
def smallest_per_row(dots, centroid_sq_norms, c):
    """Indices of the ``c`` smallest ``‖c_k‖² − 2⟨x, c_k⟩`` per row (ascending; equal values keep the lower index).

    dots: (n, K) float32 ⟨x_i, c_k⟩; centroid_sq_norms: (K,) float32. Returns (n, c) int64.
    """
    n = dots.shape[0]
    best_d = np.full((n, c), np.inf, np.float32)
    best_i = np.full((n, c), -1, np.int64)
    update_shortlist(dots, centroid_sq_norms, 0, best_d, best_i)
    return best_i


@njit(cache=True, nogil=True)
def _sq_dist64(x, centroids, i, k):
    s = 0.0
    for t in range(x.shape[1]):
        diff = np.float64(x[i, t]) - np.float64(centroids[k, t])
        s += diff * diff
    return s


@njit(cache=True, nogil=True)
def refine_exact(x, centroids, candidates, m):
    """Re-rank candidate words by exact float64 squared L2 and keep the ``m`` nearest, ties by lower word index.

    x: (n, D) float32; centroids: (K, D) float32; candidates: (n, c) int64 with c ≥ m. Returns (n, m) int64.
    """
    n = candidates.shape[0]
    full = np.zeros(n, np.bool_)
    return refine_or_scan(x, centroids, candidates, full, m)


@njit(cache=True, nogil=True)
def refine_or_scan(x, centroids, candidates, full, m):
    """The ``m`` nearest words per row by exact float64 squared L2, ties by lower word index.

    Rows with ``full[i]`` False are re-ranked among their candidates (n, c) int64; rows with ``full[i]`` True
    (a float32 shortlist too narrow to be sure) are scanned over all K words. Returns (n, m) int64.
    """
    n, c = candidates.shape
    K = centroids.shape[0]
    out = np.empty((n, m), np.int64)
    dist = np.empty(max(c, m), np.float64)
    idx = np.empty(max(c, m), np.int64)
    for i in range(n):
        if full[i]:  # keep the m best of all K by (distance, index), insertion into a sorted buffer
            for a in range(m):
                dist[a] = np.inf
                idx[a] = K
            for k in range(K):
                d = _sq_dist64(x, centroids, i, k)
                if d < dist[m - 1]:  # k increases, so an equal distance never displaces a lower index
                    j = m - 1
                    while j > 0 and dist[j - 1] > d:
                        dist[j] = dist[j - 1]
                        idx[j] = idx[j - 1]
                        j -= 1
                    dist[j] = d
                    idx[j] = k
            for a in range(m):
                out[i, a] = idx[a]
            continue
        for j in range(c):
            k = candidates[i, j]
            dist[j] = _sq_dist64(x, centroids, i, k)
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
