import pickle

import numpy as np
import pytest
from scipy.io import savemat

from d2r.eval.revisitop import GroundTruth, QueryGroundTruth, compute_ap, evaluate, load_gnd, ranks_from_scores


def _q(easy=(), hard=(), junk=(), bbx=None):
    a = lambda x: np.asarray(x, np.int64)  # noqa: E731
    return QueryGroundTruth(a(easy), a(hard), a(junk), None if bbx is None else np.asarray(bbx, float))


def _gt(num_db, queries, qnames=None):
    imlist = [f"db{i}" for i in range(num_db)]
    qimlist = qnames or [f"q{i}" for i in range(len(queries))]
    return GroundTruth(imlist, qimlist, list(queries))


# ---------------------------------------------------------------- a slow, obvious twin of revisitop compute_map
def _twin_map(ranks_db_by_q, ok, junk, ks):
    """The revisitop loop: ranks in revisitop's (num_db, num_queries) layout."""
    nq = len(ok)
    aps, prs, nvalid = [], [], 0
    for i in range(nq):
        if len(ok[i]) == 0:
            continue
        nvalid += 1
        col = list(ranks_db_by_q[:, i])
        pos = [p for p, x in enumerate(col) if x in set(ok[i])]
        jpos = [p for p, x in enumerate(col) if x in set(junk[i])]
        adj = [p - sum(1 for j in jpos if j < p) for p in pos]
        ap = 0.0
        for j, r in enumerate(adj):
            p0 = 1.0 if r == 0 else j / r
            ap += (p0 + (j + 1) / (r + 1)) / 2 / len(ok[i])
        aps.append(ap)
        one = [r + 1 for r in adj]
        row = []
        for k in ks:
            kq = min(max(one), k)
            row.append(sum(1 for r in one if r <= kq) / kq)
        prs.append(row)
    return 100 * np.mean(aps), 100 * np.mean(prs, axis=0)


# ---------------------------------------------------------------- hand-computed cases
def test_compute_ap_hand_values():
    assert compute_ap([0, 1, 2], 3) == pytest.approx(1.0)
    # ranks 0 and 3 of 2 positives: (1 + 1)/2/2 + (1/3 + 2/4)/2/2 = 17/24
    assert compute_ap([0, 3], 2) == pytest.approx(17 / 24)
    # single positive at rank 1: left precision 0/1, right 1/2 -> 0.25
    assert compute_ap([1], 1) == pytest.approx(0.25)
    # positives not retrieved contribute nothing
    assert compute_ap([0], 2) == pytest.approx(0.5)
    assert compute_ap([], 3) == 0.0


def test_junk_before_positives_hand_values():
    # db of 10, positives {2, 5}, junk {0}: row puts junk first, positives at positions 1 and 4 -> junk-free 0 and 3
    g = _gt(10, [_q(easy=[2, 5], junk=[0])])
    ranks = np.array([[0, 2, 1, 3, 5, 4, 6, 7, 8, 9]])
    m = evaluate(ranks, g, protocols=("medium",))["medium"]
    assert m["mAP"] == pytest.approx(100 * 17 / 24)
    assert m["mP@1"] == pytest.approx(100.0)
    assert m["mP@5"] == pytest.approx(50.0)  # k' = min(4, 5) = 4 -> 2/4
    assert m["mP@10"] == pytest.approx(50.0)
    assert m["mR@1"] == pytest.approx(50.0)
    assert m["mR@5"] == pytest.approx(100.0)
    assert m["num_queries"] == 1
    # without the junk list image 0 counts as a negative: ranks 1 and 4 -> ((0 + 1/2)/2 + (1/4 + 2/5)/2) / 2
    g2 = _gt(10, [_q(easy=[2, 5])])
    m2 = evaluate(ranks, g2, protocols=("medium",))["medium"]
    assert m2["mAP"] == pytest.approx(100 * ((0 + 0.5) / 2 + (0.25 + 0.4) / 2) / 2)
    assert m2["mP@1"] == 0.0


def test_all_junk_in_front_gives_perfect_scores():
    g = _gt(6, [_q(hard=[3], junk=[0, 1, 2])])
    m = evaluate(np.array([[0, 1, 2, 3, 4, 5]]), g)
    assert m["medium"]["mAP"] == pytest.approx(100.0)
    assert m["hard"]["mAP"] == pytest.approx(100.0)
    assert m["medium"]["mP@10"] == pytest.approx(100.0)  # k' = min(1, 10) = 1
    # easy protocol: the only positive is hard -> no positives -> excluded -> NaN with 0 queries
    assert m["easy"]["num_queries"] == 0 and np.isnan(m["easy"]["mAP"])


