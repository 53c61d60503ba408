"""Evaluation protocols: Revisited Oxford/Paris (``revisitop``) and Google Landmarks v2 retrieval (``gldv2``).

Rank-matrix orientation for all of d2r: ``ranks`` is (num_queries, num_db) int, row q = database indices best first.
"""

from d2r.eval import gldv2, revisitop
from d2r.eval.gldv2 import Solution, read_predictions, read_solution, write_predictions
from d2r.eval.gldv2 import evaluate as evaluate_gldv2
from d2r.eval.revisitop import (
    GroundTruth,
    QueryGroundTruth,
    compute_ap,
    load_gnd,
    per_query_metrics,
    precision_recall_at,
    ranks_from_scores,
)
from d2r.eval.revisitop import evaluate as evaluate_revisitop

__all__ = [
    "GroundTruth",
    "QueryGroundTruth",
    "Solution",
    "compute_ap",
    "evaluate_gldv2",
    "evaluate_revisitop",
    "gldv2",
    "load_gnd",
    "per_query_metrics",
    "precision_recall_at",
    "read_predictions",
    "ranks_from_scores",
    "read_solution",
    "revisitop",
    "write_predictions",
]
