"""k-means update steps: per-cluster sums and counts, squared distances to the assigned centroid."""

import numpy as np
from numba import njit, prange


@njit(cache=True)
def cluster_sums(x, labels, k):
    """Per-cluster float64 sums and int64 counts of the rows of ``x``.

    x: (n, D) float32; labels: (n,) int64 in [0, k). Returns sums (k, D) float64 and counts (k,) int64.
    Rows are added in index order, so the result is bit-for-bit reproducible.
    """
    n, d = x.shape
    sums = np.zeros((k, d), np.float64)
    counts = np.zeros(k, np.int64)
    for i in range(n):
        j = labels[i]
        counts[j] += 1
        for t in range(d):
            sums[j, t] += x[i, t]
    return sums, counts


@njit(cache=True)
def assigned_sq_distances(x, centroids, labels):
    """float64 squared L2 distance of each row of ``x`` (n, D) float32 to its centroid
    ``centroids[labels[i]]``.

    centroids: (k, D) float32; labels: (n,) int64. Returns (n,) float64.
    """
    n, d = x.shape
    out = np.empty(n, np.float64)
    for i in range(n):
        j = labels[i]
        s = 0.0
        for t in range(d):
            diff = np.float64(x[i, t]) - np.float64(centroids[j, t])
            s += diff * diff
        out[i] = s
    return out


@njit(cache=True)
def minibatch_update(centroids, sums, batch_counts, total_counts):
    """Sculley's per-centre learning rate: c_k += (sum_k − n_k·c_k) / N_k for every centre hit by the batch.

    centroids: (k, D) float64, updated in place; sums: (k, D) float64 and batch_counts: (k,) int64 of the
    batch; total_counts: (k,) int64 counts seen so far INCLUDING this batch. Returns nothing.
    """
    k, d = centroids.shape
    for j in range(k):
        nb = batch_counts[j]
        if nb == 0:
            continue
        inv = 1.0 / total_counts[j]
        for t in range(d):
            centroids[j, t] += (sums[j, t] - nb * centroids[j, t]) * inv


# Points per block of the k-means++ distance pass: one block's partial distances (trials × 256 float32) stay
# in L1 while the D coordinates stream past, and blocks are fixed, so sums do not depend on the thread count.
KMEANSPP_BLOCK = 256


@njit(cache=True, parallel=True)
def kmeanspp_steps(points_t, weights, uniforms, closest, chosen, start, stop):
    """Steps ``start`` … ``stop`` − 1 of greedy weighted k-means++ (Arthur & Vassilvitskii 2007, with the
    local trials of scikit-learn): step 0 draws a point with probability ∝ weight; every later step draws
    ``trials`` points with probability ∝ weight · ``closest`` and keeps the one whose addition lowers the
    weighted potential Σ weight · min(closest, d²) most. Run in slices so the caller can show progress.

    points_t: (D, m) float32, the points as columns (the distances to one point then vectorise over the
    points without reordering any sum: each lane is one point, so results are the same on every CPU);
    weights: (m,) float64 ≥ 0; uniforms: (k, trials) float64 in [0, 1), row s used by step s;
    closest: (m,) float64 squared distance of each point to its nearest chosen centre (float32 arithmetic),
    updated in place (its content is ignored at step 0); chosen: (k,) int64 point index per step, written for
    [start, stop). Returns the potential Σ weight · closest after step ``stop`` − 1.
    Blocks of KMEANSPP_BLOCK points run in parallel; each block sums its own part of every potential and the
    parts are added in block order, so the result is the same for any number of threads.
    """
    d, m = points_t.shape
    trials = uniforms.shape[1]
    nblocks = (m + KMEANSPP_BLOCK - 1) // KMEANSPP_BLOCK
    cum = np.empty(m, np.float64)
    tmp = np.empty((trials, m), np.float32)
    part = np.empty((trials, nblocks), np.float64)
    q = np.empty((trials, d), np.float32)
    pick = np.empty(trials, np.int64)
    pot = 0.0
    for s in range(start, stop):
        acc = 0.0
        for i in range(m):
            acc += weights[i] * (1.0 if s == 0 else closest[i])
            cum[i] = acc
        draws = 1 if s == 0 else trials
        for a in range(draws):
            r = uniforms[s, a] * acc
            lo, hi = 0, m - 1
            while lo < hi:  # the first point whose cumulative mass exceeds r (never one of mass 0)
                mid = (lo + hi) // 2
                if cum[mid] > r:
                    hi = mid
                else:
                    lo = mid + 1
            pick[a] = lo
            for t in range(d):
                q[a, t] = points_t[t, lo]
        for b in prange(nblocks):  # all draws in one pass over the points
            i0 = b * KMEANSPP_BLOCK
            i1 = min(i0 + KMEANSPP_BLOCK, m)
            for a in range(draws):
                for i in range(i0, i1):
                    tmp[a, i] = 0.0
            for t in range(d):
                for a in range(draws):
                    qa = q[a, t]
                    for i in range(i0, i1):
                        diff = points_t[t, i] - qa
                        tmp[a, i] += diff * diff
            for a in range(draws):
                p = 0.0
                for i in range(i0, i1):
                    p += weights[i] * (tmp[a, i] if s == 0 else min(closest[i], np.float64(tmp[a, i])))
                part[a, b] = p
        best = 0
        best_pot = np.inf
        for a in range(draws):
            p = 0.0
            for b in range(nblocks):
                p += part[a, b]
            if p < best_pot:  # ties keep the earlier draw
                best_pot = p
                best = a
        for i in range(m):
            v = np.float64(tmp[best, i])
            if s == 0 or v < closest[i]:
                closest[i] = v
        chosen[s] = pick[best]
        pot = best_pot
    return pot
