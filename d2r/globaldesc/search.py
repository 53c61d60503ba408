"""Exact inner-product top-k over row blocks: the one scan that the global index, DBA and the tests share.

Rows are read block by block (a memory map is never loaded whole) and cast to float32 per block, so float16
storage costs half the bytes and the same code. Order: score descending, ties by lower row index, exactly as
a stable argsort of the full score row.
"""

from __future__ import annotations

import contextlib

import numpy as np

# the project's one BLAS thread policy (d2r/_threads.py after the redesign)
from d2r.codebook.codebook import _one_blas_thread

BLOCK_VALUES = 1 << 22  # values per scanned block: a 16 MB float32 temporary for float16 storage
# Fewer queries than this: one BLAS thread. Their products are matrix-vector, bound by memory bandwidth, and a
# second BLAS thread mostly spins (20x slower on a busy 2-core box, benchmarks/results/global.md).
SERIAL_QUERIES = 8


def merge_top_k(ids_a, scores_a, ids_b, scores_b, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of the union of two candidate sets per query (Q, ·): score descending, then id ascending.
    Padding (id −1, score −inf) sorts last."""
    ids = np.concatenate([ids_a, ids_b], axis=1)
    scores = np.concatenate([scores_a, scores_b], axis=1)
    key_ids = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_ids, -scores.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def block_top_k(scores: np.ndarray, k: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` columns of a (Q, n) float32 score block as global ids ``base + column``; exact under ties (a
    row whose k-th value is tied beyond the selection takes a stable full sort)."""
    q, n = scores.shape
    if n == 0:
        return np.full((q, 0), -1, np.int64), np.zeros((q, 0), np.float32)
    kk = min(k, n)
    if kk < n:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        picked = np.take_along_axis(scores, part, 1)
        t = picked.min(axis=1)
        tied = (scores >= t[:, None]).sum(axis=1) > kk
        for r in np.flatnonzero(tied):
            part[r] = np.argsort(-scores[r], kind="stable")[:kk]
    else:
        part = np.broadcast_to(np.arange(n), (q, n)).copy()
    s = np.take_along_axis(scores, part, 1)
    ids = part.astype(np.int64) + base
    ids[np.isneginf(s)] = -1
    return ids, s


def exact_top_k(queries, vectors, k: int, removed=None, block_rows: int | None = None,
                ids_a=None, scores_a=None, base: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` rows of ``vectors`` (N, D) float32/float16 (memory map fine) for ``queries`` (Q, D)
    float32 by inner product: ((Q, k) int64 row ids + ``base``, (Q, k) float32 scores), padded with −1 / −inf
    when fewer rows are live. ``removed``: (N,) bool rows to skip. ``ids_a``/``scores_a``: earlier candidates
    to merge with (scanning several segments in turn)."""
    q = np.ascontiguousarray(queries, np.float32)
    nq = q.shape[0]
    best_i = np.full((nq, 0), -1, np.int64) if ids_a is None else ids_a
    best_s = np.zeros((nq, 0), np.float32) if scores_a is None else scores_a
    n = vectors.shape[0]
    qt = q.T
    block_rows = block_rows or max(1024, BLOCK_VALUES // max(q.shape[1], 1))
    with _one_blas_thread() if nq < SERIAL_QUERIES else contextlib.nullcontext():
        return _scan(q, qt, vectors, n, k, removed, block_rows, best_i, best_s, base)


def _scan(q, qt, vectors, n, k, removed, block_rows, best_i, best_s, base):
    nq = q.shape[0]
    for a in range(0, n, block_rows):
        b = min(a + block_rows, n)
        block = np.asarray(vectors[a:b], np.float32)
        s = block @ qt  # (rows, Q): one GEMM per block
        s = np.ascontiguousarray(s.T)
        if removed is not None:
            s[:, np.asarray(removed[a:b], bool)] = -np.inf
        bi, bs = block_top_k(s, k, base + a)
        best_i, best_s = merge_top_k(best_i, best_s, bi, bs, k)
    if best_i.shape[1] < k:  # pad to exactly k columns
        pad = k - best_i.shape[1]
        best_i = np.concatenate([best_i, np.full((nq, pad), -1, np.int64)], axis=1)
        best_s = np.concatenate([best_s, np.full((nq, pad), -np.inf, np.float32)], axis=1)
    best_s = best_s.astype(np.float32)
    best_i[np.isneginf(best_s)] = -1
    return best_i, best_s
