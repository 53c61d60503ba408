"""The diffusion experiment (benchmarks/experiments/diffusion.py): the mutual-kNN graph against a dense numpy
reference, conjugate gradient against a direct solve, and the ranking rule."""

import numpy as np
import pytest

from benchmarks.experiments.diffusion import (DiffusionConfig, DiffusionGraph, conjugate_gradient,
                                              mutual_knn_affinity, normalize_graph, rank_by_diffusion)


def _dense_reference(nb, s, k, gamma, n):
    """Slow obvious mutual-kNN affinity and its normalisation."""
    a = np.zeros((n, n))
    lists = []
    for i in range(n):
        row = [(j, v) for j, v in zip(nb[i], s[i]) if j >= 0 and j != i][:k]
        lists.append(dict(row))
    for i in range(n):
        for j, v in lists[i].items():
            if i in lists[j]:
                a[i, j] = max(v, lists[j][i], 0.0) ** gamma
    d = a.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.where(d > 0, d, 1)), 0)
    return a, a * inv[:, None] * inv[None, :]


def test_mutual_knn_hand_computed():
    # 0-1 mutual, 1-2 mutual; 3 lists 0 but 0 does not list 3; node 4 lists only itself.
    nb = np.array([[1, -1], [0, 2], [1, -1], [0, -1], [4, -1]])
    s = np.array([[0.5, 0], [0.5, 0.8], [0.8, 0], [0.9, 0], [1.0, 0]])
    r, c, w = mutual_knn_affinity(nb, s, gamma=3.0)
    assert list(zip(r.tolist(), c.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    np.testing.assert_allclose(w, [0.125, 0.125, 0.512, 0.512])
    sn = normalize_graph(r, c, w, 5)
    d = np.array([0.125, 0.637, 0.512, 0, 0])
    np.testing.assert_allclose(sn, [0.125 / np.sqrt(d[0] * d[1])] * 2 + [0.512 / np.sqrt(d[1] * d[2])] * 2)


def test_graph_equals_dense_reference_on_random_lists(rng):
    n, k = 30, 6
    x = rng.normal(size=(n, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    order = np.argsort(-sim, axis=1)[:, : k + 1]  # includes the image itself first
    nb, s = order, np.take_along_axis(sim, order, 1)
    g = DiffusionGraph(DiffusionConfig(k=k, gamma=3.0, alpha=0.9, iterations=200, tol=1e-12)).fit(nb, s)
    _, sref = _dense_reference(nb, s, k, 3.0, n)
    dense = np.zeros((n, n))
    dense[g.rows_, g.cols_] = g.weights_
    np.testing.assert_allclose(dense, sref, atol=1e-12)
    np.testing.assert_allclose(dense, dense.T)
    # the CG solution equals a direct solve of (I - αS̄) f = y
    y = g.seeds(np.argsort(-sim[0]), np.sort(sim[0])[::-1])
    f = g.diffuse(y)
    np.testing.assert_allclose(f, np.linalg.solve(np.eye(n) - 0.9 * sref, y), rtol=1e-7, atol=1e-10)


def test_conjugate_gradient_small_system():
    m = np.array([[4.0, 1.0], [1.0, 3.0]])
    x = conjugate_gradient(lambda v: m @ v, np.array([1.0, 2.0]), iterations=2, tol=0)
    np.testing.assert_allclose(x, [1 / 11, 7 / 11])  # exact in n = 2 steps
    assert conjugate_gradient(lambda v: m @ v, np.zeros(2)).tolist() == [0.0, 0.0]


def test_diffusion_reaches_a_neighbour_the_query_missed():
    # chain 0 - 1 - 2 (mutual neighbours), node 3 isolated. The query saw only node 0 (seed) and node 3
    # (a weaker initial score); diffusion ranks 1 and 2 (graph neighbours of the seed) above 3.
    nb = np.array([[1, -1], [0, 2], [1, -1], [-1, -1]])
    s = np.array([[0.9, 0], [0.9, 0.9], [0.9, 0], [0, 0]])
    g = DiffusionGraph(DiffusionConfig(k=2, query_k=1, gamma=1.0, alpha=0.5, iterations=50, tol=0)).fit(nb, s)
    y = g.seeds([0, 3, 1, 2], [1.0, 0.5, 0.1, 0.0])
    assert y.tolist() == [1.0, 0, 0, 0]  # query_k = 1
    f = g.diffuse(y)
    # S̄ = [[0, a, 0], [a, 0, a], [0, a, 0]] with a = 0.9 / sqrt(0.9 * 1.8) = 1/sqrt(2): solve by hand
    a = 1 / np.sqrt(2)
    sb = np.array([[0, a, 0], [a, 0, a], [0, a, 0]])
    np.testing.assert_allclose(f[:3], np.linalg.solve(np.eye(3) - 0.5 * sb, [1.0, 0, 0]))
    assert f[3] == 0
    nodes, vals = rank_by_diffusion(f, [0, 3, 1, 2])
    assert nodes.tolist() == [0, 1, 2, 3] and vals[-1] == 0
    # a verified node is a seed with the query's weight
    assert g.seeds([0, 3], [0.5, 0.2], verified=[2]).tolist() == [0.5, 0, 1.0, 0]


def test_rank_by_diffusion_ties_and_unreached_keep_initial_order():
    f = np.array([0.0, 0.5, 0.5, 0.0, 0.9])
    nodes, vals = rank_by_diffusion(f, [3, 2, 0, 1, 4])
    assert nodes.tolist() == [4, 2, 1, 3, 0] and vals.tolist() == [0.9, 0.5, 0.5, 0.0, 0.0]


def test_diffusion_config_validation():
    for bad in ({"k": 0}, {"query_k": True}, {"gamma": 0.0}, {"alpha": 1.0}, {"alpha": 0.0},
                {"iterations": 0}, {"tol": -1.0}):
        with pytest.raises(ValueError, match="diffusion"):
            DiffusionConfig(**bad).validate()
    with pytest.raises(ValueError, match="neighbours"):
        DiffusionGraph().fit(np.zeros((2, 3), np.int64), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="indices"):
        mutual_knn_affinity(np.array([[5]]), np.array([[1.0]]))

