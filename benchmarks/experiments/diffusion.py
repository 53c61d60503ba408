"""Experiment: diffusion on the database's kNN graph (Iscen et al., "Efficient diffusion on region manifolds",
CVPR 2017), image-level variant on the index's own similarities, run on the output of ``d2r bench revisitop``.

It was a library stage until it lost on the dev table (Medium -4.8, Hard -11.6 against αQE): it lives here, on
the public API (:class:`d2r.index.Database` ``record`` / ``search``, :mod:`d2r.eval`), for whoever wants to try it
on other data.

Offline: every database image's ``k`` nearest database images (by the index's similarity, the image itself
left out) give the affinity graph: a_ij = max(s_ij, 0)^γ when i and j are each among the other's k nearest
(mutual / reciprocal kNN, so A is symmetric), no self-loops; S̄ = D^-1/2 A D^-1/2 with D the degrees.
Online: the query's ``query_k`` top-ranked images seed y (y_i = max(s_i, 0)^γ, s_i the initial similarity);
f solves (I − αS̄) f = y by conjugate gradient (``iterations`` steps at most, stopping when the residual norm
falls below ``tol`` times that of y), and the database is ranked by f. Images f does not reach (f = 0: not
connected to any seed) keep the initial order behind the others. Defaults: the paper's global-descriptor values
(k = 50, k_q = 10, γ = 3, α = 0.99, 20 CG iterations, tolerance 1e-6). numpy over COO edge lists, no scipy.

    d2r bench revisitop --gnd GND --images-root ROOT --config C.yaml --out runs/base \
        --set rerank.enabled=false --set qe.method=none
    PYTHONPATH=. python -m benchmarks.experiments.diffusion runs/base --gnd GND [--k 50 --query-k 10 ...]

The run must rank the whole database with its queries among the database images (the dev photos' setting) and
without verification or expansion (its final stage is the initial search). Prints Medium / Hard mAP before and
after diffusion and the paired bootstrap interval of the per-query AP difference, as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

from benchmarks.experiments._common import compare, open_run
from d2r.config import Config
from d2r.index.database import Database


@dataclass
class DiffusionConfig(Config):
    """Diffusion settings.

    Attributes:
        k: database neighbours per image in the graph (mutual kNN, the image itself excluded).
        query_k: top-ranked images that seed the query vector y.
        gamma: similarity exponent of the affinities and seeds.
        alpha: diffusion weight, in (0, 1).
        iterations: conjugate-gradient steps at most.
        tol: stop when ||y − (I − αS̄)f|| <= tol · ||y||.
    """

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


def knn_lists(db: Database, names, k: int):
    """Each database image's ``k`` + 1 nearest database images by the index's similarity to its own record:
    (N, k+1) int64 positions in ``names`` (−1 pads) and (N, k+1) float64 scores."""
    at = {n: i for i, n in enumerate(names)}
    nb = np.full((len(names), k + 1), -1, np.int64)
    sims = np.zeros((len(names), k + 1))
    for i, name in enumerate(names):
        if name not in db:
            continue
        r = db.search(db.record(name), top_k=k + 1)
        nb[i, :len(r.ids)] = [at[j] for j in r.ids.tolist()]
        sims[i, :len(r.ids)] = r.scores
    return nb, sims


def run(run_dir, gnd_path, config: DiffusionConfig) -> dict:
    """Diffusion over the index of a ``d2r bench revisitop`` run folder; metrics before and after."""
    g, db = open_run(run_dir, gnd_path)
    names = list(g.imlist)
    graph = DiffusionGraph(config).fit(*knn_lists(db, names, config.k))
    at = {n: i for i, n in enumerate(names)}
    before, after = [], []
    for qname in g.qimlist:
        r = db.search(db.record(qname), top_k=len(names))
        initial = np.array([at[i] for i in r.ids.tolist()], np.int64)
        before.append(initial)
        after.append(rank_by_diffusion(graph.diffuse(graph.seeds(initial, r.scores)), initial)[0])
    return {"run": str(run_dir), "config": config.to_dict(), "queries": len(g.qimlist), **compare(g, before, after)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Diffusion over the index of a d2r bench revisitop run.")
    ap.add_argument("run", help="the run folder (metrics.json, index/)")
    ap.add_argument("--gnd", required=True, help="the ground truth the run used")
    for name, default in DiffusionConfig().to_dict().items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args(argv)
    config = DiffusionConfig(**{k: getattr(args, k) for k in DiffusionConfig().to_dict()}).validate()
    print(json.dumps(run(args.run, args.gnd, config), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
