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
def _sq_dist64(x, centroids, i, k):
    s = 0.0
    for t in range(x.shape[1]):
        diff = np.float64(x[i, t]) - np.float64(centroids[k, t])
        s += diff * diff
    return s


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


# ---- two-pass selection: vectorised chunk minima, then the rare candidates within the rounding margin ---
CHUNK = 64  # words per chunk minimum


@njit(cache=True, nogil=True)
def _key(b):
    """Order-preserving int32 key of float32 bits ``b`` (and its own inverse): integer min vectorises,
    float min does not in numba."""
    return b ^ ((b >> 31) & np.int32(0x7FFFFFFF))


@njit(cache=True, nogil=True)
def select_candidates(dots, centroid_sq_norms, k0, margin, wit, cand_d, cand_i, cnt):
    """Merge one column block of words into each row's witnesses and candidates (two passes, no sort).

    dots: (n, B) float32 ⟨x_i, c_k⟩ for words k0 … k0 + B − 1; centroid_sq_norms: (B,) float32;
    margin: (n,) float32 rounding margin per row. Updated in place: wit (n, m) float32 ascending (start +inf),
    the minima of m distinct chunks of words, so wit[i, m − 1] ≥ the m-th smallest ``‖c_k‖² − 2⟨x_i, c_k⟩``
    seen; cand_d (n, C) float32 / cand_i (n, C) int64 / cnt (n,) int64 (start 0): every word seen with a value
    ≤ wit[i, m − 1] + margin[i] at its block (a superset of those within the final threshold); cnt[i] = −1
    once C overflow. Pass 1 stores the row's values and their CHUNK-word minima (vectorised); pass 2 scans
    only chunks whose minimum is within the threshold.
    """
    n, B = dots.shape
    m = wit.shape[1]
    cap = cand_d.shape[1]
    nch = (B + CHUNK - 1) // CHUNK
    two = np.float32(2.0)
    buf = np.empty(B, np.float32)
    ib = buf.view(np.int32)
    cm = np.empty(nch, np.int32)
    cmf = cm.view(np.float32)
    for i in range(n):
        row = dots[i]
        for k in range(B):
            buf[k] = centroid_sq_norms[k] - two * row[k]
        for j in range(B // CHUNK):  # a constant trip count vectorises
            base = j * CHUNK
            mk = np.int32(0x7FFFFFFF)
            for k in range(CHUNK):
                mk = min(mk, _key(ib[base + k]))
            cm[j] = _key(mk)  # back to float32 bits
        if B % CHUNK:
            mk = np.int32(0x7FFFFFFF)
            for k in range(B - B % CHUNK, B):
                mk = min(mk, _key(ib[k]))
            cm[nch - 1] = _key(mk)
        w = wit[i]
        for j in range(nch):  # chunk minima are values of distinct words
            v = cmf[j]
            if v < w[m - 1]:
                a = m - 1
                while a > 0 and w[a - 1] > v:
                    w[a] = w[a - 1]
                    a -= 1
                w[a] = v
        c = cnt[i]
        if c < 0:
            continue
        t = w[m - 1] + margin[i]
        for j in range(nch):
            if cmf[j] > t:
                continue
            for k in range(j * CHUNK, min(j * CHUNK + CHUNK, B)):
                v = buf[k]
                if v <= t:
                    if c == cap:  # drop candidates above the (lower) current threshold
                        c2 = 0
                        for a in range(cap):
                            if cand_d[i, a] <= t:
                                cand_d[i, c2] = cand_d[i, a]
                                cand_i[i, c2] = cand_i[i, a]
                                c2 += 1
                        c = c2
                        if c == cap:
                            c = -1
                            break
                    cand_d[i, c] = v
                    cand_i[i, c] = k0 + k
                    c += 1
            if c < 0:
                break
        cnt[i] = c


@njit(cache=True, nogil=True)
def _scan_row(x, centroids, i, m, dist, idx, out):
    K = centroids.shape[0]
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


@njit(cache=True, nogil=True)
def finish_candidates(x, centroids, margin, cand_d, cand_i, cnt, out):
    """The m nearest words per row, equal to a float64 brute force (ties by lower word index), from
    :func:`select_candidates`' state: the words within ``margin`` of the m-th smallest float32 value are
    re-ranked in float64 unless their float32 order is already settled (exactly m words, gaps above the
    margin); rows with cnt = −1 are scanned in float64 over all K.

    x: (n, D) float32; centroids: (K, D) float32; margin (n,) float32; cand_d (n, C) float32; cand_i (n, C)
    int64; cnt (n,) int64; out (n, m) int64, written.
    """
    n, m = out.shape
    cap = cand_d.shape[1]
    dist = np.empty(max(cap, m), np.float64)
    idx = np.empty(max(cap, m), np.int64)
    vals = np.empty(cap, np.float32)
    for i in range(n):
        c = cnt[i]
        if c < 0:
            _scan_row(x, centroids, i, m, dist, idx, out)
            continue
        for a in range(c):
            vals[a] = cand_d[i, a]
            idx[a] = cand_i[i, a]
        for a in range(m):  # the m smallest float32 values first: partial selection sort on (value, index)
            best = a
            for b in range(a + 1, c):
                if vals[b] < vals[best] or (vals[b] == vals[best] and idx[b] < idx[best]):
                    best = b
            vals[a], vals[best] = vals[best], vals[a]
            idx[a], idx[best] = idx[best], idx[a]
        t = vals[m - 1] + margin[i]
        s = m
        for a in range(m, c):
            if vals[a] <= t:
                idx[s] = idx[a]
                s += 1
        if s == m:  # no other word within the margin: the set is settled; so is its order if gaps exceed it
            ordered = True
            for a in range(m - 1):
                if vals[a + 1] - vals[a] <= margin[i]:
                    ordered = False
            if ordered:
                for a in range(m):
                    out[i, a] = idx[a]
                continue
        for a in range(s):
            dist[a] = _sq_dist64(x, centroids, i, idx[a])
        for a in range(m):  # partial selection sort on (distance, index)
            best = a
            for b in range(a + 1, s):
                if dist[b] < dist[best] or (dist[b] == dist[best] and idx[b] < idx[best]):
                    best = b
            dist[a], dist[best] = dist[best], dist[a]
            idx[a], idx[best] = idx[best], idx[a]
            out[i, a] = idx[a]
