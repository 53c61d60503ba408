import numpy as np
import pytest

from d2r.eval import gldv2
from d2r.eval.gldv2 import evaluate, read_predictions, read_solution, write_predictions

SOLUTION = """id,images,Usage
q1,a b,Public
q2,c,Public
q3,d e f,Private
q4,g,Private
q5,zz,Ignored
"""


@pytest.fixture
def solution_csv(tmp_path):
    p = tmp_path / "retrieval_solution_v2.1.csv"
    p.write_text(SOLUTION)
    return p


def _pred(tmp_path, text, name="pred.csv"):
    p = tmp_path / name
    p.write_text("id,images\n" + text)
    return p


def test_read_solution(solution_csv):
    s = read_solution(solution_csv)
    assert s.public == {"q1": ["a", "b"], "q2": ["c"]}
    assert s.private == {"q3": ["d", "e", "f"], "q4": ["g"]}
    assert s.ignored == {"q5"}


def test_hand_computed_metrics(solution_csv, tmp_path):
    # q1: x a a b -> a at rank 2 (1/2), the repeated a takes rank 3 and earns nothing, b at rank 4 (2/4):
    #     AP = (1/2 + 2/4) / min(2, 100) = 0.5; q2 has no prediction -> 0; Public mAP = 25%.
    # q3: "d e f " (trailing space dropped) -> AP 1; q4: h g -> (1/2)/1 = 0.5; Private mAP = 75%.
    # q5 is ignored, whatever it predicts.
    p = _pred(tmp_path, "q1,x a a b\nq3,d e f \nq4,h g\nq5,nothing here\n\n")
    res = evaluate(p, solution_csv)
    pub, priv = res["public"], res["private"]
    assert pub["mAP@100"] == pytest.approx(25.0)
    assert priv["mAP@100"] == pytest.approx(75.0)
    # precisions: q1 hits at ranks 2 and 4 -> P@1 0, P@5 2/5, P@10 2/10, P@50 2/50, P@100 2/100; q2 all 0
    assert [pub[f"mP@{k}"] for k in (1, 5, 10, 50, 100)] == pytest.approx([0.0, 20.0, 10.0, 2.0, 1.0])
    # q3 P@1 1, P@5 3/5; q4 P@1 0, P@5 1/5
    assert priv["mP@1"] == pytest.approx(50.0) and priv["mP@5"] == pytest.approx(100 * (3 / 5 + 1 / 5) / 2)
    # first correct position: q1 2, q2 none -> 101
    assert pub["mean_position"] == pytest.approx(51.5) and pub["median_position"] == pytest.approx(51.5)
    assert pub["num_queries"] == 2 and priv["num_queries"] == 2


