"""Codebook assignment, aggregation and similarity against the slow numpy reference on random inputs."""

import numpy as np
import pytest

import d2r
from d2r.aggregate import Aggregator, similarity
from tests import reference as ref


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_regions(rng, n):
    r = int(rng.integers(1, 6))
    cuts = np.sort(rng.integers(0, n + 1, size=r - 1))
    counts = np.diff(np.concatenate([[0], cuts, [n]]))
    if r > 2:
        counts = np.insert(counts, 1, 0)  # always one empty region in the middle
    return counts


CASES = [  # (seed, K, D, N, m)
    (0, 5, 2, 0, 1), (1, 5, 2, 7, 3), (2, 64, 16, 1, 2), (3, 64, 16, 300, 1), (4, 512, 128, 1000, 1),
    (5, 4096, 128, 2000, 1), (6, 4096, 16, 500, 3), (7, 300, 2, 2000, 2), (8, 1024, 128, 50, 3),
    (9, 2500, 32, 600, 5),
]


@pytest.mark.parametrize("seed,k,d,n,m", CASES)
def test_assign_matches_brute_force(seed, k, d, n, m):
    rng = np.random.default_rng(seed)
    cents, x = _unit(rng, k, d), _unit(rng, n, d)
    got = d2r.Codebook(cents).assign(x, m)
    assert got.shape == (n, m) and got.dtype == np.int64
    np.testing.assert_array_equal(got, ref.assign(x, cents, m))


@pytest.mark.parametrize("seed,k,d,n,m", [c for c in CASES if c[3] > 1])
def test_assign_threaded_path_matches_brute_force(seed, k, d, n, m, monkeypatch):
    import d2r.codebook.codebook as cb

    monkeypatch.setattr(cb, "_PARALLEL_MIN_PAIRS", 1)  # every size takes the threaded path
    monkeypatch.setattr(cb, "_BLOCK_ROWS", 7)  # many uneven row blocks
    monkeypatch.setattr(cb, "_threads", lambda: 3)
    rng = np.random.default_rng(seed)
    cents, x = _unit(rng, k, d), _unit(rng, n, d)
    np.testing.assert_array_equal(d2r.Codebook(cents).assign(x, m), ref.assign(x, cents, m))


@pytest.mark.parametrize("seed", range(3))
def test_assign_near_ties_beyond_the_shortlist(seed):
    """512 words at the same distance from a descriptor up to float32 storage rounding: the float32 shortlist
    cannot order them, so the row must be settled in float64 over all words."""
    from d2r.kernels.assign import refine_exact

    rng = np.random.default_rng(seed)
    k, d = 512, 16
    x = rng.standard_normal((20, d)).astype(np.float32)
    u = rng.standard_normal((k, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cents = (x[0].astype(np.float64) + 3 * u).astype(np.float32)
    want = ref.assign(x, cents, 3)
    book = d2r.Codebook(cents)
    np.testing.assert_array_equal(book.assign(x, 3), want)
    # The test has teeth: re-ranking the float32 shortlist alone gets row 0 wrong.
    from d2r.kernels.assign import smallest_per_row

    short = smallest_per_row((x[:1] - book._mean) @ book._centred.T, book._sq_norms, 7)
    assert not np.array_equal(refine_exact(x[:1], book.centroids, short, 3), want[:1])


def test_assign_ties_break_by_lower_index():
    cents = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0]], np.float32)
    x = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    got = d2r.Codebook(cents).assign(x, 3)
    np.testing.assert_array_equal(got, [[0, 2, 4], [1, 3, 0], [0, 1, 2]])


def _check(result, want, kernel):
    if kernel == "vlad":
        np.testing.assert_allclose(result.vector, want["vector"], atol=1e-5)
        return
    np.testing.assert_array_equal(result.words, want["words"])
    assert result.words.dtype == np.uint32
    if kernel == "asmk":
        np.testing.assert_allclose(result.descriptors, want["descriptors"], atol=1e-5)
    else:
        np.testing.assert_array_equal(result.bits, want["bits"])


