"""Goldberg signatures (d2r.duplicates): exact normalised distances, and candidate retrieval by signature words
with exact re-scoring over one segment of a signature index."""

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _distance(a, b):
    """‖a − b‖ / (‖a‖ + ‖b‖) of two int8 rows, from exact integer sums; 1.0 when both are all zero (image-match's
    value for 0/0: a featureless image matches nothing)."""
    dd = 0
    aa = 0
    bb = 0
    for t in range(a.shape[0]):
        x = np.int64(a[t])
        y = np.int64(b[t])
        dd += (x - y) * (x - y)
        aa += x * x
        bb += y * y
    den = np.sqrt(np.float64(aa)) + np.sqrt(np.float64(bb))
    if den == 0.0:
        return 1.0
    return np.sqrt(np.float64(dd)) / den


@njit(cache=True)
def normalized_distances(query, sigs, rows, out):
    """out[j] = normalised distance of ``query`` (L,) int8 to ``sigs[rows[j]]`` ((N, L) int8, rows (M,) int64);
    out (M,) float64."""
    for j in range(rows.shape[0]):
        out[j] = _distance(query, sigs[rows[j]])


@njit(cache=True)
def word_search(q_words, q_sigs, q_start, sorted_words, sorted_rows, sigs, dead, threshold, stamp, out_q,
                out_rows, out_dist):
    """Pairs (query, row) of one segment within ``threshold`` whose signatures share a word at some position.

    q_words (Q, P) int64 and q_sigs (Q, L) int8: the queries' words and signatures; sorted_words (P, N) int64:
    per word position the segment's word keys ascending, sorted_rows (P, N) int32 their rows; sigs (N, L) int8;
    dead (N,) bool: removed rows (never returned); stamp (N,) int64, −1 on the first call for these queries: the
    last query that scored each row (each candidate is scored once per query). For queries ``q_start`` on, in
    order, writes (query, row, distance) with distance < threshold into out_q / out_rows (C,) int64 and out_dist
    (C,) float64, rows in the order found. Stops before a query whose candidates might not fit (C ≥ N: every
    query fits an empty buffer). Returns (next query, pairs written)."""
    Q, P = q_words.shape
    N = sigs.shape[0]
    cap = out_q.shape[0]
    o = 0
    for qi in range(q_start, Q):
        if o + N > cap:
            return qi, o
        for p in range(P):
            keys = sorted_words[p]
            w = q_words[qi, p]
            k = np.searchsorted(keys, w)
            while k < N and keys[k] == w:
                r = np.int64(sorted_rows[p, k])
                k += 1
                if stamp[r] == qi or dead[r]:
                    continue
                stamp[r] = qi
                d = _distance(q_sigs[qi], sigs[r])
                if d < threshold:
                    out_q[o] = qi
                    out_rows[o] = r
                    out_dist[o] = d
                    o += 1
    return Q, o
