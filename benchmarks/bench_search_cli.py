"""Wall time of ``d2r search`` in fresh processes (cold start: imports, index open, query, re-ranking).

    python benchmarks/bench_search_cli.py --index DIR --runs 5 IMAGE [IMAGE ...] [--no-rerank]
    python benchmarks/bench_search_cli.py --index DIR --runs 5 --tree OLD_SRC --tree . IMAGE [IMAGE ...]

Runs ``d2r search IMAGE --index DIR --json`` ``--runs`` times per image, each in a new Python process, and
prints the wall time of every run; the first run of a fresh install also fills numba's cache (compilation),
later runs load from it. Also prints the time spent inside the query as reported by the command itself, the
process's CPU time (user + sys, from ``resource.getrusage(RUSAGE_CHILDREN)``) and the 1-minute load average
(the machine may be shared). ``--tree`` (repeated) compares source trees (each put first on PYTHONPATH; e.g. a
``git archive`` of an older commit): their runs are interleaved, so a shared machine's load affects them
alike; the first round is a warm-up.
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


def _run(image, args, tree):
    """One fresh ``d2r search`` process: (wall s, cpu s, seconds the command reports for the query)."""
    cmd = [sys.executable, "-m", "d2r", "search", os.path.abspath(image), "--index", os.path.abspath(args.index),
           "--json", "--quiet"]
    if args.no_rerank:
        cmd.append("--no-rerank")
    env = cwd = None
    if tree is not None:  # ``python -m`` puts the working directory first on sys.path: run in the tree
        cwd = os.path.abspath(tree)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([cwd, os.environ.get("PYTHONPATH", "")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{image}: d2r search failed: {proc.stderr.strip()[-500:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, json.loads(proc.stdout.splitlines()[-1])["seconds"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--index", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--tree", dest="trees", action="append", metavar="SRC",
                   help="a source tree to compare (repeat it; runs are interleaved)")
    args = p.parse_args(argv)
    trees = args.trees or [None]
    stats = {tree: ([], [], []) for tree in trees}
    loads = []
    for image in args.images:
        for run in range(args.runs):
            for tree in trees:
                wall, cpu, seconds = _run(image, args, tree)
                loads.append(os.getloadavg()[0])
                label = f"[{tree}] " if tree is not None else ""
                print(f"{label}{image}  run {run + 1}: wall {wall:.3f} s, cpu {cpu:.3f} s (query itself "
                      f"{seconds:.3f} s), load {loads[-1]:.2f}", flush=True)
                if run:
                    for values, v in zip(stats[tree], (wall, cpu, seconds)):
                        values.append(v)
    for tree, (walls, cpus, inner) in stats.items():
        if walls:
            label = f"[{tree}] " if tree is not None else ""
            print(f"{label}second run onward: wall median {np.median(walls):.3f} s, "
                  f"min {np.min(walls):.3f} s, max {np.max(walls):.3f} s; "
                  f"cpu median {np.median(cpus):.3f} s; query itself median "
                  f"{np.median(inner):.3f} s ({len(walls)} runs)")
    print(f"load average {min(loads):.2f}-{max(loads):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
