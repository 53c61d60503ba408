"""Slow, obvious numpy twins of the d2r kernels, written straight from shared/REFERENCE.md, and the
reference-only entry points over library kernels that no library code calls (scan_bits, smallest_per_row,
refine_exact: tests and benchmarks use them)."""

import numpy as np

from d2r.kernels.assign import refine_or_scan, update_shortlist
from d2r.kernels.ivf import scan_bits_items


def assign(x, centroids, m):
    """m nearest words by float64 squared L2, ties by lower index (stable sort)."""
    x = np.asarray(x, np.float64)
    c = np.asarray(centroids, np.float64)
    if len(x) == 0:
        return np.zeros((0, m), np.int64)
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return np.argsort(d, axis=1, kind="stable")[:, :m].astype(np.int64)


def vlad_matrix(x, centroids, m):
    """Unnormalised VLAD as (K, D) float64."""
    k, d = centroids.shape
    v = np.zeros((k, d))
    for i, words in enumerate(assign(x, centroids, m)):
        for w in words:
            v[w] += x[i].astype(np.float64) - centroids[w].astype(np.float64)
    return v


def l2(v):
    return v / np.sqrt(max((v * v).sum(), 1e-12))


def aggregate(x, centroids, kernel, m=1, regions=None, l2_normalize=None):
    """Returns a dict with 'vector' (VLAD kinds) or 'words' + 'descriptors' / 'bits'."""
    x = np.asarray(x, np.float32)
    if regions is None:
        v = vlad_matrix(x, centroids, m)
    else:
        v = np.zeros(centroids.shape)
        start = 0
        for n in regions:
            v += l2(vlad_matrix(x[start:start + n], centroids, m))
            start += n
    if kernel == "vlad":
        flat = v.ravel()
        norm = l2_normalize if l2_normalize is not None else regions is None
        if norm:
            flat = l2(flat)
        elif regions is not None and len(regions):
            flat = flat / len(regions)
        return {"vector": flat.astype(np.float32)}
    if regions is not None and len(regions):
        v = v / len(regions)
    norms = np.linalg.norm(v, axis=1)
    words = np.flatnonzero(norms > 1e-6)
    unit = (v[words] / norms[words, None]).astype(np.float32)
    if kernel == "asmk":
        return {"words": words.astype(np.uint32), "descriptors": unit}
    return {"words": words.astype(np.uint32), "bits": np.packbits(unit > 0, axis=1)}


def sigma(u, alpha, tau, inclusive=False):
    ok = u >= tau if inclusive else u > tau
    return float(np.sign(u) * abs(u) ** alpha) if ok else 0.0


def hamming(a, b):
    return int(np.unpackbits(np.bitwise_xor(a, b)).sum())


def similarity(kernel, a, b, alpha=3.0, tau=0.0, normalize=True, inclusive=False, dim=None, idf=None):
    """a, b: dicts as returned by :func:`aggregate`."""
    if kernel == "vlad":
        return float(a["vector"].astype(np.float64) @ b["vector"].astype(np.float64))
    wa, wb = list(a["words"]), list(b["words"])
    if not wa or not wb:
        return -1.0
    w = (lambda c: 1.0) if idf is None else (lambda c: float(idf[c]) ** 2)
    s = 0.0
    for i, c in enumerate(wa):
        if c in wb:
            j = wb.index(c)
            if kernel == "asmk":
                u = float(a["descriptors"][i].astype(np.float64) @ b["descriptors"][j].astype(np.float64))
            else:
                u = 1.0 - 2.0 * hamming(a["bits"][i], b["bits"][j]) / dim
            s += w(c) * sigma(u, alpha, tau, inclusive)
    if normalize:
        s /= np.sqrt(sum(w(c) for c in wa) * sum(w(c) for c in wb))
    return s


def hamming_matches(q_words, q_sigs, n_words, n_sigs, max_bits):
    """Pairs (i, f) with q_words[i] == n_words[f] and Hamming(q_sigs[i], n_sigs[f]) <= max_bits, by numpy
    searchsorted (the numpy twin of d2r.signatures.hamming_correspondences / kernels.correspond.hamming_pairs).

    q_words (P,) int, q_sigs (P, B) uint8; n_words (F,), n_sigs (F, B). Returns (query_rows, neighbour_rows)
    int64, sorted by query row then neighbour row."""
    popcount8 = np.array([bin(i).count("1") for i in range(256)], np.int64)
    q_words, n_words = np.asarray(q_words), np.asarray(n_words)
    if q_words.shape[0] == 0 or n_words.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(n_words, kind="stable")
    sw = n_words[order]
    lo = np.searchsorted(sw, q_words, "left")
    hi = np.searchsorted(sw, q_words, "right")
    cnt = hi - lo
    qi = np.repeat(np.arange(q_words.shape[0]), cnt)
    if qi.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt)
    fi = order[starts + np.arange(qi.size)]
    dist = popcount8[np.bitwise_xor(q_sigs[qi], n_sigs[fi])].sum(axis=1)
    ok = dist <= max_bits
    qi, fi = qi[ok].astype(np.int64), fi[ok].astype(np.int64)
    o = np.lexsort((fi, qi))
    return qi[o], fi[o]


