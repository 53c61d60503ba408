"""Top-k selection for d2r's rankings: best score first, equal scores in index (insertion) order."""

from __future__ import annotations

import numpy as np


def top_k_stable(scores, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores`` (1-D, float; NaN not allowed), best first, equal scores by
    lower index — the same as ``np.argsort(-scores, kind="stable")[:k]``, but O(n + m log m) with a partial
    selection (m = how many scores reach the k-th best, ties included). Returns int64 (min(k, n),)."""
    s = np.asarray(scores)
    n = s.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return np.zeros(0, np.int64)
    if k < n:
        kth = s[np.argpartition(-s, k - 1)[k - 1]]  # the k-th best score; every tie with it is a candidate
        candidates = np.flatnonzero(s >= kth)
    else:
        candidates = np.arange(n)
    order = np.argsort(-s[candidates], kind="stable")  # stable: ties keep the lower index first
    return candidates[order[:k]].astype(np.int64, copy=False)