def test_protocols_move_easy_and_hard_between_positive_and_junk():
    # positives: easy {1}, hard {4}; ranking 4, 0, 1, 2, 3, 5
    g = _gt(6, [_q(easy=[1], hard=[4])])
    ranks = np.array([[4, 0, 1, 2, 3, 5]])
    res = evaluate(ranks, g)
    # easy: hard image 4 is junk -> image 1 at junk-free rank 1 -> (0 + 1/2)/2 = 0.25
    assert res["easy"]["mAP"] == pytest.approx(25.0)
    # medium: ranks 0 and 2 -> (1 + 1)/2/2 + (1/2 + 2/3)/2/2
    assert res["medium"]["mAP"] == pytest.approx(100 * (0.5 + (0.5 + 2 / 3) / 4))
    # hard: positive 4 at rank 0 (easy 1 is junk after it)
    assert res["hard"]["mAP"] == pytest.approx(100.0)


def test_queries_without_positives_are_excluded_from_the_mean():
    g = _gt(5, [_q(easy=[0]), _q(junk=[1]), _q(easy=[4])])
    ranks = np.tile(np.arange(5), (3, 1))
    m = evaluate(ranks, g, protocols=("medium",))["medium"]
    # query 0: AP 1; query 2: positive at rank 4 -> (0 + 1/5)/2 = 0.1; query 1 excluded
    assert m["mAP"] == pytest.approx(100 * (1.0 + 0.1) / 2)
    assert m["mP@5"] == pytest.approx(100 * (1.0 + 1 / 5) / 2)
    assert m["num_queries"] == 2


def test_ties_in_scores_are_broken_by_lower_database_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    assert ranks_from_scores(scores).tolist() == [[1, 0, 2, 3, 4]]
    # positive 3 tied with 0 and 2 -> ranked after them: junk-free rank 3
    g = _gt(5, [_q(easy=[3])])
    m = evaluate(ranks_from_scores(scores), g, protocols=("medium",))["medium"]
    assert m["mAP"] == pytest.approx(100 * (0 / 3 + 1 / 4) / 2)
    assert ranks_from_scores(np.array([[np.nan, 1.0, 2.0]])).tolist() == [[2, 1, 0]]


def test_unranked_positives_take_the_last_non_junk_places():
    # db 10, positives {2, 7}, junk {0}; truncated row [2, 1]: 7 missing -> rank 10 - 1 - 1 = 8
    g = _gt(10, [_q(easy=[2, 7], junk=[0])])
    trunc = evaluate([np.array([2, 1])], g, protocols=("medium",))["medium"]
    assert trunc["mAP"] == pytest.approx(100 * (0.5 + (1 / 8 + 2 / 9) / 4))
    # identical to the worst full completion (junk last, missing positive after every other image)
    full = evaluate(np.array([[2, 1, 3, 4, 5, 6, 8, 9, 7, 0]]), g, protocols=("medium",))["medium"]
    assert trunc == pytest.approx(full)
    # an empty ranking: both positives on the last non-junk places 7 and 8
    empty = evaluate([np.zeros(0, np.int64)], g, protocols=("medium",))["medium"]
    assert empty["mAP"] == pytest.approx(100 * ((0 + 1 / 8) / 4 + (1 / 8 + 2 / 9) / 4))


def test_random_rankings_match_revisitop_loop(rng):
    num_db, nq, ks = 40, 12, (1, 5, 10)
    queries = []
    for i in range(nq):
        perm = rng.permutation(num_db)
        ne, nh, nj = rng.integers(0, 5, 3)
        queries.append(_q(easy=perm[:ne], hard=perm[ne : ne + nh], junk=perm[ne + nh : ne + nh + nj]))
    g = _gt(num_db, queries)
    ranks = np.stack([rng.permutation(num_db) for _ in range(nq)])
    res = evaluate(ranks, g, ks=ks)
    for proto in ("easy", "medium", "hard"):
        ok, junk = g.protocol(proto)
        m, p = _twin_map(ranks.T, [list(x) for x in ok], [list(x) for x in junk], ks)
        assert res[proto]["mAP"] == pytest.approx(m, abs=1e-9)
        assert [res[proto][f"mP@{k}"] for k in ks] == pytest.approx(list(p), abs=1e-9)


def test_query_in_database_marks_the_query_image_as_junk():
    # query "db1" is database image 1; ranked first (self match)
    g = GroundTruth([f"db{i}" for i in range(5)], ["db1"], [_q(easy=[3])])
    ranks = np.array([[1, 3, 0, 2, 4]])
    assert evaluate(ranks, g, protocols=("medium",))["medium"]["mAP"] == pytest.approx(100 * (0 + 0.5) / 2)
    assert evaluate(ranks, g, protocols=("medium",), query_in_database=True)["medium"]["mAP"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="not in imlist"):
        evaluate(ranks, _gt(5, [_q(easy=[3])], ["nope"]), query_in_database=True)


@pytest.mark.parametrize(
    "ranks, match",
    [
        (np.zeros((5, 1), np.int64), "transposed"),
        (np.array([[0, 0, 1]]), "twice"),
        (np.array([[0, 9]]), r"\[0, 5\)"),
        (np.array([[0.0, 1.0]]), "integer"),
    ],
)
def test_bad_rankings_are_refused(ranks, match):
    with pytest.raises(ValueError, match=match):
        evaluate(ranks, _gt(5, [_q(easy=[1])]))


