"""Robust verification ("usac"), query expansion (αQE, HQE), per-query AP, paired comparison, the report page."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from d2r.aggregate import Aggregated, Aggregator
from d2r.codebook import Codebook
from d2r.eval.compare import compare_runs, paired_difference
from d2r.eval.revisitop import GroundTruth, QueryGroundTruth, compute_ap
from d2r.features.base import LocalFeatures
from d2r.query.config import ExpansionConfig, RerankConfig
from d2r.query.expand import average_expansion, hamming_expansion
from d2r.query.order import order_by_threshold
from d2r.query.pipeline import reliable_neighbours
from d2r.query.verify import geometric_verification, mutual_ratio_matches, rerank
from d2r.signatures import hamming_correspondences, signatures
from tests.corpus import run_cli
from tests.reference import hamming_matches


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _feats(loc, desc):
    n = len(loc)
    return LocalFeatures(np.asarray(loc, np.float32), np.ones(n, np.float32), np.ones(n, np.float32),
                         np.asarray(desc, np.float32))


def _pair(rng, n_in, n_out, transform):
    """Query with n_in + n_out features; candidate whose first n_in descriptors are noisy copies of the query's
    at locations mapped by ``transform`` (query -> candidate), the rest random."""
    q_loc = rng.uniform(0, 1000, (n_in + n_out, 2))
    q_desc = _unit(rng.normal(size=(n_in + n_out, 128)))
    c_desc = _unit(rng.normal(size=(n_in + n_out, 128)))
    c_desc[:n_in] = _unit(q_desc[:n_in] + rng.normal(0, 0.01, (n_in, 128)))
    c_loc = rng.uniform(0, 1000, (n_in + n_out, 2))
    c_loc[:n_in] = transform(q_loc[:n_in])
    return _feats(q_loc, q_desc), _feats(c_loc, c_desc)


def _affine(p):
    a = np.array([[0.8, -0.3], [0.25, 1.1]])
    return p @ a.T + [40.0, -15.0]


def _homography(p):
    h = np.array([[0.9, 0.1, 30.0], [-0.05, 1.1, -20.0], [2e-4, -1e-4, 1.0]])
    x = np.c_[p, np.ones(len(p))] @ h.T
    return x[:, :2] / x[:, 2:]


# ---------------------------------------------------------------- verification
def test_mutual_ratio_matches_equal_brute_force(rng):
    for _ in range(5):
        q = _unit(rng.normal(size=(int(rng.integers(1, 40)), 16)))
        x = _unit(rng.normal(size=(int(rng.integers(1, 40)), 16)))
        h = min(len(x), len(q)) // 2
        x[:h] = _unit(q[:h] + rng.normal(0, 0.05, (h, 16)))
        d = np.sqrt(((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
        want = []
        for i in range(len(q)):
            o = np.argsort(d[i])
            j = o[0]
            if np.argmin(d[:, j]) != i:
                continue
            if len(x) > 1 and not d[i, j] < 0.8 * d[i, o[1]]:
                continue
            want.append((i, j))
        qi, ii = mutual_ratio_matches(q, x, 0.8)
        assert list(zip(qi.tolist(), ii.tolist())) == want


@pytest.mark.parametrize("model,transform", [("affine", _affine), ("homography", _homography)])
def test_usac_counts_inliers_of_known_transform(rng, model, transform):
    query, cand = _pair(rng, 60, 300, transform)
    cfg = RerankConfig(method="usac", model=model, workers=1)
    qi, _ = mutual_ratio_matches(query.descriptors, cand.descriptors, cfg.ratio)
    assert qi.tolist() == list(range(60))  # random descriptors fail the ratio test
    assert geometric_verification(query, [cand], cfg).tolist() == [60]


def test_usac_rejects_random_matches(rng):
    # every correspondence passes matching, but the locations are unrelated: only chance inliers remain
    query, cand = _pair(rng, 200, 0, lambda p: rng.uniform(0, 1000, p.shape))
    for model in ("affine", "homography"):
        cfg = RerankConfig(method="usac", model=model, workers=1)
        n = int(geometric_verification(query, [cand], cfg)[0])
        assert n < cfg.min_inliers


def test_usac_is_deterministic_and_handles_empty(rng):
    query, cand = _pair(rng, 30, 100, _affine)
    cfg = RerankConfig(method="usac", workers=2)
    a = geometric_verification(query, [cand, cand, LocalFeatures.empty(128)], cfg)
    b = geometric_verification(query, [LocalFeatures.empty(128), cand], cfg)
    assert a.tolist() == [30, 30, 0] and b.tolist() == [0, 30]


def test_order_by_threshold_moves_only_strong_candidates():
    ids = np.array([10, 11, 12, 13, 14, 15])
    scores = np.array([6.0, 5, 4, 3, 2, 1])
    inl = {10: 3, 11: 50, 12: 9, 13: 12, 14: 50}
    # 15 is beyond num_to_rerank=4 (after skipping junk); 12 is junk and never verified
    out, sc, got = order_by_threshold(ids, scores, inl, 4, 10, junk=[12])
    assert out.tolist() == [11, 14, 13, 10, 12, 15]
    assert sc.tolist() == [5, 2, 3, 6, 4, 1]
    assert got.tolist() == [50, 50, 12, 3, -1, -1]


def test_rerank_usac_promotes_true_match_and_keeps_the_rest(rng):
    query, good = _pair(rng, 40, 200, _affine)
    _, bad1 = _pair(rng, 0, 240, _affine)
    _, bad2 = _pair(rng, 0, 240, _affine)
    feats = {"a": bad1, "b": bad2, "c": good}
    ids, scores, inl = rerank(query, ["a", "b", "c"], [3.0, 2.0, 1.0], feats.__getitem__,
                              RerankConfig(method="usac", workers=1))
    assert ids.tolist() == ["c", "a", "b"]
    assert inl[0] == 40 and inl[1] < 10 and inl[2] < 10


def test_rerank_config_validation():
    for bad in ({"method": "x"}, {"ratio": 0.0}, {"model": "rigid"}, {"estimator": "lmeds"}, {"min_inliers": 0}):
        with pytest.raises(ValueError, match="rerank\\."):
            RerankConfig(**bad).check()


# ---------------------------------------------------------------- αQE
def _star(words, bit_rows, dim=8, k=8):
    bits = np.packbits(np.asarray(bit_rows, np.uint8), axis=1)
    return Aggregated("asmk_star", dim, k, 0, words=np.asarray(words, np.uint32), bits=bits)


def test_aqe_asmk_star_hand_computed():
    q = _star([1, 3], [[1, 1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0]])
    n1 = _star([3, 5], [[0, 1, 0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 1, 0, 0]])
    n2 = _star([3], [[0, 0, 0, 1, 1, 1, 0, 0]])
    out = average_expansion(q, [n1, n2], [1.0, 1.0])
    # word 1: query only; word 3: sum of ±1 over the three records, sign (> 0 -> 1); word 5: n1 only
    # word 3 sums per bit: (+1-1-1) (-1+1-1) (+1-1-1) (-1+1+1) (+1-1+1) (-1+1+1) (+1-1-1) (-1+1-1)
    assert out.words.tolist() == [1, 3, 5]
    want = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0]], np.uint8)
    assert np.array_equal(np.unpackbits(out.bits, axis=1), want)
    # a heavier weight on n2 flips bit 0 of word 3: +1 - 1 - 3 < 0 stays 0, bit 3: -1 + 1 + 3 > 0 -> 1
    heavy = average_expansion(q, [n1, n2], [0.0, 3.0])
    assert heavy.words.tolist() == [1, 3]
    # word 3: q (1,0,1,0,1,0,1,0) + 3·n2 (0,0,0,1,1,1,0,0) -> signs of (1-3, -1-3, 1-3, -1+3, 1+3, -1+3, 1-3, -1-3)
    assert np.unpackbits(heavy.bits, axis=1)[1].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]


def test_aqe_vlad_and_asmk_hand_computed():
    a = Aggregated("vlad", 2, 2, 0, vector=np.array([1, 0, 0, 0], np.float32))
    b = Aggregated("vlad", 2, 2, 0, vector=np.array([0, 1, 0, 0], np.float32))
    out = average_expansion(a, [b], [1.0])
    np.testing.assert_allclose(out.vector, [2 ** -0.5, 2 ** -0.5, 0, 0], rtol=1e-6)
    qa = Aggregated("asmk", 2, 4, 0, words=np.array([0], np.uint32), descriptors=np.array([[1, 0]], np.float32))
    na = Aggregated("asmk", 2, 4, 0, words=np.array([0, 2], np.uint32),
                    descriptors=np.array([[0, 1], [0.6, 0.8]], np.float32))
    out = average_expansion(qa, [na], [1.0])
    assert out.words.tolist() == [0, 2]
    np.testing.assert_allclose(out.descriptors, [[2 ** -0.5, 2 ** -0.5], [0.6, 0.8]], rtol=1e-6)
    assert average_expansion(qa, [na], [0.0]) is qa


# ---------------------------------------------------------------- HQE
def test_hamming_pairs_equal_numpy_twin_and_brute_force(rng):
    """HQE and verification share one pair finder (the numba merge-join); its numpy twin and a brute force
    agree with it."""
    for _ in range(5):
        qw = rng.integers(0, 4, 30)
        nw = rng.integers(0, 4, 25)
        qs = rng.integers(0, 256, (30, 2)).astype(np.uint8)
        ns = rng.integers(0, 256, (25, 2)).astype(np.uint8)
        want = [(i, f) for i in range(30) for f in range(25)
                if qw[i] == nw[f] and np.unpackbits(qs[i] ^ ns[f]).sum() <= 6]
        qi, fi = hamming_correspondences(qw.astype(np.int64), qs, nw.astype(np.int64), ns, 6)
        assert list(zip(qi.tolist(), fi.tolist())) == want
        qi, fi = hamming_matches(qw, qs, nw, ns, 6)
        assert list(zip(qi.tolist(), fi.tolist())) == want


def test_hqe_hand_computed():
    # one word at the origin, D = 8: signatures are the signs of the descriptors themselves
    book = Codebook(np.zeros((2, 8), np.float32) + np.array([[0], [10]], np.float32))
    q = np.array([[1, 1, 1, 1, -1, -1, -1, -1]], np.float32) / np.sqrt(8)
    near = np.array([[1, 1, 1, 1, -1, -1, -1, 2]], np.float32) / np.sqrt(9)  # 1 bit away: joins
    far = np.array([[-1, -1, -1, -1, 1, 1, 1, 1]], np.float32) / np.sqrt(8)  # 8 bits away: does not
    other = np.array([[1, 1, 1, 1, -1, -1, -1, -1]], np.float32) / np.sqrt(8)  # same bits, another word
    nb = (np.concatenate([near, far, other]), np.array([0, 0, 1]))
    rec, added = hamming_expansion(book, "asmk", q, np.zeros((1, 1), np.int64), [nb], hamming=3 / 8)
    assert added.tolist() == [1]
    s = q[0].astype(np.float64) + near[0]
    assert rec.words.tolist() == [0]
    np.testing.assert_allclose(rec.descriptors[0], s / np.linalg.norm(s), rtol=1e-6)
    star, _ = hamming_expansion(book, "asmk_star", q, np.zeros((1, 1), np.int64), [nb], hamming=3 / 8)
    assert np.unpackbits(star.bits[0]).tolist() == (s > 0).astype(int).tolist()
    # a neighbour below min_matches adds nothing: the query's own ASMK representation comes back
    plain, added = hamming_expansion(book, "asmk", q, np.zeros((1, 1), np.int64), [nb], 3 / 8, min_matches=2)
    assert added.tolist() == [0]
    want = Aggregator(book, "asmk")(q)
    np.testing.assert_allclose(plain.descriptors, want.descriptors, rtol=1e-6)
    with pytest.raises(ValueError, match="hqe needs an ASMK kernel"):
        hamming_expansion(book, "vlad", q, np.zeros((1, 1), np.int64), [nb])


def test_hqe_equals_aggregating_the_joined_set(rng):
    book = Codebook(rng.normal(size=(16, 8)).astype(np.float32))
    qx = _unit(rng.normal(size=(40, 8)))
    words = book.assign(qx, 2)
    nx = _unit(rng.normal(size=(50, 8)))
    nw = book.assign(nx, 1)[:, 0]
    rec, added = hamming_expansion(book, "asmk", qx, words, [(nx, nw)], hamming=0.25)
    qs = signatures(np.repeat(qx, 2, axis=0), words.reshape(-1), book.centroids)
    ns = signatures(nx, nw, book.centroids)
    keep = sorted({f for i in range(80) for f in range(50) if words.reshape(-1)[i] == nw[f]
                   and np.unpackbits(qs[i] ^ ns[f]).sum() <= 2})
    assert added.tolist() == [len(keep)]
    # the same sums by brute force: residuals per word of the query (2 words each) and the kept neighbours
    sums = {}
    for x, ws in [(qx[i], words[i]) for i in range(40)] + [(nx[f], [nw[f]]) for f in keep]:
        for w in ws:
            sums[w] = sums.get(w, 0) + (x.astype(np.float64) - book.centroids[w])
    ws = sorted(w for w in sums if np.linalg.norm(sums[w]) > 1e-6)
    assert rec.words.tolist() == ws
    np.testing.assert_allclose(rec.descriptors, [sums[w] / np.linalg.norm(sums[w]) for w in ws], atol=1e-6)


def test_reliable_neighbours_rule():
    ids, scores = [5, 6, 7, 8], [4.0, 3.0, 2.0, 1.0]
    assert reliable_neighbours(ids, scores, None, 2, 10, exclude=[5]) == [(6, 3.0), (7, 2.0)]
    inl = {5: 40, 6: 3, 7: 12, 8: 40}
    assert [i for i, _ in reliable_neighbours(ids, scores, inl, 5, 10)] == [5, 8, 7]
    with pytest.raises(ValueError, match="qe.top"):
        ExpansionConfig(top=0).check()
    with pytest.raises(ValueError, match="qe.method"):
        ExpansionConfig(method="dqe").check()


# ---------------------------------------------------------------- per-query AP and comparison
def _tiny_gnd():
    e = np.zeros(0, np.int64)
    gnd = [QueryGroundTruth(np.array([0, 3]), np.array([5]), np.array([1])),
           QueryGroundTruth(np.array([2]), e, np.array([4])),
           QueryGroundTruth(e, e, e)]
    return GroundTruth([f"db{i}" for i in range(6)], ["q0", "q1", "q2"], gnd)


def test_per_query_ap_equals_compute_ap():
    from d2r.bench import per_query_ap

    g = _tiny_gnd()
    rows = [np.array([1, 0, 2, 3, 4, 5]), np.array([4, 0, 2, 1, 3, 5]), np.array([0, 1, 2, 3, 4, 5])]
    pq = per_query_ap({"initial": {"medium": rows, "hard": rows}}, g, False)
    # query 0, Medium: positives 0, 3, 5, junk 1 -> junk-free ranks 0, 2, 4
    assert pq["medium"]["initial"][0] == pytest.approx(100 * compute_ap([0, 2, 4], 3))
    # by hand: ((1 + 1) + (1/2 + 2/3) + (2/4 + 3/5)) / 2 / 3
    assert pq["medium"]["initial"][0] == pytest.approx(100 * (2 + 1 / 2 + 2 / 3 + 2 / 4 + 3 / 5) / 6)
    # query 1: positive 2 at junk-free rank 1 (junk 4 removed)
    assert pq["medium"]["initial"][1] == pytest.approx(100 * compute_ap([1], 1))
    assert pq["medium"]["initial"][2] is None
    # Hard, query 0: positive 5, junk 1, 0, 3 (junk + easy) -> junk-free rank 5 - 3 = 2
    assert pq["hard"]["initial"][0] == pytest.approx(100 * compute_ap([2], 1))
    assert pq["hard"]["initial"][1] is None


def test_paired_difference_and_compare(tmp_path):
    r = paired_difference([0, 50, 100, None], [10, 50, 90, 20], resamples=2000)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (1, 1, 1, 3)
    assert r["diff"] == pytest.approx(0.0) and -10 <= r["ci_low"] <= 0 <= r["ci_high"] <= 10
    const = paired_difference([1, 2, 3], [3, 4, 5])
    assert const["diff"] == const["ci_low"] == const["ci_high"] == pytest.approx(2.0)
    for name, m in (("a", [10, 20]), ("b", [30, 20])):
        (tmp_path / name).mkdir()
        pq = {"queries": ["x", "y"], "stages": ["initial"], "medium": {"initial": m}, "hard": {"initial": m}}
        (tmp_path / name / "metrics.json").write_text(json.dumps({"per_query": pq}))
    res = compare_runs(tmp_path / "a", tmp_path / "b")
    assert res["medium"]["diff"] == pytest.approx(10.0) and res["hard"]["wins"] == 1
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="no per-query AP"):
        compare_runs(tmp_path / "a", tmp_path / "c")


def test_bench_compare_cli(tmp_path, capsys):
    from d2r.cli import main

    for name, m in (("a", [10, 20]), ("b", [30, 20])):
        (tmp_path / name).mkdir()
        pq = {"queries": ["x", "y"], "stages": ["initial"], "medium": {"initial": m}, "hard": {"initial": m}}
        (tmp_path / name / "metrics.json").write_text(json.dumps({"per_query": pq}))
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["medium"]["diff"] == pytest.approx(10.0)
    assert main(["bench", "compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 1


def test_bench_compare_errors_and_flags(tmp_path, capsys):
    """`d2r bench compare`: --resamples 0 was "index -1 is out of bounds" (exit 1), a missing run a raw
    "[Errno 2] ..." and a non-JSON metrics file "Expecting value ..." without the file's name, none with the
    "error:" prefix; --quiet (README: every command takes it) was a usage error; its help showed "95%%"."""
    run = tmp_path / "run"
    run.mkdir()
    per_query = {"queries": ["q0", "q1"], "stages": ["initial"], "easy": {"initial": [0.5, 1.0]},
                 "medium": {"initial": [0.5, 1.0]}, "hard": {"initial": [0.0, 0.25]}}
    (run / "metrics.json").write_text(json.dumps({"per_query": per_query}))
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    code, _, err = run_cli(capsys, "bench", "compare", run, run, "--resamples", 0)
    assert code == 2 and err.strip() == "d2r bench compare: error: --resamples must be at least 1, got 0"
    code, _, err = run_cli(capsys, "bench", "compare", run, tmp_path / "nope")
    assert code == 1 and err.startswith(f"d2r bench compare: error: {tmp_path / 'nope'}: ") and "Errno" not in err
    code, _, err = run_cli(capsys, "bench", "compare", run, bad)
    assert code == 1 and err.startswith(f"d2r bench compare: error: {bad}: not a metrics JSON"), err
    code, out, err = run_cli(capsys, "bench", "compare", run, run, "--quiet", "--resamples", 10)
    assert code == 0 and "medium" in out and not err, err
    code, out, _ = run_cli(capsys, "bench", "compare", "--help")
    assert code == 0 and "95% interval" in " ".join(out.split())


def test_ground_truth_json_and_compare_errors_name_the_file(tmp_path):
    """A ground truth given as .json was refused by `load_gnd` (pickle or .mat only); `load_per_query` of a
    missing run or of a metrics.json that is not JSON raised a raw FileNotFoundError / JSONDecodeError
    naming no file; `paired_difference(resamples=0)` failed with an IndexError."""
    from d2r.eval.compare import load_per_query, paired_difference
    from d2r.eval.revisitop import load_gnd

    gnd = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
           "gnd": [{"easy": [1], "hard": [2], "junk": [0], "bbx": None}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    g = load_gnd(tmp_path / "gnd.json")
    assert g.imlist == ["a", "b", "c"] and list(g.gnd[0].easy) == [1] and list(g.gnd[0].hard) == [2]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        load_gnd(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="missing.*not found"):
        load_per_query(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("not json")
    with pytest.raises(ValueError, match="metrics.json"):
        load_per_query(tmp_path / "run")
    with pytest.raises(ValueError, match="resamples"):
        paired_difference([1.0, 2.0], [2.0, 3.0], resamples=0)


def test_bench_flags_reach_the_config():
    import argparse

    from d2r.cli import bench as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", "revisitop", "--gnd", "g.pkl", "--images-root", "r", "--out", "o",
                              "--query-expansion", "hqe", "--qe-top", "5", "--query-num-assignments", "3",
                              "--rerank-method", "official", "--min-inliers", "12"])
    c = cli.config_from_args(args)
    assert (c.qe.method, c.qe.top, c.index.query_num_assignments) == ("hqe", 5, 3)
    assert (c.rerank.method, c.rerank.min_inliers) == ("official", 12)


# ---------------------------------------------------------------- report page in headless Chromium
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    from d2r.bench.report import write_revisitop_report

    g = _tiny_gnd()
    root = tmp_path / "images"
    root.mkdir()
    for i, name in enumerate(g.imlist + g.qimlist):
        Image.new("RGB", (64 + 8 * i, 48), (40 * i % 255, 90, 160)).save(root / f"{name}.jpg")
    rows = [np.array([1, 0, 2, 3, 4, 5]), np.array([4, 0, 2, 1, 3, 5]), np.array([0, 1, 2, 3, 4, 5])]
    stages = {"initial": {p: rows for p in ("easy", "medium", "hard")},
              "verified": {p: rows[::-1] for p in ("easy", "medium", "hard")}}
    from d2r.bench import per_query_ap

    result = {"per_query": per_query_ap(stages, g, False), "timing": {"seconds_per_query": 0.1},
              "stages": {s: {"medium": {"mAP": 50.0, "mP@10": 10.0}} for s in stages}}
    out = tmp_path / "run"
    page = write_revisitop_report(out, result, g, stages, root, False)
    html = page.read_text()
    assert "data:image" not in html  # thumbnails are files, not inline copies
    chrome = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--enable-logging=stderr", "--v=0"]
    shot = tmp_path / "shot.png"
    r = subprocess.run([chrome, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 1000, r.stderr[-2000:]
    assert "Uncaught" not in r.stderr and "ERR_FILE_NOT_FOUND" not in r.stderr, r.stderr[-2000:]
    dom = subprocess.run([chrome, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    srcs = re.findall(r"<img[^>]*src=\"([^\"]+)\"", dom.stdout)
    assert len(srcs) >= 1 + 3 * 2 * 6  # the queries' images and the top lists of both stages
    for s in srcs:
        assert (out / s).is_file(), s
        with Image.open(out / s) as im:
            assert im.format == "JPEG" and max(im.size) <= 160
    assert "console" not in r.stderr.lower() or "error" not in r.stderr.lower(), r.stderr[-2000:]


# ---------------------------------------------------------------- engine: expansion in both database modes
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["aggregation", "search"])
def test_engine_search_with_expansion_and_query_assignments(bench_dev, tmp_path, mode):
    from d2r.engine import Engine
    from d2r.engine.config import EngineConfig

    images = bench_dev / "images"
    paths = sorted((images / "sacre_coeur").iterdir()) + sorted((images / "dis_cbsd68").iterdir())[:6]
    cfg = EngineConfig.from_dict({"features": {"options": {"max_features": 300}},
                                  "codebook": {"size": 128, "iterations": 3},
                                  "regions": {"proposer": "density" if mode == "search" else "none"},
                                  "index": {"mode": mode}, "rerank": {"num_to_rerank": 10}, "batch_size": 8})
    engine = Engine.create(tmp_path / "eng", cfg)
    engine.index([str(p) for p in paths], progress=False)
    query = paths[1]
    plain = engine.search(query, top_k=5, query_expansion="none")
    for qe in ("aqe", "hqe"):
        hits = engine.search(query, top_k=5, query_expansion=qe)
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert sum("sacre_coeur" in h.path for h in hits) >= sum("sacre_coeur" in h.path for h in plain) - 1
        assert hits[0].inliers >= 10  # verified images stay on top
    ma = engine.search(query, top_k=5, rerank=False, query_num_assignments=3)
    assert len(ma) == 5 and ma[0].inliers == -1
    with pytest.raises(ValueError, match="query_expansion"):
        engine.search(query, query_expansion="dqe")