@pytest.mark.parametrize("seed,k,d,n,m", CASES)
@pytest.mark.parametrize("kernel", ["vlad", "asmk", "asmk_star"])
def test_aggregation_matches_reference(seed, k, d, n, m, kernel):
    if kernel == "vlad" and k * d > 200_000:
        k = 256  # dense K·D vectors: keep the reference fast
    rng = np.random.default_rng(seed)
    cents, x = _unit(rng, k, d), _unit(rng, n, d)
    book = d2r.Codebook(cents)
    for l2 in ([None, True, False] if kernel == "vlad" else [None]):
        kw = {"l2_normalize": l2} if kernel == "vlad" else {}
        agg = Aggregator(book, kernel, m, **kw)
        _check(agg(x), ref.aggregate(x, cents, kernel, m, None, l2), kernel)
        regions = _random_regions(rng, n)
        _check(agg(x, regions=regions), ref.aggregate(x, cents, kernel, m, list(regions), l2), kernel)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kernel", ["vlad", "asmk", "asmk_star"])
def test_similarity_matches_reference(seed, kernel):
    rng = np.random.default_rng(seed)
    k, d = (64, 16) if kernel == "vlad" else (int(rng.choice([5, 64, 512])), int(rng.choice([2, 16, 128])))
    cents = _unit(rng, k, d)
    # Similar images: b is a noisy copy of part of a, so many words are shared.
    xa = _unit(rng, int(rng.integers(0, 400)), d)
    xb = np.concatenate([xa[: len(xa) // 2] + 0.05 * rng.standard_normal((len(xa) // 2, d)), _unit(rng, 50, d)])
    xb = xb.astype(np.float32)
    agg = Aggregator(cents, kernel)
    a, b = agg(xa), agg(xb)
    ra, rb = ref.aggregate(xa, cents, kernel), ref.aggregate(xb, cents, kernel)
    idf = rng.uniform(0.1, 4.0, size=k)
    for alpha, tau, normalize, inclusive in [(3.0, 0.0, True, False), (3.0, 0.0, False, True),
                                             (1.0, 0.5, True, True), (2.0, -0.2, False, False)]:
        for w in ([None, idf] if kernel != "vlad" else [None]):
            got = similarity(a, b, alpha, tau, normalize, inclusive, idf=w)
            want = ref.similarity(kernel, ra, rb, alpha, tau, normalize, inclusive, dim=d, idf=w)
            assert got == pytest.approx(want, abs=1e-5)


def test_empty_inputs_give_defined_results():
    cents = np.eye(4, dtype=np.float32)
    for kernel in ("asmk", "asmk_star"):
        agg = Aggregator(cents, kernel)
        for res in (agg(np.zeros((0, 4), np.float32)), agg(np.zeros((0, 4), np.float32), regions=[0, 0]),
                    agg(np.zeros((0, 4), np.float32), regions=[])):
            assert res.words.shape == (0,) and res.is_empty
            assert similarity(res, agg(cents)) == -1.0
        # a descriptor equal to its centroid has zero residual: the word is dropped
        assert agg(cents[:1]).is_empty
    vlad = Aggregator(cents, "vlad")
    np.testing.assert_array_equal(vlad(np.zeros((0, 4))).vector, np.zeros(16))
    np.testing.assert_array_equal(vlad(np.zeros((0, 4)), regions=[]).vector, np.zeros(16))
    assert vlad(np.zeros((0, 4))).vector.dtype == np.float32


def test_per_region_equals_separate_calls():
    rng = np.random.default_rng(3)
    cents, x = _unit(rng, 32, 8), _unit(rng, 60, 8)
    agg = Aggregator(cents, "asmk_star")
    parts = agg.per_region(x, [20, 0, 40])
    assert len(parts) == 3 and parts[1].is_empty
    for part, (a, b) in zip(parts, [(0, 20), (20, 20), (20, 60)]):
        whole = agg(x[a:b])
        np.testing.assert_array_equal(part.words, whole.words)
        np.testing.assert_array_equal(part.bits, whole.bits)


def test_precomputed_assignments_are_used():
    rng = np.random.default_rng(2)
    cents, x = _unit(rng, 16, 4), _unit(rng, 30, 4)
    book = d2r.Codebook(cents)
    agg = Aggregator(book, "asmk")
    a = agg(x, assignments=book.assign(x))
    np.testing.assert_array_equal(a.words, agg(x).words)
    forced = agg(x, assignments=np.zeros((30, 1), np.int64))
    np.testing.assert_array_equal(forced.words, [0])


def test_assign_exact_with_a_large_common_offset():
    rng = np.random.default_rng(21)
    cents = (200 + rng.standard_normal((256, 128))).astype(np.float32)
    x = (200 + rng.standard_normal((2000, 128))).astype(np.float32)
    np.testing.assert_array_equal(d2r.Codebook(cents).assign(x, 2), ref.assign(x, cents, 2))
