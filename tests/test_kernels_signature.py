"""The signature kernels (d2r.kernels.signature) against their numpy twins on random signatures."""

import numpy as np
import pytest

from d2r.duplicates.signature import words
from d2r.kernels import signature as ks
from tests import reference as ref


def _signatures(rng, n, near=0):
    """(n, 648) int8 in {-2..2}, mostly zero, ``near`` of them noisy copies of others (so words are shared)."""
    sig = rng.choice(np.array([-2, -1, 0, 1, 2], np.int8), size=(n, 648), p=[.15, .15, .4, .15, .15])
    for i in rng.choice(n, size=min(near, n), replace=False):
        src = sig[rng.integers(n)].copy()
        flip = rng.random(648) < 0.08
        src[flip] = rng.integers(-2, 3, size=int(flip.sum()))
        sig[i] = src
    sig[rng.random(n) < 0.05] = 0  # featureless rows: distance 1.0 to everything
    return sig


@pytest.mark.parametrize("seed", range(4))
def test_normalized_distances_match_numpy_bit_for_bit(seed):
    rng = np.random.default_rng(seed)
    sigs = _signatures(rng, 60, near=20)
    rows = rng.integers(0, 60, size=100)
    for q in (sigs[0], sigs[3], np.zeros(648, np.int8)):
        out = np.empty(rows.size)
        ks.normalized_distances(q, sigs, rows, out)
        np.testing.assert_array_equal(out, ref.normalized_distances(q, sigs[rows]))


@pytest.mark.parametrize("seed", range(4))
def test_word_search_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    sigs = _signatures(rng, n, near=n // 2)
    queries = np.concatenate([sigs[rng.integers(0, n, size=10)], _signatures(rng, 5)])
    w, qw = words(sigs), words(queries)
    dead = rng.random(n) < 0.2
    order = np.argsort(w, axis=0, kind="stable").T  # (P, n)
    sorted_words = np.take_along_axis(w.T, order, axis=1)
    threshold = float(rng.uniform(0.3, 0.7))
    stamp = np.full(n, -1, np.int64)
    cap = n + int(rng.integers(0, 3 * n))  # a small buffer: the search resumes where it stopped
    got = ([], [], [])
    start = 0
    while start < queries.shape[0]:
        oq, orow, od = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap)
        start, m = ks.word_search(qw, queries, start, sorted_words, order.astype(np.int32), sigs, dead,
                                  threshold, stamp, oq, orow, od)
        got[0].append(oq[:m]), got[1].append(orow[:m]), got[2].append(od[:m])
    gq, grow, gd = (np.concatenate(a) for a in got)
    o = np.lexsort((grow, gq))
    wq, wrow, wd = ref.word_search(qw, queries, w, sigs, dead, threshold)
    np.testing.assert_array_equal(gq[o], wq)
    np.testing.assert_array_equal(grow[o], wrow)
    np.testing.assert_array_equal(gd[o], wd)
