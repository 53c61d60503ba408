"""Diffusion on the database's kNN graph (Iscen et al., "Efficient diffusion on region manifolds", CVPR 2017),
image-level (global) variant on the index's own similarities.

Offline: every database image's ``k`` nearest database images (by the index's similarity, the image itself
left out) give the affinity graph: a_ij = max(s_ij, 0)^γ when i and j are each among the other's k nearest
(mutual / reciprocal kNN, so A is symmetric), no self-loops; S̄ = D^-1/2 A D^-1/2 with D the degrees.
Online: the query's ``query_k`` top-ranked images seed y (y_i = max(s_i, 0)^γ, s_i the initial similarity;
images confirmed by geometric verification are given the query's own weight 1, as αQE with α = 0 treats
them); f solves (I − αS̄) f = y by conjugate gradient (``iterations`` steps at most, stopping when the
residual norm falls below ``tol`` times that of y), and the database is ranked by f. Images f does not reach
(f = 0: not connected to any seed) keep the initial order behind the others.

Defaults are the paper's global-descriptor values (its released code: k = 50, k_q = 10, γ = 3, α = 0.99,
20 CG iterations, tolerance 1e-6). Everything is numpy over COO edge lists (O(edges) per product), no scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2r.config import Config


@dataclass
class DiffusionConfig(Config):
    """Diffusion settings (bench runner: ``diffusion`` section, ``--diffusion``).

    Attributes:
        enabled: rank by diffusion after the initial search (and after verification when ``verify`` is on).
        k: database neighbours per image in the graph (mutual kNN, the image itself excluded).
        query_k: top-ranked images that seed the query vector y.
        gamma: similarity exponent of the affinities and seeds.
        alpha: diffusion weight, in (0, 1).
        iterations: conjugate-gradient steps at most.
        tol: stop when ||y − (I − αS̄)f|| <= tol · ||y||.
    """

    enabled: bool = False
    k: int = 50
    query_k: int = 10
    gamma: float = 3.0
    alpha: float = 0.99
    iterations: int = 20
    tol: float = 1e-6

    def validate(self) -> "DiffusionConfig":
        for name in ("k", "query_k", "iterations"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"diffusion.{name} must be a positive integer, got {v!r}")
        if not self.gamma > 0:
            raise ValueError(f"diffusion.gamma must be > 0, got {self.gamma}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"diffusion.alpha must be in (0, 1), got {self.alpha}")
        if not self.tol >= 0:
            raise ValueError(f"diffusion.tol must be >= 0, got {self.tol}")
        return self


def mutual_knn_affinity(neighbours: np.ndarray, sims: np.ndarray, gamma: float = 3.0):
    """The mutual-kNN affinity graph as symmetric COO edges.

    neighbours (N, k) int64: row i holds image i's nearest images (−1 pads short rows; i itself is ignored);
    sims (N, k) float: their similarities. Edge (i, j) exists when j is in row i and i in row j; its weight is
    max(s, 0)^γ with s the larger of the two listed similarities (equal for a symmetric similarity).
    Returns (rows, cols, weights): int64, int64, float64, both directions of every edge, sorted by (row, col);
    zero-weight edges are dropped.
    """
    nb = np.asarray(neighbours, np.int64)
    s = np.asarray(sims, np.float64)
    if nb.ndim != 2 or s.shape != nb.shape:
        raise ValueError(f"neighbours and sims must be (N, k) of equal shape, got {nb.shape} and {s.shape}")
    n = nb.shape[0]
    if nb.size and (nb.max() >= n or nb.min() < -1):
        raise ValueError(f"neighbours must be image indices in [0, {n}) or -1")
    r = np.repeat(np.arange(n, dtype=np.int64), nb.shape[1])
    c = nb.reshape(-1)
    w = s.reshape(-1)
    ok = (c >= 0) & (c != r)
    r, c, w = r[ok], c[ok], w[ok]
    # (i, j) listed by i; keep it when (j, i) is listed by j as well.
    key = r * n + c
    order = np.argsort(key, kind="stable")
    key, r, c, w = key[order], r[order], c[order], w[order]
    _, first = np.unique(key, return_index=True)  # a row listing j twice counts once (its first entry)
    key, r, c, w = key[first], r[first], c[first], w[first]
    back = c * n + r
    pos = np.searchsorted(key, back)
    pos_ok = pos < key.size
    mutual = np.zeros(key.size, bool)
    mutual[pos_ok] = key[pos[pos_ok]] == back[pos_ok]
    r, c = r[mutual], c[mutual]
    w = np.maximum(w[mutual], w[pos[mutual]])
    w = np.maximum(w, 0.0) ** float(gamma)
    keep = w > 0
    return r[keep], c[keep], w[keep]


def normalize_graph(rows, cols, weights, n: int) -> np.ndarray:
    """Symmetric normalisation D^-1/2 A D^-1/2 of COO edges: the new weights (float64); isolated nodes have no
    edges, so nothing divides by zero."""
    deg = np.bincount(rows, weights=weights, minlength=n)
    inv = np.zeros(n)
    nz = deg > 0
    inv[nz] = 1.0 / np.sqrt(deg[nz])
    return weights * inv[rows] * inv[cols]


def conjugate_gradient(matvec, b: np.ndarray, iterations: int = 20, tol: float = 1e-6) -> np.ndarray:
    """Solve M x = b for a symmetric positive-definite M given as ``matvec`` (x0 = 0): at most ``iterations``
    steps, stopping when ||b − M x|| <= tol · ||b||. b (n,) float64 -> x (n,) float64; b = 0 gives 0."""
    b = np.asarray(b, np.float64)
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    stop = (tol * np.sqrt(float(b @ b))) ** 2
    for _ in range(int(iterations)):
        if rr <= stop or rr == 0.0:
            break
        mp = matvec(p)
        step = rr / float(p @ mp)
        x += step * p
        r -= step * mp
        new = float(r @ r)
        p = r + (new / rr) * p
        rr = new
    return x


class DiffusionGraph:
    """The offline graph of a database: ``fit(neighbours, sims)`` once, then ``diffuse(seeds)`` per query.

    Nodes are database positions 0..N−1 (the caller maps ids). Learned: ``num_nodes_``, ``rows_``, ``cols_``,
    ``weights_`` (normalised S̄ as COO edges)."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config or DiffusionConfig()

    def fit(self, neighbours: np.ndarray, sims: np.ndarray) -> "DiffusionGraph":
        """neighbours (N, k') int64 (−1 pads), sims (N, k') float: each image's ranked database neighbours;
        only the first ``config.k`` that are not the image itself are used."""
        cfg = self.config.validate()
        nb = np.asarray(neighbours, np.int64)
        s = np.asarray(sims, np.float64)
        if nb.ndim != 2 or s.shape != nb.shape:
            raise ValueError(f"neighbours and sims must be (N, k) of equal shape, "
                             f"got {nb.shape} and {s.shape}")
        n = nb.shape[0]
        ok = (nb >= 0) & (nb != np.arange(n)[:, None])
        keep = ok & (np.cumsum(ok, axis=1) <= cfg.k)  # the first k real neighbours of each row; -1 pads the rest
        r, c, w = mutual_knn_affinity(np.where(keep, nb, -1), np.where(keep, s, 0.0), cfg.gamma)
        self.num_nodes_ = n
        self.rows_, self.cols_ = r, c
        self.weights_ = normalize_graph(r, c, w, n)
        return self

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """(I − αS̄) x for x (N,) float64."""
        sx = np.bincount(self.rows_, weights=self.weights_ * x[self.cols_], minlength=self.num_nodes_)
        return x - self.config.alpha * sx

    def seeds(self, nodes, scores, verified=()) -> np.ndarray:
        """The query vector y (N,) float64: max(s, 0)^γ on the first ``query_k`` of ``nodes`` (ranked node
        indices, scores aligned), 1 on every node in ``verified``."""
        cfg = self.config
        y = np.zeros(self.num_nodes_)
        nodes = np.asarray(nodes, np.int64)[: cfg.query_k]
        sc = np.asarray(scores, np.float64)[: nodes.size]
        y[nodes] = np.maximum(sc, 0.0) ** cfg.gamma
        v = np.asarray(list(verified), np.int64)
        if v.size:
            y[v] = 1.0
        return y

    def diffuse(self, y: np.ndarray) -> np.ndarray:
        """f (N,) float64 solving (I − αS̄) f = y by conjugate gradient."""
        cfg = self.config
        return conjugate_gradient(self.matvec, np.asarray(y, np.float64), cfg.iterations, cfg.tol)


def rank_by_diffusion(f: np.ndarray, initial) -> tuple[np.ndarray, np.ndarray]:
    """The diffusion ranking: node indices with f > 0 by f descending (ties in ``initial`` order), then the
    rest of ``initial`` in its order. f (N,) float; initial (L,) node indices, best first (nodes missing from
    it are not returned). Returns (nodes (L,) int64, f at those nodes (L,) float64)."""
    init = np.asarray(initial, np.int64)
    val = np.asarray(f, np.float64)[init]
    reached = np.flatnonzero(val > 0)
    reached = reached[np.argsort(-val[reached], kind="stable")]
    rest = np.flatnonzero(~(val > 0))
    order = np.concatenate([reached, rest])
    return init[order], val[order]