def test_duplicates_take_a_rank_but_earn_nothing():
    assert gldv2.average_precision(["a", "a", "b"], ["a", "b"]) == pytest.approx((1 + 2 / 3) / 2)
    assert gldv2.average_precision(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    p = gldv2.precisions(["a", "a", "b"], ["a", "b"], max_predictions=3)
    assert p.tolist() == pytest.approx([1.0, 0.5, 2 / 3])


def test_gldv2_average_precision_hand_made():
    """AP by hand; a query without relevant images raised ZeroDivisionError."""
    from d2r.eval.gldv2 import average_precision

    assert average_precision(["a", "x", "b"], ["a", "b"]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(["x", "a", "a"], ["a"]) == pytest.approx(0.5)  # a repeat earns nothing
    assert average_precision(["a"], []) == 0.0


def test_missing_predictions_score_zero_and_count_in_q(solution_csv):
    res = evaluate({"q1": ["a", "b"]}, solution_csv)
    assert res["public"]["mAP@100"] == pytest.approx(50.0)  # (1 + 0) / 2
    assert res["private"]["mAP@100"] == 0.0 and res["private"]["num_queries"] == 2
    assert res["private"]["mean_position"] == 101.0


def test_only_the_first_100_predictions_count_and_denominator_is_capped():
    rel = [f"r{i}" for i in range(150)]
    assert gldv2.average_precision(rel[:100], rel) == pytest.approx(1.0)  # min(150, 100) = 100
    late = [f"x{i}" for i in range(100)] + ["r0"]
    assert gldv2.average_precision(late, rel) == 0.0
    assert gldv2.first_position(late, rel) == 101
    assert gldv2.precisions(late, rel)[-1] == 0.0


def test_ignored_queries_are_skipped(solution_csv, tmp_path):
    # an ignored id may appear twice and predict anything; it never enters a split
    p = _pred(tmp_path, "q5,a\nq5,b\nq1,a b\n")
    pub, priv = read_predictions(p, read_solution(solution_csv))
    assert pub == {"q1": ["a", "b"]} and priv == {}


def test_reader_errors(solution_csv, tmp_path):
    s = read_solution(solution_csv)
    with pytest.raises(ValueError, match="repeated"):
        read_predictions(_pred(tmp_path, "q1,a\nq1,b\n"), s)
    with pytest.raises(ValueError, match="not in the solution"):
        read_predictions(_pred(tmp_path, "qx,a\n", "unknown.csv"), s)
    # an empty prediction is simply no prediction, whatever the id (the official reader does not check it)
    assert read_predictions(_pred(tmp_path, "qx,\nq2,\n", "empty.csv"), s) == ({}, {})
    bad = tmp_path / "bad_solution.csv"
    bad.write_text("id,images,Usage\nq1,a,Secret\n")
    with pytest.raises(ValueError, match="bad_solution.csv.*Usage"):
        read_solution(bad)
    with pytest.raises(ValueError, match="not in the solution"):
        evaluate({"nope": ["a"]}, s)


def test_write_predictions_roundtrip(solution_csv, tmp_path):
    out = tmp_path / "sub" / "predictions.csv"
    ids = ["q1", "q2", "q3"]
    rankings = [["x", "a", "b"], np.array(["c"]), [f"i{k}" for k in range(150)]]
    write_predictions(out, ids, rankings)
    lines = out.read_text().splitlines()
    assert lines[0] == "id,images" and lines[1] == "q1,x a b" and len(lines[3].split(",")[1].split(" ")) == 100
    from_file = evaluate(out, solution_csv)
    from_dict = evaluate({"q1": ["x", "a", "b"], "q2": ["c"], "q3": [f"i{k}" for k in range(100)]}, solution_csv)
    assert from_file == from_dict
    assert not list(out.parent.glob(".*tmp"))  # atomic write left no temporary file
    with pytest.raises(ValueError, match="comma"):
        write_predictions(out, ["q1"], [["a,b"]])
    with pytest.raises(ValueError, match="2 ids but 1"):
        write_predictions(out, ["q1", "q2"], [["a"]])


def test_random_predictions_match_a_direct_formula(rng):
    # mAP@100 = (1/Q) Σ_q (1/min(m_q,100)) Σ_k P_q(k) rel_q(k) with duplicates never relevant twice
    pool = [f"i{k}" for k in range(60)]
    sol, preds = {}, {}
    for q in range(30):
        sol[f"q{q}"] = list(rng.choice(pool, rng.integers(1, 8), replace=False))
        if q % 4:
            preds[f"q{q}"] = list(rng.choice(pool, rng.integers(0, 40), replace=True))
    want = 0.0
    for key, rel in sol.items():
        pred = preds.get(key, [])[:100]
        first = [pred.index(p) == i for i, p in enumerate(pred)]
        hits = np.array([p in rel and f for p, f in zip(pred, first)], float)
        prec = np.cumsum(hits) / np.arange(1, len(pred) + 1) if len(pred) else np.zeros(0)
        want += float((prec * hits).sum()) / min(len(rel), 100)
    got = gldv2.split_metrics(preds, sol)
    assert got["mAP@100"] == pytest.approx(100 * want / len(sol))
