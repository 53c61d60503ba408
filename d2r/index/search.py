"""Scoring a query against a list of segments: posting-list scans (numba), normalisation, per-image maxima, top-k.

Pure functions over :class:`~d2r.index.segment.Segment` lists; :class:`~d2r.index.database.Database` owns the state
(segments, removal flags, caches) and calls these. Scores equal :func:`d2r.similarity` against every item.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from d2r.aggregate import Aggregated
from d2r.kernels.binary import as_words64
from d2r.kernels.ivf import (document_frequency, item_weight_sums, max_per_image, normalize_scores,
                             scan_bits_items, scan_residuals, top_k_heap)

EMPTY_SCORE = -1.0  # an ASMK-kind image (or region) without visual words
SCAN_THREADS = min(2, os.cpu_count() or 1)  # threads of one ASMK* query's scan (they split the item ids)
PARALLEL_POSTINGS = 1_000_000  # scans shorter than this run on one thread (thread hand-off would dominate)
PARTS_PER_THREAD = 2  # at most this many item ranges per scan thread (a range: two searches per query word)
PART_POSTINGS = 2_000_000  # and at least this many posting entries per range
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _scan_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, SCAN_THREADS - 1), thread_name_prefix="d2r-scan")
        return _pool


class Ranking:
    """A ranked result: ``ids`` (best first), ``scores`` (float64) and, per image, ``regions``: the region index of
    its best-scoring item (regional search; 0 in aggregation mode). Unpacks as ``ids, scores = ranking``."""

    def __init__(self, ids, scores, regions):
        self.ids, self.scores, self.regions = ids, scores, regions

    def __iter__(self):
        return iter((self.ids, self.scores))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        head = ", ".join(f"{i}:{s:.4g}" for i, s in zip(self.ids[:5], self.scores[:5]))
        return f"Ranking([{head}{', ...' if len(self) > 5 else ''}])"


def document_frequencies(segments, item_live: np.ndarray, num_words: int) -> np.ndarray:
    """(K,) int64: live items holding each word, over ``segments`` (item_live: (items,) bool, all segments)."""
    df = np.zeros(num_words, np.int64)
    start = 0
    for s in segments:
        if s.offsets is not None:
            df += document_frequency(s.offsets, s.items, s.blocks, item_live[start:start + s.num_items])
        start += s.num_items
    return df


def weight_sums(segments, weights: np.ndarray) -> np.ndarray:
    """(items,) float64 Σ_{c ∈ W_i} w_c of every item (the IDF-weighted word count used to normalise)."""
    parts = [item_weight_sums(s.offsets, s.items, s.blocks, weights, s.num_items) for s in segments]
    return np.concatenate(parts) if parts else np.zeros(0)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest ``scores`` (1-D float64, no NaN), best first, equal scores by lower index:
    the same as ``np.argsort(-scores, kind="stable")[:k]`` in one O(n) pass (a k-heap, numba). int64 (k,)."""
    k = max(0, min(int(k), scores.shape[0]))
    if k == 0:
        return np.zeros(0, np.int64)
    hs, hi = top_k_heap(np.ascontiguousarray(scores, np.float64), k)
    return hi[np.lexsort((hi, -hs))]


def query_postings(segments, words: np.ndarray) -> int:
    """Posting entries an ASMK query with these ``words`` scans over ``segments``."""
    w = np.asarray(words, np.int64)
    return sum(int((s.offsets[(w + 1) * s.blocks] - s.offsets[w * s.blocks]).sum())
               for s in segments if s.offsets is not None)


def _scan_bits_part(segments, q: Aggregated, config, weights, scores, part: int, parts: int) -> None:
    """Scan item range ``part`` of ``parts`` (equal slices of every segment's items) into ``scores``."""
    qb, c = as_words64(q.bits), config
    start = 0
    for s in segments:
        m = s.num_items
        scan_bits_items(q.words, qb, s.offsets, s.items, s.blocks, as_words64(s.payload), q.dim, c.alpha,
                        c.tau, c.tau_inclusive, weights, scores[start:start + m], m * part // parts,
                        m * (part + 1) // parts)
        start += m


def item_scores(segments, q: Aggregated, kernel: str, config, weights: np.ndarray, item_words: np.ndarray,
                weight_sum=None, threads: int | None = None) -> np.ndarray:
    """Score of every item of ``segments`` (in order): exactly ``similarity(q, item)``.

    weights: (K,) float64 idf² or empty; item_words: (items,) |W_i|; weight_sum: () -> (items,) Σ w_c (called
    only when normalising with weights). threads: for ASMK*, scan on this many threads (default
    :data:`SCAN_THREADS` when the query scans at least :data:`PARALLEL_POSTINGS` entries); the threads take
    fixed item ranges (disjoint scores, each summed in the same order as one scan), so scores are
    bit-identical whatever the thread count or scheduling."""
    total = sum(s.num_items for s in segments)
    if kernel == "vlad":
        v = q.vector
        return (np.concatenate([np.asarray(s.payload, np.float32) @ v for s in segments]).astype(np.float64)
                if segments else np.zeros(0))
    scores = np.zeros(total)
    if q.words.shape[0] == 0:
        scores[:] = EMPTY_SCORE
        return scores
    c = config
    if kernel == "asmk_star":
        postings = query_postings(segments, q.words)
        if threads is None:
            threads = SCAN_THREADS if postings >= PARALLEL_POSTINGS else 1
        threads = max(1, int(threads))
        if threads == 1:
            _scan_bits_part(segments, q, c, weights, scores, 0, 1)
        else:  # threads take item ranges from a queue: a descheduled thread's share goes to the others
            parts = min(PARTS_PER_THREAD * threads, max(threads, postings // PART_POSTINGS))
            queue = itertools.count()

            def work():
                while (p := next(queue)) < parts:
                    _scan_bits_part(segments, q, c, weights, scores, p, parts)

            pool = _scan_pool()
            futures = [pool.submit(work) for _ in range(1, threads)]
            work()
            for f in futures:
                f.result()
    else:
        start = 0
        for s in segments:
            out = scores[start:start + s.num_items]
            scan_residuals(q.words, q.descriptors, s.offsets, s.items, s.blocks, s.payload, c.alpha, c.tau,
                           c.tau_inclusive, weights, out)
            start += s.num_items
    if c.normalize:
        if weights.shape[0]:
            normalize_scores(scores, float(weights[q.words].sum()), weight_sum(), item_words, EMPTY_SCORE)
        else:
            normalize_scores(scores, float(q.words.shape[0]), item_words, item_words, EMPTY_SCORE)
    else:
        scores[item_words == 0] = EMPTY_SCORE
    return scores


def image_scores(items: np.ndarray, item_image: np.ndarray, num_images: int, mode: str,
                 removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores, best item) per image from item scores (in aggregation mode ``items`` itself becomes the image
    scores: pass a fresh array); removed images score -inf."""
    if mode == "aggregation":  # exactly one item per image, in image order
        scores = items
        best = np.arange(num_images)
    else:
        scores = max_per_image(items, item_image, num_images, EMPTY_SCORE)
        best = best_item(items, item_image, scores, num_images)
    scores[removed] = -np.inf
    return scores, best


def best_item(item_scores, item_image, image_scores, n) -> np.ndarray:
    """Index of an item reaching each image's score (first in order), -1 for images without items."""
    best = np.full(n, -1, np.int64)
    hit = item_scores == image_scores[item_image]
    idx = np.flatnonzero(hit)[::-1]  # reversed so the first item wins the assignment below
    best[item_image[idx]] = idx
    return best
