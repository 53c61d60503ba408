"""What the experiments share: reading a ``d2r bench revisitop`` run of the retrieval stage, and comparing two
rankings of its queries (mAP and the paired bootstrap interval of the per-query AP difference)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from d2r.eval.compare import paired_difference
from d2r.eval.revisitop import load_gnd, per_query_metrics
from d2r.index.database import Database


def open_run(run_dir, gnd_path):
    """(ground truth, the run's Database) of a run whose queries are database images and whose final stage is
    the initial search (no verification, no expansion); SystemExit naming the folder otherwise."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ran = metrics.get("ran", {})
    if not metrics["dataset"]["query_in_database"]:
        raise SystemExit(f"{run_dir}: the queries are not database images (this experiment needs them to be)")
    if ran.get("verification", "off") != "off" or ran.get("expansion", "none") != "none":
        raise SystemExit(f"{run_dir}: the run verified or expanded; rerun with rerank.enabled=false, qe.method=none")
    return load_gnd(gnd_path), Database.open(run_dir / "index")


def compare(g, before, after) -> dict:
    """Medium and Hard: mAP of both rankings (lists of database positions, best first) and their paired
    difference (after − before), in percent."""
    out = {}
    for p in ("medium", "hard"):
        pos, junk = g.protocol(p, query_in_database=True)
        a = per_query_metrics(before, pos, junk, g.num_db)["ap"] * 100
        b = per_query_metrics(after, pos, junk, g.num_db)["ap"] * 100
        out[p] = {"mAP_before": float(np.nanmean(a)), "mAP_after": float(np.nanmean(b)),
                  "difference": paired_difference(a, b)}
    return out
