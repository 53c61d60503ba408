"""The experiments of benchmarks/experiments/ (methods that lost on the dev table, kept on the public API) run
on a real `d2r bench revisitop` run: their "before" ranking is the run's own (same mAP), and they return a
defined comparison."""

import json

import pytest

from benchmarks.experiments import dba, diffusion
from d2r.cli import main


@pytest.mark.slow
@pytest.mark.dev
def test_dba_and_diffusion_run_on_a_bench_run_and_start_from_its_ranking(bench_dev, tmp_path):
    out = tmp_path / "run"
    argv = ["bench", "revisitop", "--gnd", str(bench_dev / "gnd.pkl"), "--images-root", str(bench_dev),
            "--features", "rootsift", "--max-features", "300", "--codebook-size", "256", "--codebook-sample", "50",
            "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet", "--no-report",
            "--set", "rerank.enabled=false", "--set", "qe.method=none"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for result in (diffusion.run(out, bench_dev / "gnd.pkl", diffusion.DiffusionConfig()),
                   dba.run(out, bench_dev / "gnd.pkl", top=1)):
        for p in ("medium", "hard"):
            assert result[p]["mAP_before"] == pytest.approx(metrics[p]["mAP"], abs=1e-9)
            d = result[p]["difference"]
            assert d["n"] == metrics[p]["num_queries"] and d["ci_low"] <= d["diff"] <= d["ci_high"]


def test_an_experiment_refuses_a_run_that_verified(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"dataset": {"query_in_database": True},
                                                       "ran": {"verification": "usac, top 100"}}))
    with pytest.raises(SystemExit, match="rerank.enabled=false"):
        dba.run(tmp_path, tmp_path / "gnd.pkl")
