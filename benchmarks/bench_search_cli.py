"""Wall time of ``d2r search`` in fresh processes (cold start: imports, index open, query, re-ranking).

    python benchmarks/bench_search_cli.py --index DIR --runs 5 IMAGE [IMAGE ...] [--no-rerank]

Runs ``d2r search IMAGE --index DIR --json`` ``--runs`` times per image, each in a new Python process, and prints
the wall time of every run; the first run of a fresh install also fills numba's cache (compilation), later runs
load from it. Also prints the time spent inside the query as reported by the command itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--index", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-rerank", action="store_true")
    args = p.parse_args(argv)
    walls, inner = [], []
    for image in args.images:
        for run in range(args.runs):
            cmd = [sys.executable, "-m", "d2r", "search", image, "--index", args.index, "--json", "--quiet"]
            if args.no_rerank:
                cmd.append("--no-rerank")
            t = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            wall = time.perf_counter() - t
            seconds = json.loads(out.splitlines()[-1])["seconds"]
            print(f"{image}  run {run + 1}: wall {wall:.3f} s (query itself {seconds:.3f} s)", flush=True)
            (walls if run else []).append(wall)
            (inner if run else []).append(seconds)
    if walls:
        print(f"second run onward: wall median {np.median(walls):.3f} s, max {np.max(walls):.3f} s; "
              f"query itself median {np.median(inner):.3f} s ({len(walls)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
