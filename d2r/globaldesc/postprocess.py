"""Post-processing of global vectors (core numpy, no torch): L2, learned PCA / PCA-whitening / SVD saved with
a fingerprint, database-side augmentation (DBA), α-weighted query expansion (αQE), k-reciprocal re-ranking.

Vectors are (N, D) float32 rows; every function returns new arrays (the caller's are never changed). Scores
are inner products (cosine similarity for L2-normalised rows); rankings are best first, ties by lower row
index.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.globaldesc.search import exact_top_k

FORMAT = "d2r-whitening"
FORMAT_VERSION = 1
MODES = ("pca_whiten", "pca", "svd")


def _rows(x, name: str = "vectors", dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected an (N, D) real array, got {x.dtype} {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected D={dim}, got {x.shape[1]}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: NaN or infinite values")
    return x


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero. (N, D) → (N, D) float32 (a (D,) vector works
    too)."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


class Whitening:
    """A linear map learned on a training set, then L2: ``mode`` "pca_whiten" (centre, project on the top
    ``dim`` principal directions, divide by the square root of their variances; Jégou & Chum 2012), "pca" (no
    division) or "svd" (no centring; divide by the standard deviation of the projections + 1e-6, as PyRetri's
    SVD).

    ``dim``: output dimensions (None: all the training set supports, min(D, N − 1); N for "svd"). Learned
    attributes: ``mean_`` (D,), ``components_`` (dim, D), ``scale_`` (dim,) float32; ``metadata`` is free-form
    provenance saved with it (what it was trained on) and ``fingerprint`` the content hash.
    """

    def __init__(self, mode: str = "pca_whiten", dim: int | None = None, eps: float = 1e-9):
        if mode not in MODES:
            raise ValueError(f"whitening mode: expected one of {list(MODES)}, got {mode!r}")
        if dim is not None and (isinstance(dim, bool) or int(dim) < 1):
            raise ValueError(f"whitening dim must be a positive integer or None, got {dim!r}")
        self.mode, self.dim, self.eps = mode, None if dim is None else int(dim), float(eps)
        self.metadata: dict = {}
        self.mean_ = self.components_ = self.scale_ = None
        self.fingerprint = None

    def fit(self, vectors, metadata: dict | None = None) -> "Whitening":
        """Learn from (N, D) training vectors (N ≥ 2). Eigen-decomposition of the D×D covariance when D ≤ N,
        else an economy SVD of the centred rows (so 32,000-D PWA vectors of a few thousand images stay
        cheap)."""
        x = _rows(vectors, "whitening training vectors").astype(np.float64)
        n, d = x.shape
        if n < 2:
            raise ValueError(f"whitening: need at least 2 training vectors, got {n}")
        centre = self.mode != "svd"
        mean = x.mean(axis=0) if centre else np.zeros(d)
        xc = x - mean
        rank = min(d, n - 1 if centre else n)
        k = rank if self.dim is None else self.dim
        if k > rank:
            raise ValueError(f"whitening: dim={k} exceeds what {n} training vectors of D={d} support "
                             f"({rank})")
        if d <= n:
            var, vecs = np.linalg.eigh(xc.T @ xc / n)
            order = np.argsort(-var, kind="stable")[:k]
            comps, var = vecs[:, order].T, np.maximum(var[order], 0.0)
        else:
            _, s, vt = np.linalg.svd(xc, full_matrices=False)
            comps, var = vt[:k], s[:k] ** 2 / n
        # a deterministic sign per direction (largest-magnitude coordinate positive): same data, same file
        flip = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
        comps = comps * np.where(flip == 0, 1.0, flip)[:, None]
        if self.mode == "pca_whiten":
            scale = 1.0 / np.sqrt(var + self.eps)
        elif self.mode == "pca":
            scale = np.ones(k)
        else:
            scale = 1.0 / ((x @ comps.T).std(axis=0) + 1e-6)
        self._set(mean, comps, scale, dict(metadata or {}, num_train=int(n)))
        return self

    def _set(self, mean, comps, scale, metadata) -> None:
        self.mean_ = np.ascontiguousarray(mean, np.float32)
        self.components_ = np.ascontiguousarray(comps, np.float32)
        self.scale_ = np.ascontiguousarray(scale, np.float32)
        self.dim = int(self.components_.shape[0])
        h = hashlib.sha256(f"{self.mode}:{self.components_.shape}:".encode())
        for a in (self.mean_, self.components_, self.scale_):
            h.update(a.astype("<f4").tobytes())
        self.fingerprint = h.hexdigest()[:16]
        self.metadata = dict(metadata, fingerprint=self.fingerprint)

    @property
    def input_dim(self) -> int:
        self._check()
        return int(self.mean_.shape[0])

    def _check(self):
        if self.components_ is None:
            raise RuntimeError("whitening is not fitted (fit() or Whitening.load())")

    def transform(self, vectors) -> np.ndarray:
        """(N, D) → (N, dim) float32, L2-normalised rows (a (D,) vector gives (dim,))."""
        self._check()
        single = np.ndim(vectors) == 1
        x = _rows(np.atleast_2d(vectors), "vectors", self.input_dim)
        out = l2_normalize(((x - self.mean_) @ self.components_.T) * self.scale_)
        return out[0] if single else out

    def save(self, path) -> Path:
        """Write ``path`` (.npz: mean, components, scale + a JSON header) atomically."""
        self._check()
        path = Path(path)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "mode": self.mode, "dim": self.dim,
                  "input_dim": self.input_dim, **self.metadata}
        _io.save_npz(path, mean=self.mean_, components=self.components_, scale=self.scale_,
                     metadata=np.array(json.dumps(header, sort_keys=True)))
        return path

    @classmethod
    def load(cls, path) -> "Whitening":
        """Read a file written by :meth:`save`; ValueError naming the file if it is not one, or its content
        does not match its fingerprint."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: whitening file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("mean", "components", "scale")}
                header = json.loads(str(z["metadata"]))
            if not isinstance(header, dict):
                raise ValueError("metadata is not a JSON object")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
            raise ValueError(f"{path}: not a d2r whitening file ({str(exc).splitlines()[0][:120]})") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a d2r whitening file (format {header.get('format')!r})")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path}: whitening format version {header['format_version']} is newer than "
                             f"this "
                             f"d2r supports ({FORMAT_VERSION})")
        m, c, s = arrays["mean"], arrays["components"], arrays["scale"]
        if (c.ndim != 2 or m.shape != (c.shape[1],) or s.shape != (c.shape[0],)
                or header.get("mode") not in MODES):
            raise ValueError(f"{path}: inconsistent whitening arrays mean {m.shape}, components {c.shape}, "
                             f"scale {s.shape} (mode {header.get('mode')!r})")
        w = cls(header["mode"])
        meta = {k: v for k, v in header.items() if k not in ("format", "format_version", "mode", "dim",
                                                             "input_dim")}
        w._set(m, c, s, meta)
        if header.get("fingerprint") not in (None, w.fingerprint):
            raise ValueError(f"{path}: content hash {w.fingerprint} does not match the stored fingerprint "
                             f"{header['fingerprint']} (file corrupted?)")
        return w


