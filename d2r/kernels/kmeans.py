"""k-means update steps: per-cluster sums and counts, squared distances to the assigned centroid."""

import numpy as np
from numba import njit


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
