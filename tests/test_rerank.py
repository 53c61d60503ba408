import numpy as np
import pytest
from scipy.spatial import cKDTree

from d2r.features.base import LocalFeatures
from d2r.kernels.ransac import ransac_affine, ransac_affine_batch
from d2r.query.verify import RerankConfig, geometric_verification, putative_matches, rerank

M64 = (1 << 64) - 1
A_TRUE = np.array([[0.8, -0.3], [0.25, 1.1]])
T_TRUE = np.array([40.0, -15.0])


# ---------------------------------------------------------------- numpy twin of the RANSAC kernel
def _splitmix(state):
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def _below(bits, m):
    return ((bits >> 32) * m) >> 32


def twin_ransac(src, dst, max_trials, thr, seed):
    n = len(src)
    state, best, best_sample = seed, 0, [-1, -1, -1]
    for _ in range(max_trials):
        state, r = _splitmix(state)
        a = _below(r, n)
        state, r = _splitmix(state)
        b = _below(r, n - 1)
        b += b >= a
        state, r = _splitmix(state)
        c = _below(r, n - 2)
        c += c >= min(a, b)
        c += c >= max(a, b)
        idx = [a, b, c]
        u = src[idx[1:]] - src[a]
        if abs(np.linalg.det(u)) <= 1e-9 * float((u**2).sum()):
            continue
        m = np.linalg.solve(np.c_[src[idx], np.ones(3)], dst[idx])  # (3, 2): [x y 1] @ m = dst
        res = np.c_[src, np.ones(n)] @ m - dst
        count = int(((res**2).sum(1) < thr * thr).sum())
        if count > best:
            best, best_sample = count, idx
    return best, best_sample