def _weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    return np.ones_like(scores) if alpha == 0 else np.maximum(scores, 0.0) ** alpha


def dba(vectors, k: int = 10, alpha: float = 0.0) -> np.ndarray:
    """Database-side augmentation: each row replaced by the L2-normalised weighted sum of itself and its ``k``
    nearest other rows (weights 1 for ``alpha`` = 0, as Arandjelović & Zisserman 2012; s^α for α > 0, the αDBA
    of Radenović et al. 2018). (N, D) → (N, D) float32; neighbours by exact inner product."""
    x = _rows(vectors)
    if k < 0:
        raise ValueError(f"dba: k must be >= 0, got {k}")
    if k == 0 or x.shape[0] < 2:
        return l2_normalize(x)
    ids, scores = exact_top_k(x, x, min(k + 1, x.shape[0]))
    # drop each row itself (not necessarily first when it has exact duplicates), else the (k+1)-th neighbour
    own = ids == np.arange(x.shape[0])[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), ids.shape[1] - 1)
    keep = np.ones(ids.shape, bool)
    keep[np.arange(ids.shape[0]), drop] = False
    ids = ids[keep].reshape(ids.shape[0], -1)[:, :k]
    scores = scores[keep].reshape(ids.shape[0], -1)[:, :k]
    w = _weights(scores, alpha)
    w[ids < 0] = 0.0
    agg = x + np.einsum("nk,nkd->nd", w, x[np.maximum(ids, 0)])
    return l2_normalize(agg)


