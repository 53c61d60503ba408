"""`d2r demo` runs offline end to end and finds the instances."""

import json

import pytest

import d2r.cli


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
