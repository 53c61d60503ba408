"""Hamming-embedding correspondences for verification (``rerank.correspondences: hamming``): features of the
same visual word whose signatures differ in at most h bits — the kernel against brute force, the signatures
and their cache, query-side multiple assignment, and usac verification on them."""

import numpy as np
import pytest

from d2r.codebook import Codebook
from d2r.features.base import LocalFeatures
from d2r.kernels.correspond import hamming_pairs
from d2r.query.config import RerankConfig
from d2r.query.verify import geometric_verification
from d2r.signatures import hamming_correspondences, word_signatures


def _brute(qw, qs, xw, xs, max_bits):
    out = []
    for i in range(len(qw)):
        for j in range(len(xw)):
            if qw[i] == xw[j] and np.unpackbits(qs[i] ^ xs[j]).sum() <= max_bits:
                out.append((i, j))
    return out


@pytest.mark.parametrize("nbytes", [2, 16])
def test_hamming_pairs_kernel_equals_brute_force(rng, nbytes):
    for _ in range(20):
        p, f = rng.integers(0, 40, 2)
        qw = np.sort(rng.integers(0, 6, p)).astype(np.int64)
        xw = np.sort(rng.integers(0, 6, f)).astype(np.int64)
        qs = rng.integers(0, 256, (p, nbytes), dtype=np.uint8)
        xs = rng.integers(0, 256, (f, nbytes), dtype=np.uint8)
        h = int(rng.integers(0, 8 * nbytes + 1))
        a, b = hamming_pairs(qw, qs, xw, xs, h)
        assert list(zip(a.tolist(), b.tolist())) == _brute(qw, qs, xw, xs, h)


def test_hamming_correspondences_unsorted_and_uint64_view(rng):
    qw = rng.integers(0, 5, 50).astype(np.int64)
    xw = rng.integers(0, 5, 70).astype(np.int64)
    qs = rng.integers(0, 256, (50, 16), dtype=np.uint8)
    xs = rng.integers(0, 256, (70, 16), dtype=np.uint8)
    qi, xi = hamming_correspondences(qw, qs, xw, xs, 60)
    assert list(zip(qi.tolist(), xi.tolist())) == _brute(qw, qs, xw, xs, 60)
    assert hamming_correspondences(qw[:0], qs[:0], xw, xs, 60)[0].size == 0


def test_hamming_pairs_hand_computed():
    qw = np.array([1, 1, 3], np.int64)
    qs = np.array([[0b11110000], [0b00001111], [0]], np.uint8)
    xw = np.array([1, 2, 3], np.int64)
    xs = np.array([[0b11100000], [0], [0b11111111]], np.uint8)
    a, b = hamming_pairs(qw, qs, xw, xs, 1)  # (0, 0): 1 bit; (1, 0): 7 bits; (2, 2): 8 bits
    assert a.tolist() == [0] and b.tolist() == [0]
    a, b = hamming_pairs(qw, qs, xw, xs, 8)
    assert a.tolist() == [0, 1, 2] and b.tolist() == [0, 0, 2]


def _book(rng, k=16, d=32):
    c = rng.normal(size=(k, d)).astype(np.float32)
    return Codebook(c / np.linalg.norm(c, axis=1, keepdims=True))


def _feats(loc, desc):
    n = len(loc)
    return LocalFeatures(np.asarray(loc, np.float32), np.ones(n, np.float32), np.ones(n, np.float32),
                         np.asarray(desc, np.float32))


def test_word_signatures(rng):
    book = _book(rng)
    x = rng.normal(size=(30, 32)).astype(np.float32)
    w, s = word_signatures(x, book)
    assert w.tolist() == np.argmin(((x[:, None] - book.centroids[None]) ** 2).sum(-1), 1).tolist()
    assert np.array_equal(np.unpackbits(s, axis=1)[:, :32].astype(bool), x - book.centroids[w] > 0)


def test_hamming_verification_counts_known_affine_and_rejects_random(rng):
    book = _book(rng)
    n_in, n_out = 60, 200
    q_loc = rng.uniform(0, 1000, (n_in + n_out, 2))
    q_desc = rng.normal(size=(n_in + n_out, 32)).astype(np.float32)
    c_desc = rng.normal(size=(n_in + n_out, 32)).astype(np.float32)
    c_desc[:n_in] = q_desc[:n_in]  # same word and signature
    c_loc = rng.uniform(0, 1000, (n_in + n_out, 2))
    c_loc[:n_in] = q_loc[:n_in] @ np.array([[0.8, -0.3], [0.25, 1.1]]).T + [40.0, -15.0]
    query, cand = _feats(q_loc, q_desc), _feats(c_loc, c_desc)
    cfg = RerankConfig(method="usac", correspondences="hamming", hamming=0.0, workers=1)
    # at h = 0 only exact signature agreement: the 60 planted pairs plus rare chance agreements elsewhere
    got = geometric_verification(query, [cand, LocalFeatures.empty(32)], cfg, book)
    assert got[1] == 0 and 60 <= got[0] <= 62
    rand = _feats(rng.uniform(0, 1000, (n_in + n_out, 2)), c_desc)
    loose = RerankConfig(method="usac", correspondences="hamming", hamming=0.375, workers=2)
    assert geometric_verification(query, [rand], loose, book)[0] < loose.min_inliers
    with pytest.raises(ValueError, match="codebook"):
        geometric_verification(query, [cand], cfg)


def test_correspondences_validation():
    with pytest.raises(ValueError, match="correspondences"):
        RerankConfig(method="usac", correspondences="nope").check()
    with pytest.raises(ValueError, match="needs method 'usac'"):
        RerankConfig(method="official", correspondences="hamming").check()
    with pytest.raises(ValueError, match="hamming"):
        RerankConfig(method="usac", hamming=1.5).check()


def test_signature_cache_is_keyed_by_codebook_and_content(rng):
    from d2r.signatures import cached_word_signatures

    a, b = _book(rng), _book(rng)
    x = rng.normal(size=(40, 32)).astype(np.float32)
    for book in (a, b, a):
        w, s = cached_word_signatures(x, book)
        w0, s0 = word_signatures(x, book)
        assert np.array_equal(w, w0) and np.array_equal(s, s0)
    y = x.copy()
    y[0] += 1.0
    assert np.array_equal(cached_word_signatures(y, a)[0], word_signatures(y, a)[0])


def test_query_multiple_assignment(rng):
    book = _book(rng)
    x = rng.normal(size=(25, 32)).astype(np.float32)
    w3, s3 = word_signatures(x, book, 3)
    w1, s1 = word_signatures(x, book)
    assert w3.shape == (75,) and np.array_equal(w3[::3], w1) and np.array_equal(s3[::3], s1)
    d = ((x[:, None] - book.centroids[None]) ** 2).sum(-1)
    assert w3.reshape(25, 3).tolist() == np.argsort(d, 1, kind="stable")[:, :3].tolist()
    # a candidate whose descriptors are the query's: with m = 3 every query descriptor still counts once
    loc = rng.uniform(0, 1000, (25, 2))
    q = _feats(loc, x)
    c = _feats(loc * 1.1 + 5, x)
    for m in (1, 3):
        cfg = RerankConfig(method="usac", correspondences="hamming", query_num_assignments=m, workers=1)
        assert geometric_verification(q, [c], cfg, book).tolist() == [25]
    with pytest.raises(ValueError, match="query_num_assignments"):
        RerankConfig(query_num_assignments=0).check()
