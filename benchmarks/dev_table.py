"""Print the dev-data results table from the run folders of ``benchmarks/run_dev_table.sh``.

    PYTHONPATH=. python benchmarks/dev_table.py runs/dev [--json]

One row per run folder holding a ``metrics.json`` (``d2r bench revisitop`` output): configuration, codebook size,
Medium / Hard mAP before and after geometric verification, index items and bytes, and times.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def describe(m: dict) -> dict:
    """One table row from a ``metrics.json`` dict."""
    c = m["config"]
    proposer = c["regions"]["proposer"]
    mode = c["index"]["mode"]
    if proposer == "none":
        method = "ASMK* (whole image)" if c["index"]["kernel"] == "asmk_star" else c["index"]["kernel"]
    elif mode == "aggregation":
        method = f"R-ASMK* {proposer}"
    else:
        method = f"regional search {proposer}"
    if proposer != "none" and not c["regions"]["reextract"]:
        method += " (assigned)"
    before = m.get("before_rerank", m)
    gv = "before_rerank" in m
    t = m["timing"]
    return {
        "method": method, "k": m["index"]["codebook"]["k"],
        "medium": before["medium"]["mAP"], "hard": before["hard"]["mAP"],
        "medium_gv": m["medium"]["mAP"] if gv else None, "hard_gv": m["hard"]["mAP"] if gv else None,
        "gv_distance": c["rerank"]["descriptor_distance"] if gv else None,
        "items": m["index"]["counts"]["items"], "index_mb": m["index"]["bytes"] / 2**20,
        "index_s": t.get("index"), "search_ms": t.get("search_ms_per_query"),
        "rerank_s_per_query": (t["rerank"] / m["dataset"]["num_queries"]) if "rerank" in t else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for path in sorted(args.runs.glob("*/metrics.json")):
        row = describe(json.loads(path.read_text()))
        row["run"] = path.parent.name
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0

    def f(v, fmt="{:.2f}"):
        return "–" if v is None else fmt.format(v)

    print("| run | method | K | Medium | Hard | Medium +GV | Hard +GV | GV dist | items | index MB | index s "
          "| search ms/q | GV s/q |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['method']} | {r['k']} | {f(r['medium'])} | {f(r['hard'])} | {f(r['medium_gv'])} "
              f"| {f(r['hard_gv'])} | {f(r['gv_distance'], '{}')} | {r['items']} | {f(r['index_mb'])} "
              f"| {f(r['index_s'], '{:.1f}')} | {f(r['search_ms'], '{:.1f}')} | {f(r['rerank_s_per_query'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
