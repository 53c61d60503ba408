"""Slow, obvious numpy twins of the d2r kernels, written straight from shared/REFERENCE.md."""

import numpy as np


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


def aggregate(x, centroids, kernel, m=1, regions=None, l2_normalize=None, thresholds=None):
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
    thr = np.zeros_like(unit) if thresholds is None else thresholds[words]
    return {"words": words.astype(np.uint32), "bits": np.packbits(unit > thr, axis=1)}


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