def alpha_qe(queries, vectors, ids, scores, k: int = 10, alpha: float = 3.0) -> np.ndarray:
    """αQE (Radenović et al. 2018): each query q (Q, D) becomes L2(q + Σ_{i<k} max(s_i, 0)^α x_{ids_i}) from
    its first ranking ``ids``/``scores`` (Q, ≥ k; ids < 0 are padding and skipped); α = 0 is average QE (Chum
    et al. 2007). Search again with the result."""
    q = _rows(np.atleast_2d(queries), "queries")
    x = _rows(vectors, "vectors", q.shape[1])
    ids = np.asarray(ids, np.int64)[:, :k]
    s = np.asarray(scores, np.float32)[:, :k]
    if ids.shape[0] != q.shape[0] or s.shape != ids.shape:
        raise ValueError(f"alpha_qe: ids {ids.shape} / scores {s.shape} do not match {q.shape[0]} queries")
    w = _weights(s, alpha)
    w[ids < 0] = 0.0
    return l2_normalize(q + np.einsum("qk,qkd->qd", w, x[np.maximum(ids, 0)]))


def k_reciprocal(queries, vectors, k1: int = 20, k2: int = 6, lam: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017): the (Q, N) final distance
    λ·d + (1 − λ)·d_J of each query to each database row, smaller is better.

    d = squared Euclidean distance (2 − 2s for unit rows) over the Q + N probes and rows, each row divided by
    its maximum; R(i, k1) the k1-reciprocal neighbours of i (i in the top k1 + 1 of each), expanded by every
    R(j, k1/2) of its members that shares more than 2/3 of its entries with R(i, k1); V_i the exp(−d)-weighted
    indicator of that set (sums to 1), averaged over i's k2 nearest (local query expansion); d_J(i, j) =
    1 − Σ min(V_i, V_j) / Σ max(V_i, V_j). Dense in (Q + N)²: meant for shortlists and collections of a few
    thousand images."""
    q = _rows(np.atleast_2d(queries), "queries")
    x = _rows(vectors, "vectors", q.shape[1])
    if k1 < 1 or k2 < 1 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"k_reciprocal: need k1 >= 1, k2 >= 1, 0 <= lam <= 1; got {k1}, {k2}, {lam}")
    nq = q.shape[0]
    allv = np.concatenate([q, x]).astype(np.float64)
    sq = (allv ** 2).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * allv @ allv.T, 0.0)
    dist /= np.maximum(dist.max(axis=1, keepdims=True), 1e-12)
    n = dist.shape[0]
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> np.ndarray:
        fwd = rank[i, :k + 1]
        return fwd[(rank[fwd, :k + 1] == i).any(axis=1)]

    half = int(np.around(k1 / 2.0))
    v = np.zeros((n, n))
    for i in range(n):
        base = reciprocal(i, k1)
        expanded = [base]
        for c in base:
            cand = reciprocal(int(c), half)
            if np.intersect1d(cand, base).size > 2.0 / 3.0 * cand.size:
                expanded.append(cand)
        members = np.unique(np.concatenate(expanded))
        wts = np.exp(-dist[i, members])
        v[i, members] = wts / wts.sum()
    if k2 > 1:
        v = v[rank[:, :k2]].mean(axis=1)
    jac = np.empty((nq, n - nq))
    for i in range(nq):
        mins = np.minimum(v[i], v[nq:]).sum(axis=1)
        jac[i] = 1.0 - mins / (2.0 - mins)  # Σ max = Σ V_i + Σ V_j − Σ min = 2 − Σ min
    return (lam * dist[:nq, nq:] + (1.0 - lam) * jac).astype(np.float32)
