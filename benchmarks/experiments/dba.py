"""Experiment: database-side augmentation, DBA (Arandjelović & Zisserman 2012; with αQE weights, Gordo et al. 2017),
on the aggregated records of a ``d2r bench revisitop`` run's index.

It was an index-time library option until it lost on the dev table (Medium -15.8): it lives here, on the public
API, for whoever wants to try it on other data. Offline, every database image's record is replaced by the αQE
average (:func:`d2r.query.expand.average_expansion`, weights :func:`~d2r.query.expand.aqe_weights`) of itself and
its ``top`` nearest database images (by the index's similarity, itself left out); the queries keep their own
records and search the augmented database.

    d2r bench revisitop --gnd GND --images-root ROOT --config C.yaml --out runs/base \\
        --set rerank.enabled=false --set qe.method=none
    PYTHONPATH=. python -m benchmarks.experiments.dba runs/base --gnd GND [--top 1 --alpha 3]

Prints Medium / Hard mAP before and after and the paired interval of the per-query AP difference (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.experiments._common import compare, open_run
from d2r.index.database import Database
from d2r.query.expand import aqe_weights, average_expansion


def augmented(db: Database, names, top: int, alpha: float) -> Database:
    """An in-memory database with the same codebook and settings holding each image's DBA record."""
    c = db.config
    out = Database.create(None, db.codebook, kernel=c.kernel, mode=c.mode, alpha=c.alpha, tau=c.tau,
                          tau_inclusive=c.tau_inclusive, normalize=c.normalize, num_assignments=c.num_assignments,
                          query_num_assignments=c.query_num_assignments, idf=c.idf)
    for name in names:
        record = db.record(name)
        near = [i for i in db.search(record, top_k=top + 1).ids.tolist() if i != name][:top]
        records = [db.record(i) for i in near]
        out.add_aggregated(name, average_expansion(record, records, aqe_weights(record, records, alpha,
                                                                                c.normalize)))
    return out


def run(run_dir, gnd_path, top: int = 1, alpha: float = 3.0) -> dict:
    g, db = open_run(run_dir, gnd_path)
    names = [n for n in g.imlist if n in db]
    dba = augmented(db, names, top, alpha)
    at = {n: i for i, n in enumerate(g.imlist)}
    before, after = [], []
    for qname in g.qimlist:
        q = db.record(qname)
        before.append(np.array([at[i] for i in db.search(q, top_k=len(names)).ids.tolist()], np.int64))
        after.append(np.array([at[i] for i in dba.search(q, top_k=len(names)).ids.tolist()], np.int64))
    return {"run": str(run_dir), "top": top, "alpha": alpha, "queries": len(g.qimlist),
            **compare(g, before, after)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="DBA over the index of a d2r bench revisitop run.")
    ap.add_argument("run", help="the run folder (metrics.json, index/)")
    ap.add_argument("--gnd", required=True, help="the ground truth the run used")
    ap.add_argument("--top", type=int, default=1, help="neighbours averaged into each database record")
    ap.add_argument("--alpha", type=float, default=3.0, help="αQE exponent of the neighbour weights")
    args = ap.parse_args(argv)
    if args.top < 1 or args.alpha < 0:
        ap.error("--top must be >= 1 and --alpha >= 0")
    print(json.dumps(run(args.run, args.gnd, args.top, args.alpha), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
