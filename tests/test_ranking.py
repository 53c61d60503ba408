"""Top-k selection: best first, ties in insertion order, against the slow obvious stable sort."""

import numpy as np

import d2r
from d2r.index.database import Database
from d2r.ranking import top_k_stable


def test_top_k_stable_matches_a_stable_sort(rng):
    for trial in range(300):
        n = int(rng.integers(0, 60))
        # few distinct values (many ties), with -inf like removed images
        scores = rng.choice(np.array([-np.inf, -1.0, 0.0, 0.25, 0.5, 1.0]), size=n)
        k = int(rng.integers(0, n + 3))
        want = np.argsort(-scores, kind="stable")[:k]
        np.testing.assert_array_equal(top_k_stable(scores, k), want, err_msg=f"trial {trial}")


def test_all_ties_keep_insertion_order_at_the_cut():
    scores = np.zeros(1000)
    np.testing.assert_array_equal(top_k_stable(scores, 7), np.arange(7))
    scores[[900, 5]] = 1.0
    np.testing.assert_array_equal(top_k_stable(scores, 4), [5, 900, 0, 1])


def test_database_equal_scores_in_insertion_order(tmp_path, rng):
    book = d2r.Codebook(rng.standard_normal((8, 4)).astype(np.float32))
    db = Database.create(tmp_path / "db", book, kernel="asmk_star")
    x = rng.standard_normal((20, 4)).astype(np.float32)
    names = [f"img{i}" for i in (9, 3, 7, 1, 5, 0, 8, 2, 6, 4)]  # not sorted: insertion order is the order
    for name in names:
        db.add(name, x)
    ranking = db.search(x, top_k=4)
    assert list(ranking.ids) == names[:4]
    assert len(set(np.round(ranking.scores, 9))) == 1
