"""Issue 13 round 3: fused verification scores (rerank.fusion_weight) and diffusion (d2r.diffuse)."""

import numpy as np
import pytest

from d2r.diffuse import (DiffusionConfig, DiffusionGraph, conjugate_gradient, mutual_knn_affinity,
                         normalize_graph, rank_by_diffusion)
from d2r.query.verify import RerankConfig, order_by_fused, order_verified


# ---- fused scores ------------------------------------------------------------------------------------------
def test_order_by_fused_hand_computed():
    ids = np.array([10, 11, 12, 13, 14, 15])
    scores = np.array([0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    inl = {10: 3, 11: 50, 12: 9, 13: 12, 14: 100}
    # 12 is junk (never verified), 15 is beyond num_to_rerank = 4. Fused with λ = 1, cap = 70, threshold 10:
    # 10: 0.5 (3 < 10 adds nothing), 11: 0.4 + 50/70, 13: 0.2 + 12/70, 14: 0.1 + 70/70 (capped).
    out, sc, got = order_by_fused(ids, scores, inl, 4, 10, 1.0, 70, junk=[12])
    assert out.tolist() == [11, 14, 10, 13, 12, 15]
    np.testing.assert_allclose(sc, [0.4 + 50 / 70, 1.1, 0.5, 0.2 + 12 / 70, 0.3, 0.05])
    assert got.tolist() == [50, 100, 3, 12, -1, -1]
    # λ = 0.3: 11: 0.4 + 0.3·50/70 = 0.614 > 10: 0.5 > 14: 0.1 + 0.3 = 0.4 > 13: 0.2 + 0.3·12/70 = 0.251
    out, _, _ = order_by_fused(ids, scores, inl, 4, 10, 0.3, 70, junk=[12])
    assert out.tolist() == [11, 10, 14, 13, 12, 15]
    # min_inliers 1: every count adds (Google's DELG + RANSAC baseline rule); 10 gets 3/70
    out, sc, _ = order_by_fused(ids, scores, inl, 4, 1, 1.0, 70, junk=[12])
    assert out.tolist() == [11, 14, 10, 13, 12, 15] and sc[2] == pytest.approx(0.5 + 3 / 70)


def test_fused_ties_keep_input_order_and_config_dispatch():
    ids = np.array(["a", "b", "c"])
    cfg = RerankConfig(method="usac", fusion_weight=1.0, fusion_cap=4, min_inliers=1)
    out, sc, _ = order_verified(ids, [0.75, 0.5, 0.25], {"a": 0, "b": 1, "c": 2}, cfg)  # exact in binary
    assert out.tolist() == ["a", "b", "c"] and sc.tolist() == [0.75, 0.75, 0.75]
    # fusion_weight 0 keeps the threshold rule
    out, _, _ = order_verified(ids, [0.3, 0.2, 0.1], {"a": 0, "b": 1, "c": 12}, RerankConfig(method="usac"))
    assert out.tolist() == ["c", "a", "b"]


def test_fusion_config_validation():
    for bad in ({"fusion_weight": -1.0}, {"fusion_weight": float("nan")}, {"fusion_cap": 0},
                {"fusion_cap": True}, {"fusion_weight": 1.0, "method": "official"}):
        with pytest.raises(ValueError, match="fusion"):
            RerankConfig(**{"method": "usac", **bad}).validate()


# ---- diffusion ---------------------------------------------------------------------------------------------
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


def test_bench_diffusion_flag_and_checks():
    import argparse

    from d2r.bench import load_config
    from d2r.cli import bench as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", "revisitop", "--gnd", "g.pkl", "--images-root", "r", "--out", "o",
                              "--diffusion", "--set", "diffusion.k=20", "--set", "rerank.fusion_weight=1.0"])
    c = cli.config_from_args(args)
    assert c.diffusion.enabled and c.diffusion.k == 20 and c.rerank.fusion_weight == 1.0
    assert not cli.config_from_args(parser.parse_args(
        ["bench", "revisitop", "--gnd", "g", "--images-root", "r", "--out", "o"])).diffusion.enabled
    with pytest.raises(ValueError, match="query_expansion"):
        load_config(None, {"diffusion.enabled": True, "query_expansion": "aqe"}).check()
    with pytest.raises(ValueError, match="diffusion.alpha"):
        load_config(None, {"diffusion.alpha": 2.0}).check()


@pytest.mark.slow
def test_bench_diffusion_after_verification_dev(bench_dev, tmp_path):
    """Diffusion through the revisitop runner on the dev photos (small CI configuration): stages, notes,
    every ranking a permutation of the database."""
    from d2r.bench import load_config, run_revisitop

    cfg = load_config(None, {"features.options.max_features": 300, "codebook.size": 256,
                             "codebook.sample_per_image": 50, "index.kernel": "asmk_star", "verify": True,
                             "rerank.method": "usac", "rerank.correspondences": "hamming",
                             "diffusion.enabled": True, "workers": 2})
    r = run_revisitop(bench_dev / "gnd.pkl", bench_dev, cfg, tmp_path / "run", progress=False,
                      write_report=False)
    assert list(r["stages"]) == ["initial", "verified", "diffused"]
    assert r["notes"]["diffusion"]["k"] == 50 and r["notes"]["diffusion"]["mean_degree"] > 0
    ranks = np.load(tmp_path / "run" / "ranks_diffused_medium.npy")
    assert all(sorted(row.tolist()) == list(range(367)) for row in ranks)
    assert r["medium"]["mAP"] > 20
