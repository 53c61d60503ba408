"""Wall time of ``d2r search`` in fresh processes (cold start: imports, index open, query, re-ranking).

    python benchmarks/bench_search_cli.py --index DIR --runs 5 IMAGE [IMAGE ...] [--no-rerank]

Runs ``d2r search IMAGE --index DIR --json`` ``--runs`` times per image, each in a new Python process, and prints
the wall time of every run; the first run of a fresh install also fills numba's cache (compilation), later runs
load from it. Also prints the time spent inside the query as reported by the command itself, the process's CPU
time (user + sys, from ``resource.getrusage(RUSAGE_CHILDREN)``) and the 1-minute load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    walls, inner, cpus = [], [], []
    for image in args.images:
        for run in range(args.runs):
            cmd = [sys.executable, "-m", "d2r", "search", image, "--index", args.index, "--json", "--quiet"]
            if args.no_rerank:
                cmd.append("--no-rerank")
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode:
                raise SystemExit(f"{image}: d2r search failed: {proc.stderr.strip()[-500:]}")
            out = proc.stdout
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            seconds = json.loads(out.splitlines()[-1])["seconds"]
            print(f"{image}  run {run + 1}: wall {wall:.3f} s, cpu {cpu:.3f} s (query itself {seconds:.3f} s), "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            if run:
                walls.append(wall)
                inner.append(seconds)
                cpus.append(cpu)
    if walls:
        print(f"second run onward: wall median {np.median(walls):.3f} s, max {np.max(walls):.3f} s; "
              f"cpu median {np.median(cpus):.3f} s; query itself median {np.median(inner):.3f} s "
              f"({len(walls)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
