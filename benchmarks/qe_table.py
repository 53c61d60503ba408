"""The verification / query-expansion rows of benchmarks/results/dev_results.md from finished runs.

Each row: Medium / Hard mAP of the run's final stage, the paired per-query difference to the baseline run with
its bootstrap 95% interval (``d2r bench compare``), and seconds per query (search + verification + expansion).

    PYTHONPATH=. python benchmarks/qe_table.py runs/qe BASELINE_RUN RUN ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from d2r.eval.compare import compare_runs


def main(argv):
    root = Path(argv[0])
    base, runs = argv[1], argv[2:]
    print("| run | Medium | Hard | Δ Medium [95% CI] | Δ Hard [95% CI] | W/L Medium | W/L Hard | s/query |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in [base, *runs]:
        m = json.loads((root / name / "metrics.json").read_text())
        c = compare_runs(root / base, root / name, stage_a="initial")
        med, hard = c["medium"], c["hard"]
        print(f"| {name} | {m['medium']['mAP']:.2f} | {m['hard']['mAP']:.2f} | "
              f"{med['diff']:+.2f} [{med['ci_low']:+.2f}, {med['ci_high']:+.2f}] | "
              f"{hard['diff']:+.2f} [{hard['ci_low']:+.2f}, {hard['ci_high']:+.2f}] | "
              f"{med['wins']}/{med['losses']} | {hard['wins']}/{hard['losses']} | "
              f"{m['timing']['seconds_per_query']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
