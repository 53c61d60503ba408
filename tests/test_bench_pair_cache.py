"""Verified pairs are cached between benchmark runs: a run that differs only in the decision rule
(``min_inliers``), the number verified or expansion re-verifies nothing it shares with an earlier run, and
``benchmarks/calibrate_inliers.py`` reads a run's counts from that cache."""

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import calibrate_inliers
from d2r.bench.run import PairCounts, load_config, run_revisitop
from tests.corpus import CODEBOOK, textured


@pytest.fixture()
def data(tmp_path):
    """Five photos: b0 and b1 are two crops of one scene (they verify), the rest unrelated; queries b0, b1."""
    rng = np.random.default_rng(3)
    root = tmp_path / "photos"
    root.mkdir()
    scene = textured(rng, 200, 260)
    Image.fromarray(scene[:160, :200]).save(root / "b0.png")
    Image.fromarray(scene[24:184, 40:240]).save(root / "b1.png")
    for name in ("c0", "c1", "c2"):
        Image.fromarray(textured(rng, 160, 200)).save(root / f"{name}.png")
    gnd = {"imlist": ["b0", "b1", "c0", "c1", "c2"], "qimlist": ["b0", "b1"],
           "gnd": [{"easy": [1], "hard": [], "junk": []}, {"easy": [0], "hard": [], "junk": []}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    return tmp_path / "gnd.json", root


def _run(data, out, cache, **overrides):
    gnd, root = data
    config = load_config(None, {"codebook.path": str(CODEBOOK), "features.options.max_features": 300,
                                "rerank.enabled": True, "rerank.num_to_rerank": 4, "qe.method": "none",
                                "workers": 1, **overrides})
    return run_revisitop(gnd, root, config, out, cache, progress=False, write_report=False)


def _counts(run):
    return PairCounts(json.loads((run / "metrics.json").read_text())["notes"]["pair_counts"]).pairs


def test_a_run_that_changes_only_the_rule_verifies_nothing_again(data, tmp_path):
    first = _run(data, tmp_path / "a", tmp_path / "cache")
    assert first["notes"]["pairs_verified"] == 2 * 4  # 4 candidates per query, the query itself is junk
    path = first["notes"]["pair_counts"]
    cached = PairCounts(path).pairs
    assert set(cached) == {"b0", "b1"} and all(len(row) == 4 for row in cached.values())
    assert cached["b0"]["b1"] >= 20 and max(cached["b0"][n] for n in ("c0", "c1", "c2")) < 20, cached

    again = _run(data, tmp_path / "b", tmp_path / "cache", **{"rerank.min_inliers": 1000, "rerank.num_to_rerank": 2})
    assert again["notes"]["pairs_verified"] == 0 and again["notes"]["pair_counts"] == path
    assert first["notes"]["pairs_reused"] == 0 and again["notes"]["pairs_reused"] == 2 * 3  # b0/b1 + Hard's
    # Without the cache the same run computes the same ranking.
    fresh = _run(data, tmp_path / "c", tmp_path / "cache2", **{"rerank.min_inliers": 1000,
                                                                 "rerank.num_to_rerank": 2})
    assert fresh["notes"]["pairs_verified"] > 0  # (the Hard protocol's candidates skip its junk: b1 for b0)
    assert np.array_equal(np.load(tmp_path / "b" / "ranks.npy"), np.load(tmp_path / "c" / "ranks.npy"))
    assert PairCounts(fresh["notes"]["pair_counts"]).pairs["b0"]["b1"] == cached["b0"]["b1"]


def test_other_matching_options_are_another_cache(data, tmp_path):
    first = _run(data, tmp_path / "a", tmp_path / "cache")
    other = _run(data, tmp_path / "b", tmp_path / "cache", **{"rerank.ratio": 0.7})
    assert other["notes"]["pair_counts"] != first["notes"]["pair_counts"]
    assert other["notes"]["pairs_verified"] == 2 * 4
    off = _run(data, tmp_path / "c", tmp_path / "cache", **{"rerank.enabled": False})
    assert "pair_counts" not in off["notes"] and off["notes"]["pairs_verified"] == 0


def test_a_damaged_pair_cache_is_recomputed_not_trusted(data, tmp_path, caplog):
    first = _run(data, tmp_path / "a", tmp_path / "cache")
    path = first["notes"]["pair_counts"]
    good = PairCounts(path).pairs
    with open(path, "w") as f:
        json.dump({"format": 1, "pairs": {"b0": {"b1": -5}}}, f)  # a negative count: not this cache
    again = _run(data, tmp_path / "b", tmp_path / "cache")
    assert again["notes"]["pairs_verified"] == 2 * 4 and "not a pair-count cache" in caplog.text
    assert PairCounts(path).pairs == good
    with open(path, "wb") as f:
        f.write(b"\x00garbage")
    _run(data, tmp_path / "c", tmp_path / "cache")
    assert PairCounts(path).pairs == good


def test_calibration_reads_the_run_counts_and_states_the_rule(data, tmp_path, capsys):
    _run(data, tmp_path / "a", tmp_path / "cache")
    gnd, _ = data
    out = tmp_path / "calibration.json"
    calibrate_inliers.main(["--run", str(tmp_path / "a"), "--gnd", str(gnd), "--top", "3", "--out", str(out)])
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs_verified_here"] == 0  # every pair came from the run's cache
    pairs = json.loads(out.read_text())["pairs"]
    assert len(pairs) == 2 * 3
    negatives = [n for _, _, group, n in pairs if group == "negative"]
    positives = [n for _, _, group, n in pairs if group == "easy"]
    assert len(negatives) == 4 and len(positives) == 2
    assert summary["min_inliers_by_rule"] == max(negatives) + 1
    assert summary["false_promotion_rate"][str(max(negatives) + 1)] == 0.0
    assert summary["easy_promoted"][str(max(negatives) + 1)] == 1.0
    # More candidates than the run verified: the missing pairs are verified here and added to the cache.
    _run(data, tmp_path / "b", tmp_path / "cache2", **{"rerank.num_to_rerank": 2})
    for expected in (2 * 4 - sum(map(len, _counts(tmp_path / "b").values())), 0):
        calibrate_inliers.main(["--run", str(tmp_path / "b"), "--gnd", str(gnd), "--top", "4"])
        assert json.loads(capsys.readouterr().out)["pairs_verified_here"] == expected