# ---------------------------------------------------------------- file formats
def test_pkl_roundtrip(tmp_path):
    cfg = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["qa"],
        "gnd": [{"bbx": [1.0, 2.0, 30.0, 40.0], "easy": [2], "hard": [], "junk": [0, 1]}],
    }
    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(pickle.dumps(cfg))
    g = load_gnd(p)
    assert g.imlist == ["a", "b", "c"] and g.qimlist == ["qa"]
    q = g.gnd[0]
    assert q.easy.dtype == np.int64 and q.easy.tolist() == [2] and q.hard.tolist() == [] and q.junk.tolist() == [0, 1]
    assert q.bbx.tolist() == [1.0, 2.0, 30.0, 40.0]


def _write_mat(path, imlist, qimlist, entries):
    dt = [("bbx", "O"), ("easy", "O"), ("hard", "O"), ("junk", "O")]
    gnd = np.empty((1, len(entries)), dtype=dt)
    for i, e in enumerate(entries):
        for key, _ in dt:
            gnd[0, i][key] = np.asarray(e[key], dtype=np.float64).reshape(1, -1)
    savemat(
        str(path),
        {
            "imlist": np.array(imlist, dtype=object).reshape(-1, 1),
            "qimlist": np.array(qimlist, dtype=object).reshape(-1, 1),
            "gnd": gnd,
        },
    )


def test_mat_reader_converts_one_based_indices(tmp_path):
    p = tmp_path / "gnd_test.mat"
    entries = [
        {"bbx": [10.5, 20.0, 100.0, 200.0], "easy": [1, 3], "hard": [4], "junk": []},
        {"bbx": [0.0, 0.0, 5.0, 6.0], "easy": [], "hard": [2], "junk": [5]},
    ]
    _write_mat(p, ["all_souls_000001", "a2", "a3", "a4", "a5"], ["q1", "q2"], entries)
    g = load_gnd(p)
    assert g.imlist == ["all_souls_000001", "a2", "a3", "a4", "a5"] and g.qimlist == ["q1", "q2"]
    assert g.gnd[0].easy.tolist() == [0, 2] and g.gnd[0].hard.tolist() == [3] and g.gnd[0].junk.tolist() == []
    assert g.gnd[1].easy.tolist() == [] and g.gnd[1].hard.tolist() == [1] and g.gnd[1].junk.tolist() == [4]
    assert g.gnd[0].bbx.tolist() == [10.5, 20.0, 100.0, 200.0]  # bbx is zero-based already: unchanged
    assert all(q.easy.dtype == np.int64 for q in g.gnd)


def test_mat_reader_single_query(tmp_path):
    p = tmp_path / "one.mat"
    _write_mat(p, ["x", "y"], ["q"], [{"bbx": [1, 2, 3, 4], "easy": [2], "hard": [], "junk": [1]}])
    g = load_gnd(p)
    assert g.num_queries == 1 and g.gnd[0].easy.tolist() == [1] and g.gnd[0].junk.tolist() == [0]


def test_bad_files_name_the_file(tmp_path):
    p = tmp_path / "broken.pkl"
    p.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="broken.pkl"):
        load_gnd(p)
    q = tmp_path / "broken.mat"
    q.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.mat"):
        load_gnd(q)
    r = tmp_path / "range.pkl"
    r.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}))
    with pytest.raises(ValueError, match="range.pkl.*out of range"):
        load_gnd(r)


# ---------------------------------------------------------------- the real dev ground truth
@pytest.mark.dev
def test_dev_gnd_loads_and_perfect_ranking_scores_100(bench_dev):
    g = load_gnd(bench_dev / "gnd.pkl")
    assert g.num_db == 367 and g.num_queries == 111
    assert all(q.bbx is None for q in g.gnd)
    self_ids = g.query_db_ids()
    assert all(self_ids[i] in q.junk for i, q in enumerate(g.gnd))  # each query is junk for itself
    # a ranking with the query first, then its positives, then the rest
    rows = []
    for i, q in enumerate(g.gnd):
        first = [self_ids[i], *q.easy.tolist(), *q.hard.tolist()]
        rows.append(np.concatenate([first, np.setdiff1d(np.arange(g.num_db), first)]))
    ranks = np.stack(rows)
    res = evaluate(ranks, g)
    assert res["medium"]["mAP"] == pytest.approx(100.0) and res["medium"]["num_queries"] == 111
    assert res["hard"]["mAP"] == pytest.approx(100.0) and res["hard"]["num_queries"] == 65
    assert res["medium"]["mR@10"] < 100.0  # groups larger than 10 images cannot be recalled in the top 10
    assert evaluate(ranks, g, query_in_database=True) == res
    rv_rand = evaluate(np.stack([np.random.default_rng(1).permutation(367) for _ in range(111)]), g)
    assert rv_rand["medium"]["mAP"] < 20.0
