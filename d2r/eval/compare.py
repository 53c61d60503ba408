"""Paired comparison of two revisitop runs query by query (``d2r bench compare RUN_A RUN_B``).

Both runs' ``metrics.json`` carry ``per_query`` AP (percent) per protocol and stage. For Medium and Hard the
difference d_q = AP_B(q) − AP_A(q) over the queries with positives in both is summarised by its mean, a
percentile-bootstrap 95% interval of the mean (queries resampled with replacement, ``resamples`` times, fixed
seed) and the counts of wins (d > 0), losses (d < 0) and ties.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PROTOCOLS = ("medium", "hard")


def load_per_query(run) -> dict:
    """The ``per_query`` block of a run folder (or a metrics.json path). ValueError names the file when absent."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (a run folder of 'd2r bench revisitop' or its metrics.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a metrics JSON file ({e})") from None
    pq = data.get("per_query") if isinstance(data, dict) else None
    if not isinstance(pq, dict) or "medium" not in pq:
        raise ValueError(f"{path}: no per-query AP (run it with this d2r's 'bench revisitop')")
    return pq


def paired_difference(a, b, resamples: int = 10000, seed: int = 0) -> dict:
    """Mean of b − a with a percentile-bootstrap 95% interval; a, b: per-query values (None/NaN skipped
    pairwise). Returns {"mean_a", "mean_b", "diff", "ci_low", "ci_high", "wins", "losses", "ties", "n"}."""
    a = np.array([np.nan if v is None else v for v in a], np.float64)
    b = np.array([np.nan if v is None else v for v in b], np.float64)
    if isinstance(resamples, bool) or int(resamples) < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if a.shape != b.shape:
        raise ValueError(f"the runs have {a.shape[0]} and {b.shape[0]} queries")
    ok = ~(np.isnan(a) | np.isnan(b))
    d = b[ok] - a[ok]
    n = int(d.size)
    if n == 0:
        nan = float("nan")
        return {"mean_a": nan, "mean_b": nan, "diff": nan, "ci_low": nan, "ci_high": nan, "wins": 0,
                "losses": 0, "ties": 0, "n": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(int(resamples), n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean_a": float(a[ok].mean()), "mean_b": float(b[ok].mean()), "diff": float(d.mean()),
            "ci_low": float(lo), "ci_high": float(hi), "wins": int((d > 0).sum()), "losses": int((d < 0).sum()),
            "ties": int((d == 0).sum()), "n": n}


def compare_runs(run_a, run_b, stage_a=None, stage_b=None, resamples: int = 10000, seed: int = 0) -> dict:
    """Compare the final stage (or the given stages) of two runs for Medium and Hard."""
    pa, pb = load_per_query(run_a), load_per_query(run_b)
    if pa.get("queries") != pb.get("queries"):
        raise ValueError(f"{run_a} and {run_b} were run on different queries")
    sa = stage_a or pa["stages"][-1]
    sb = stage_b or pb["stages"][-1]
    out = {"run_a": str(run_a), "run_b": str(run_b), "stage_a": sa, "stage_b": sb}
    for p in PROTOCOLS:
        if sa not in pa[p] or sb not in pb[p]:
            raise ValueError(f"stage {sa!r} / {sb!r} not in the runs (have {pa['stages']} / {pb['stages']})")
        out[p] = paired_difference(pa[p][sa], pb[p][sb], resamples, seed)
    return out


def format_comparison(res: dict) -> str:
    lines = [f"A = {res['run_a']} [{res['stage_a']}]", f"B = {res['run_b']} [{res['stage_b']}]",
             f"{'':<8}{'mAP A':>8}{'mAP B':>8}{'B - A':>8}   95% bootstrap   wins/losses/ties  n"]
    for p in PROTOCOLS:
        r = res[p]
        lines.append(f"{p:<8}{r['mean_a']:>8.2f}{r['mean_b']:>8.2f}{r['diff']:>+8.2f}   "
                     f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]   {r['wins']}/{r['losses']}/{r['ties']}"
                     f"{'':>8}{r['n']}")
    return "\n".join(lines)
