"""``python -m benchmarks.run``: a results table is data (rows of config overrides), each row one real
``d2r bench revisitop`` run; the results record commit, command, machine and date; finished rows are not run
again; hand-written notes survive a regeneration."""

import json
import pickle

import numpy as np
import pytest
import yaml
from PIL import Image

from benchmarks import run as runner


@pytest.fixture
def tiny_revisitop(tmp_path, bundled_photos):
    """Five bundled photos and a shifted, rescaled copy of each as the database; the copies are the queries'
    positives (queries are the originals, not in the database)."""
    root = tmp_path / "data"
    (root / "db").mkdir(parents=True)
    (root / "q").mkdir()
    imlist, qimlist, gnd = [], [], []
    for i, (name, pixels) in enumerate(sorted(bundled_photos.items())):
        Image.fromarray(pixels).save(root / "q" / f"{name}.png")
        h, w = pixels.shape[:2]
        copy = Image.fromarray(pixels[h // 10:, w // 10:]).resize((int(w * 0.8), int(h * 0.8)))
        copy.save(root / "db" / f"{name}.png")
        imlist.append(f"db/{name}")
        qimlist.append(f"q/{name}")
        gnd.append({"easy": [i], "hard": [], "junk": [], "bbx": None})
    (root / "gnd.pkl").write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return root


def _table(tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "base.yaml").write_text(yaml.safe_dump({
        "features": {"name": "rootsift", "options": {"max_features": 200}},
        "codebook": {"size": 32, "iterations": 2, "sample_per_image": 100},
        "index": {"kernel": "asmk_star"}, "qe": {"method": "none"}, "workers": 1}))
    (tables / "tiny.yaml").write_text(yaml.safe_dump({
        "title": "tiny", "description": "two rows", "config": "base.yaml", "baseline": "plain",
        "baseline_stage": "initial",
        "rows": {"plain": {"set": {"rerank.enabled": False}},
                 "verified": {"set": {"rerank.enabled": True, "rerank.method": "usac"}, "note": "GV"}}}))
    return tables


@pytest.mark.slow
def test_a_table_runs_its_rows_and_records_what_ran(tmp_path, tiny_revisitop, capsys):
    tables, results = _table(tmp_path), tmp_path / "results"
    results.mkdir()
    (results / "tiny.md").write_text("old table\n\n## Notes\nwritten by hand\n")
    argv = ["tiny", "--data", str(tiny_revisitop), "--runs", str(tmp_path / "runs"), "--tables", str(tables),
            "--results", str(results)]
    assert runner.main(argv) == 0
    md = (results / "tiny.md").read_text()
    assert "| plain |" in md and "| verified |" in md and "`rerank.method=usac`" in md
    assert md.rstrip().endswith("## Notes\nwritten by hand") and "old table" not in md
    out = json.loads((results / "tiny.json").read_text())
    assert {"commit", "dirty", "command", "machine", "date"} <= set(out["header"])
    rows = {r["row"]: r for r in out["rows"]}
    assert rows["verified"]["config"]["rerank"]["method"] == "usac"
    assert rows["plain"]["config"]["rerank"]["enabled"] is False
    assert rows["verified"]["command"].startswith("python -m d2r bench revisitop ")
    assert rows["plain"]["compare"]["medium"]["diff"] == 0.0  # the baseline against itself
    for r in rows.values():
        assert 0.0 <= r["medium"] <= 100.0
        # the tiny ground truth has no Hard positives: revisitop reports NaN there (None once serialised)
        assert r["hard"] is None or np.isnan(r["hard"]) or 0.0 <= r["hard"] <= 100.0
    # a second call runs nothing again
    capsys.readouterr()
    assert runner.main(argv) == 0
    assert capsys.readouterr().out.count("done before, kept") == 2
    # stages: true renders a line per stage, each compared with the baseline's stage
    spec = yaml.safe_load((tables / "tiny.yaml").read_text())
    (tables / "tiny.yaml").write_text(yaml.safe_dump({**spec, "stages": True}))
    assert runner.main([*argv, "--render-only"]) == 0
    md = (results / "tiny.md").read_text()
    assert "| verified (initial) |" in md and "| verified (verified) |" in md and "| plain (initial) |" in md
    rows = {r["row"]: r for r in json.loads((results / "tiny.json").read_text())["rows"]}
    assert set(rows["verified"]["compare_stages"]) == {"initial", "verified"}
    assert rows["verified"]["compare_stages"]["initial"]["medium"]["diff"] == 0.0  # the same search


def test_a_bad_table_is_one_line_naming_the_file(tmp_path, capsys):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "bad.yaml").write_text("rows: {a: {sett: {x: 1}}}\nconfig: nope.yaml\n")
    assert runner.main(["bad", "--tables", str(tables)]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.yaml" in err and "row 'a'" in err and len(err.splitlines()) == 1
    assert runner.main(["missing", "--tables", str(tables)]) == 2
    assert "no such table" in capsys.readouterr().err


def test_the_shipped_tables_are_valid():
    for path in runner.TABLES.glob("*.yaml"):
        table = runner.load_table(path.stem)
        for row in table["rows"]:
            cmd = runner.row_command(table, row, runner.REPO / "data", runner.REPO / "runs")
            assert cmd[3:5] == ["bench", "revisitop"] and "--config" in cmd