def scan_bits(q_words, q_bits, offsets, items, blocks, bits, dim, alpha, tau, tau_inclusive, weights, scores):
    """The whole-segment ASMK* scan (reference, no library caller): d2r.kernels.ivf.scan_bits_items over every
    item, accumulating into ``scores`` in place."""
    scan_bits_items(q_words, q_bits, offsets, items, blocks, bits, dim, alpha, tau, tau_inclusive, weights,
                    scores, 0, scores.shape[0])


def smallest_per_row(dots, centroid_sq_norms, c):
    """Indices (n, c) int64 of the ``c`` smallest ‖c_k‖² − 2⟨x, c_k⟩ per row (ascending; equal values keep the
    lower index), through d2r.kernels.assign.update_shortlist (reference, no library caller)."""
    n = dots.shape[0]
    best_d = np.full((n, c), np.inf, np.float32)
    best_i = np.full((n, c), -1, np.int64)
    update_shortlist(dots, centroid_sq_norms, 0, best_d, best_i)
    return best_i


def refine_exact(x, centroids, candidates, m):
    """Re-rank candidate words (n, c) by exact float64 squared L2, the ``m`` nearest per row (ties by lower
    index), through d2r.kernels.assign.refine_or_scan (reference, no library caller)."""
    return refine_or_scan(x, centroids, candidates, np.zeros(candidates.shape[0], np.bool_), m)


def normalized_distances(query, sigs):
    """‖q − s‖ / (‖q‖ + ‖s‖) of (L,) int8 ``query`` to each row of (N, L) int8 ``sigs``, float64 by
    np.linalg.norm (image-match's formula), 1.0 where both are zero (its 0/0 value)."""
    q = np.asarray(query).astype(np.int64)
    s = np.asarray(sigs).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.linalg.norm(s - q, axis=1) / (np.linalg.norm(q) + np.linalg.norm(s, axis=1))
    return np.where(np.isnan(d), 1.0, d)


def word_search(q_words, q_sigs, words, sigs, dead, threshold):
    """Brute force twin of d2r.kernels.signature.word_search over one segment: every (query, row) with a word
    equal at the same position, the row not dead, distance < threshold. Returns (queries, rows, distances)
    sorted by query then row."""
    out = ([], [], [])
    for qi in range(q_words.shape[0]):
        cand = np.flatnonzero((words == q_words[qi][None, :]).any(axis=1) & ~dead)
        d = normalized_distances(q_sigs[qi], sigs[cand])
        keep = d < threshold
        out[0].append(np.full(int(keep.sum()), qi, np.int64))
        out[1].append(cand[keep].astype(np.int64))
        out[2].append(d[keep])
    return tuple(np.concatenate(a) if a else np.zeros(0) for a in out)


def goldberg_signature(rgb, n=9, crop=(5, 95), tolerance=2 / 255, levels=2):
    """The Goldberg signature written step by step from the paper (Wong, Bern & Goldberg, ICIP 2002) with
    image-match's choices (grey by Rec. 709 luma of rgb/255, windows by the percentiles of cumulative gradient
    sums, P = max(2, int(0.5 + min(H, W)/20)), bins by the percentiles of each sign, filled bin after bin in
    place): the slow twin of d2r.duplicates.signature.signature_of_pixels. (n·n·8,) int8."""
    g = np.multiply(np.asarray(rgb, np.uint8), 1.0 / 255, dtype=np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    h, w = g.shape

    def limits(profile, size):
        cum = np.cumsum(profile)
        lo = np.searchsorted(cum, np.percentile(cum, crop[0]), side="right")
        hi = np.searchsorted(cum, np.percentile(cum, crop[1]), side="left")
        return (lo, hi) if lo <= hi else (int(crop[0] / 100 * size), int(crop[1] / 100 * size))

    top, bottom = limits(np.abs(np.diff(g, axis=1)).sum(axis=1), h)
    left, right = limits(np.abs(np.diff(g, axis=0)).sum(axis=0), w)
    ys = [int(v) for v in np.linspace(top, bottom, n + 2)[1:-1]]
    xs = [int(v) for v in np.linspace(left, right, n + 2)[1:-1]]
    p = max(2.0, int(0.5 + min(h, w) / 20))
    mean = np.zeros((n, n))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            y0, x0 = int(max(y - p / 2, 0)), int(max(x - p / 2, 0))
            mean[i, j] = np.mean(g[y0:int(min(y0 + p, h)), x0:int(min(x0 + p, w))])
    sig = []
    for i in range(n):
        for j in range(n):
            for di, dj in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]:
                inside = 0 <= i + di < n and 0 <= j + dj < n
                sig.append(mean[i, j] - mean[i + di, j + dj] if inside else 0.0)
    d = np.array(sig)
    d[np.abs(d) < tolerance] = 0
    if np.any(d):
        pos = np.percentile(d[d > 0], np.linspace(0, 100, levels + 1))
        neg = np.percentile(d[d < 0], np.linspace(100, 0, levels + 1))
        for k in range(levels):
            d[(d >= pos[k]) & (d <= pos[k + 1])] = k + 1
        for k in range(levels):
            d[(d <= neg[k]) & (d >= neg[k + 1])] = -(k + 1)
    return d.astype(np.int8)
