"""`d2r demo` runs offline end to end and finds the instances."""

import json

import pytest

import d2r.cli
from tests.corpus import run_cli


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    code = d2r.cli.main(["demo", "--out", str(tmp_path / "demo"), "--json"])
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert code == 0 and not summary["failed"]
    assert summary["indexed"] == summary["database_images"] > 40
    # measured 10/10 and 0.93; a regression guard, not a target
    assert summary["top1_correct"] >= 8
    assert summary["mean_precision_at_3"] >= 0.75
    html = (tmp_path / "demo" / "summary.html").read_text()
    assert html.count("<figure") == summary["queries"] * 6
    assert (tmp_path / "demo" / "index" / "engine.json").is_file()


def test_demo_checks_its_flags_first(tmp_path, capsys):
    """`d2r demo --top-k 0` ran the whole demo and reported "0/10 queries have the right instance first"
    (exit 0); --out naming a file failed late with "[Errno 20] Not a directory: '.../images'"."""
    code, out, err = run_cli(capsys, "demo", "--top-k", 0, "--out", tmp_path / "demo", "--quiet")
    assert code == 2 and err.strip() == "d2r demo: error: --top-k must be at least 1, got 0" and not out
    assert not (tmp_path / "demo").exists()
    taken = tmp_path / "file"
    taken.write_text("x")
    code, _, err = run_cli(capsys, "demo", "--out", taken, "--quiet")
    assert code == 1 and err.strip() == f"d2r demo: error: --out {taken}: exists and is not a folder", err