def test_kernel_matches_numpy_twin_on_random_inputs(rng):
    for trial in range(12):
        n = int(rng.integers(3, 60))
        src = rng.uniform(0, 300, (n, 2))
        dst = src @ A_TRUE.T + T_TRUE
        k = int(rng.integers(0, n))
        dst[:k] = rng.uniform(0, 300, (k, 2))
        if trial % 3 == 0:  # repeated source points make degenerate samples
            src[: n // 2] = src[0]
        seed = int(rng.integers(0, 2**62))
        count, sample = ransac_affine(src, dst, 200, 10.0, np.uint64(seed))
        want_count, want_sample = twin_ransac(src, dst, 200, 10.0, seed)
        assert count == want_count
        assert sample.tolist() == list(want_sample)


def test_sampler_draws_distinct_triples():
    state = 7
    for n in (3, 4, 5, 17):
        for _ in range(200):
            state, r = _splitmix(state)
            a = _below(r, n)
            state, r = _splitmix(state)
            b = _below(r, n - 1)
            b += b >= a
            state, r = _splitmix(state)
            c = _below(r, n - 2)
            c += c >= min(a, b)
            c += c >= max(a, b)
            assert len({a, b, c}) == 3 and max(a, b, c) < n


def test_batch_kernel_equals_single_pair_kernel(rng):
    sizes = [0, 2, 3, 5, 40, 120]
    srcs = [rng.uniform(0, 500, (s, 2)) for s in sizes]
    dsts = [s @ A_TRUE.T + T_TRUE + rng.normal(0, 3, s.shape) for s in srcs]
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    counts, samples = ransac_affine_batch(
        np.concatenate(srcs), np.concatenate(dsts), offsets, 300, 10.0, np.uint64(5), 4
    )
    for p, s in enumerate(sizes):
        if s < 4:
            assert counts[p] == 0 and samples[p].tolist() == [-1, -1, -1]
        else:
            c, smp = ransac_affine(srcs[p], dsts[p], 300, 10.0, np.uint64(5))
            assert counts[p] == c and samples[p].tolist() == smp.tolist()


# ---------------------------------------------------------------- synthetic image pairs
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _feats(locs, desc):
    n = len(locs)
    return LocalFeatures(np.asarray(locs, np.float32), np.ones(n, np.float32), np.ones(n, np.float32), desc)


def make_candidate(rng, q, n_in, n_out):
    """A candidate matching q's first n_in + n_out features: n_in follow q = A c + t, n_out are > 30 px off."""
    n = n_in + n_out
    dim = q.dim
    c_desc = _unit(q.descriptors[:n] + rng.normal(0, 0.02, (n, dim)).astype(np.float32))
    q_loc = q.locations[:n].astype(np.float64)
    c_loc = np.linalg.solve(A_TRUE, (q_loc - T_TRUE).T).T
    for i in range(n_in, n):
        while True:
            cand = rng.uniform([0, 0], [640, 480])
            if np.linalg.norm(A_TRUE @ cand + T_TRUE - q_loc[i]) > 30:
                c_loc[i] = cand
                break
    perm = rng.permutation(n)  # candidate order must not matter
    return _feats(c_loc[perm], c_desc[perm])


def make_pair(rng, n_in, n_out, n_extra=50, dim=32):
    """A query of n_in + n_out + n_extra features and a ``make_candidate``; the extra ones match nothing."""
    n = n_in + n_out + n_extra
    q = _feats(rng.uniform([0, 0], [640, 480], (n, 2)), _unit(rng.normal(size=(n, dim))))
    return q, make_candidate(rng, q, n_in, n_out)


def test_known_affine_transform_inliers_found(rng):
    q, c = make_pair(rng, n_in=120, n_out=80)
    qi, ii = putative_matches(q.descriptors, c.descriptors, 0.9)
    assert len(qi) == 200  # the 50 extra query features have no neighbour within 0.9
    assert geometric_verification(q, [c], RerankConfig()).tolist() == [120]


def test_agrees_with_skimage_ransac_on_clean_data(rng):
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    q, c = make_pair(rng, n_in=60, n_out=60)
    qi, ii = putative_matches(q.descriptors, c.descriptors, 0.9)
    _, inl = ransac((c.locations[ii].astype(float), q.locations[qi].astype(float)), AffineTransform,
                    min_samples=3, residual_threshold=10.0, max_trials=1000, rng=0)
    assert int(inl.sum()) == geometric_verification(q, [c])[0] == 60


def test_three_matches_score_zero_four_do_not(rng):
    q, c = make_pair(rng, n_in=4, n_out=0, n_extra=20)
    assert geometric_verification(q, [c])[0] == 4
    assert geometric_verification(q, [c.select(np.arange(3))])[0] == 0
    assert geometric_verification(q, [c.select(np.arange(3))], RerankConfig(min_matches=3))[0] == 3
    empty = LocalFeatures.empty(q.dim)
    assert geometric_verification(q, [empty]).tolist() == [0]
    assert geometric_verification(empty, [c]).tolist() == [0]
    assert geometric_verification(q, []).shape == (0,)


def test_putative_matches_rule():
    # every QUERY feature takes its nearest candidate feature; several may share one; distance must be < bound
    cand = np.array([[0.0, 0.0], [3.0, 3.0]], np.float32)
    query = np.array([[0.5, 0.0], [0.0, 0.4], [0.0, -0.2], [2.0, 2.9]], np.float32)
    qi, ii = putative_matches(query, cand, 0.5)
    assert qi.tolist() == [1, 2] and ii.tolist() == [0, 0]  # 0.5 is not < 0.5; (2, 2.9) is 1.0 from (3, 3)
    qi, ii = putative_matches(query, cand, 1.5)
    assert qi.tolist() == [0, 1, 2, 3] and ii.tolist() == [0, 0, 0, 1]


def test_putative_matches_equal_kdtree(rng):
    q = _unit(rng.normal(size=(400, 16)))
    x = _unit(rng.normal(size=(300, 16)))
    qi, ii = putative_matches(q, x, 0.9)
    d, nn = cKDTree(x).query(q, distance_upper_bound=0.9)
    keep = nn != len(x)
    assert qi.tolist() == np.flatnonzero(keep).tolist() and ii.tolist() == nn[keep].tolist()
    assert 0 < len(qi) < len(q)


def test_rerank_orders_by_inliers_then_score(rng):
    q, strong = make_pair(rng, 100, 20)
    weak = make_candidate(rng, q, 30, 20)
    unrelated = _feats(rng.uniform(0, 100, (80, 2)), _unit(rng.normal(size=(80, 32))))
    db = {10: unrelated, 11: weak, 12: strong, 13: unrelated, 14: unrelated}
    ids, scores = np.array([13, 10, 11, 12, 14]), np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    out_ids, out_scores, inl = rerank(q, ids, scores, db.__getitem__, RerankConfig())
    assert out_ids.tolist() == [12, 11, 13, 10, 14]
    assert out_scores.tolist() == [0.6, 0.7, 0.9, 0.8, 0.5]
    assert inl.tolist() == [100, 30, 0, 0, 0]
    # only the top 2 are verified: the rest keep their place, inliers -1
    out_ids, _, inl = rerank(q, ids, scores, db.__getitem__, RerankConfig(num_to_rerank=2))
    assert out_ids.tolist() == [13, 10, 11, 12, 14] and inl.tolist() == [0, 0, -1, -1, -1]
    # junk is skipped: the top-2 non-junk are 11 and 12
    out_ids, _, inl = rerank(q, ids, scores, db.__getitem__, RerankConfig(num_to_rerank=2), junk={13, 10})
    assert out_ids.tolist() == [12, 11, 13, 10, 14] and inl.tolist() == [100, 30, -1, -1, -1]
    # nothing to verify
    assert [a.tolist() for a in rerank(q, [], [], db.__getitem__)] == [[], [], []]


def test_deterministic_across_runs_and_thread_counts(rng):
    q, _ = make_pair(rng, 40, 160)
    planted = rng.integers(5, 40, 6)
    cands = [make_candidate(rng, q, int(k), 150) for k in planted]
    base = geometric_verification(q, cands, RerankConfig(workers=1))
    assert (base >= 5).all()  # every candidate really goes through RANSAC
    for workers in (1, 2, 2):
        assert geometric_verification(q, cands, RerankConfig(workers=workers)).tolist() == base.tolist()
    # a candidate's score does not depend on its position in the batch
    assert geometric_verification(q, cands[::-1], RerankConfig(workers=2)).tolist() == base[::-1].tolist()
    # another RANSAC seed samples other hypotheses: never more inliers than planted (+2 by chance), the
    # planted model found whenever it has 20+ inliers, and the same counts again when repeated
    other = geometric_verification(q, cands, RerankConfig(seed=12345, workers=2))
    for counts in (base, other):
        assert (counts <= planted + 2).all(), (counts, planted)
        assert (counts[planted >= 20] >= 0.8 * planted[planted >= 20]).all(), (counts, planted)
    assert geometric_verification(q, cands, RerankConfig(seed=12345, workers=1)).tolist() == other.tolist()


def test_bad_inputs(rng):
    q, c = make_pair(rng, 10, 0)
    with pytest.raises(ValueError, match="dimension 16 differs from the query's 32"):
        geometric_verification(q, [_feats(np.zeros((3, 2)), _unit(rng.normal(size=(3, 16))))])
    with pytest.raises(ValueError, match="min_matches"):
        geometric_verification(q, [c], RerankConfig(min_matches=2))
    with pytest.raises(ValueError, match="equal length"):
        rerank(q, [1, 2], [0.5], lambda i: c)
    with pytest.raises(ValueError, match="not LocalFeatures"):
        rerank(q, [1], [0.5], lambda i: None)
    cfg = RerankConfig.from_dict({"num_to_rerank": 50, "seed": 3})
    assert cfg.num_to_rerank == 50 and cfg.to_dict()["descriptor_distance"] == 0.9
