"""Revisited Oxford / Paris evaluation protocol (Radenović et al., CVPR 2018), exactly as the revisitop code.

Rank-matrix orientation (used everywhere in d2r): ``ranks`` is an int array of shape (num_queries, num_db) —
row q lists DATABASE indices (0-based, into ``imlist``) ordered best first. (revisitop's own ``compute_map`` takes
the transpose, (num_db, num_queries).) A list of per-query 1-D arrays is accepted too; rows may be truncated
(shorter than num_db), and positives missing from a truncated row are placed on the last non-junk places of the
database (the pessimistic completion), so a truncated ranking never scores above any full ranking it starts.

Protocols (``evaluate``): easy — positives easy, junk junk+hard; medium — positives easy+hard, junk junk; hard —
positives hard, junk junk+easy. Junk images are removed before ranks are taken; queries without positives are
left out of every mean. Metrics are reported in PERCENT:

- AP (trapezoid rule, revisitop ``compute_ap``): with r_j the 0-based junk-free rank of the j-th positive (sorted),
  AP = Σ_j ((j / r_j, or 1 if r_j = 0) + (j + 1) / (r_j + 1)) / 2 / n_pos.
- mP@k: with p the 1-based positive ranks, k' = min(max p, k), precision = #(p ≤ k') / k' (revisitop).
- mR@k: #(p ≤ k) / n_pos (the official D2R ``ComputePRAtRanks`` recall).
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

PROTOCOLS = ("easy", "medium", "hard")
_GT_KEYS = ("easy", "hard", "junk")


@dataclass(frozen=True, eq=False)
class QueryGroundTruth:
    """Ground truth of one query: 0-based database indices (int64 1-D arrays) and the query box.

    ``bbx`` is float64 (4,) [x1, y1, x2, y2] in zero-based pixels, or None when the whole image is the query.
    """

    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray
    bbx: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """A revisitop ground-truth file: database names, query names and one :class:`QueryGroundTruth` per query."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[QueryGroundTruth]

    def __post_init__(self):
        if len(self.gnd) != len(self.qimlist):
            raise ValueError(f"GroundTruth: {len(self.qimlist)} query names but {len(self.gnd)} gnd entries")
        n = len(self.imlist)
        for i, g in enumerate(self.gnd):
            for key in _GT_KEYS:
                a = getattr(g, key)
                if a.size and (a.min() < 0 or a.max() >= n):
                    raise ValueError(f"GroundTruth: query {i} {key} index out of range [0, {n}): {a.min()}..{a.max()}")

    @property
    def num_db(self) -> int:
        return len(self.imlist)

    @property
    def num_queries(self) -> int:
        return len(self.qimlist)

    def protocol(self, name: str, query_in_database: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(positives, junk) per query for protocol ``name`` (easy / medium / hard), sorted unique int64.

        ``query_in_database``: each query name is looked up in ``imlist`` and that database image is added to the
        query's junk (ValueError if a query name is not in the database). An index that is both positive and junk
        counts as positive only (revisitop never has such overlaps).
        """
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; expected one of {PROTOCOLS}")
        self_ids = self.query_db_ids() if query_in_database else None
        positives, junk = [], []
        for i, g in enumerate(self.gnd):
            if name == "easy":
                pos, jk = [g.easy], [g.junk, g.hard]
            elif name == "medium":
                pos, jk = [g.easy, g.hard], [g.junk]
            else:
                pos, jk = [g.hard], [g.junk, g.easy]
            if self_ids is not None:
                jk.append(self_ids[i : i + 1])
            p = np.unique(np.concatenate(pos).astype(np.int64))
            j = np.setdiff1d(np.concatenate(jk).astype(np.int64), p)
            positives.append(p)
            junk.append(j)
        return positives, junk

    def query_db_ids(self) -> np.ndarray:
        """int64 (num_queries,) database index of each query image (for data where queries are in the database)."""
        where = {name: i for i, name in enumerate(self.imlist)}
        missing = [q for q in self.qimlist if q not in where]
        if missing:
            raise ValueError(f"query_in_database: {len(missing)} query name(s) not in imlist, e.g. {missing[0]!r}")
        return np.array([where[q] for q in self.qimlist], dtype=np.int64)


def _as_index_array(x, what: str) -> np.ndarray:
    a = np.asarray([] if x is None else x).reshape(-1)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.dtype.kind == "f":
        if not np.all(a == np.round(a)):
            raise ValueError(f"{what}: indices must be integers")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{what}: indices must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _as_bbx(x, what: str) -> np.ndarray | None:
    if x is None:
        return None
    b = np.asarray(x, dtype=np.float64).reshape(-1)
    if b.size == 0:
        return None
    if b.size != 4:
        raise ValueError(f"{what}: bbx must have 4 numbers [x1, y1, x2, y2], got {b.size}")
    return b


def load_gnd(path) -> GroundTruth:
    """Read a revisitop ground truth: ``gnd_*.pkl`` or ``.json`` (0-based, the same keys) or ``gnd_*.mat``
    (MATLAB, 1-based indices).

    The .mat holds cell arrays ``imlist`` / ``qimlist`` and a 1×Q struct array ``gnd`` with fields easy, hard, junk
    (1-based, converted to 0-based here) and bbx (already zero-based pixels in both formats, kept as is).
    Raises ValueError naming the file when it cannot be read or has the wrong layout.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".mat":
            return _load_mat(path)
        if path.suffix.lower() == ".json":
            return _from_mapping(json.loads(path.read_text()), index_base=0)
        with open(path, "rb") as f:
            cfg = pickle.load(f)
        return _from_mapping(cfg, index_base=0)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, AttributeError,
            UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable revisitop ground-truth file ({type(e).__name__}: {e})") from e


def _from_mapping(cfg, index_base: int) -> GroundTruth:
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= set(cfg):
        raise ValueError("expected a dict with keys imlist, qimlist, gnd")
    gnd = []
    for i, g in enumerate(cfg["gnd"]):
        arrays = {}
        for key in _GT_KEYS:
            arrays[key] = _as_index_array(g.get(key, []), f"gnd[{i}].{key}") - index_base
        gnd.append(QueryGroundTruth(bbx=_as_bbx(g.get("bbx"), f"gnd[{i}]"), **arrays))
    return GroundTruth([str(s) for s in cfg["imlist"]], [str(s) for s in cfg["qimlist"]], gnd)


def _load_mat(path: Path) -> GroundTruth:
    from scipy.io import loadmat

    try:
        cfg = loadmat(str(path), squeeze_me=True, struct_as_record=False, chars_as_strings=True)
    except Exception as e:  # scipy raises several unrelated types for a corrupt file
        raise ValueError(f"not a readable MATLAB file ({type(e).__name__}: {e})") from e
    missing = {"imlist", "qimlist", "gnd"} - set(cfg)
    if missing:
        raise ValueError(f"missing variable(s) {sorted(missing)}")

    def names(x):
        return [str(s) for s in np.atleast_1d(x).reshape(-1)]

    entries = []
    for g in np.atleast_1d(cfg["gnd"]).reshape(-1):
        fields = set(getattr(g, "_fieldnames", []))
        entries.append({k: getattr(g, k) for k in (*_GT_KEYS, "bbx") if k in fields})
    return _from_mapping({"imlist": names(cfg["imlist"]), "qimlist": names(cfg["qimlist"]), "gnd": entries}, 1)


def compute_ap(ranks_of_positives, n_pos: int) -> float:
    """revisitop average precision (trapezoid rule) as a fraction in [0, 1].

    ``ranks_of_positives``: sorted 0-based junk-free ranks of the retrieved positives; ``n_pos``: number of
    positives (positives not listed contribute nothing). n_pos = 0 gives 0.0.
    """
    r = np.asarray(ranks_of_positives, dtype=np.float64).reshape(-1)
    if n_pos <= 0 or r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(r == 0, 1.0, j / np.where(r == 0, 1.0, r))
    p1 = (j + 1.0) / (r + 1.0)
    return float(np.sum((p0 + p1) / 2.0) / n_pos)


def precision_recall_at(ranks_of_positives, n_pos: int, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each k (fractions, float64 (len(ks),)) from sorted 0-based junk-free positive ranks.

    Precision uses revisitop's k' = min(max positive rank, k) (1-based); recall is #(rank < k) / n_pos.
    No positives ranked gives zeros.
    """
    p = np.asarray(ranks_of_positives, dtype=np.int64).reshape(-1) + 1
    prec = np.zeros(len(ks))
    rec = np.zeros(len(ks))
    if p.size == 0 or n_pos <= 0:
        return prec, rec
    top = int(p.max())
    for i, k in enumerate(ks):
        kq = min(top, int(k))
        prec[i] = np.count_nonzero(p <= kq) / kq
        rec[i] = np.count_nonzero(p <= k) / n_pos
    return prec, rec


def positive_ranks(row: np.ndarray, positives: np.ndarray, junk: np.ndarray, num_db: int) -> np.ndarray:
    """Sorted 0-based junk-free ranks of every positive in one (possibly truncated) ranking row.

    A positive's junk-free rank is its position minus the junk ranked before it. Positives missing from the row
    take the last non-junk places of the database: num_db - #junk - #missing + j.
    """
    n_pos = positives.size
    if n_pos == 0:
        return np.zeros(0, np.int64)
    pos_in_row = np.flatnonzero(np.isin(row, positives))
    junk_in_row = np.flatnonzero(np.isin(row, junk))
    ranks = pos_in_row - np.searchsorted(junk_in_row, pos_in_row)
    missing = n_pos - pos_in_row.size
    if missing:
        start = num_db - junk.size - missing
        ranks = np.concatenate([ranks, start + np.arange(missing)])
    return ranks.astype(np.int64)


def ranks_from_scores(scores) -> np.ndarray:
    """(num_queries, num_db) similarity scores -> (num_queries, num_db) int64 ranks, best first.

    Equal scores are ordered by lower database index (a stable sort of the negated scores), so a ranking built from
    tied scores is reproducible. NaN scores rank last.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores: expected (num_queries, num_db), got shape {s.shape}")
    key = np.where(np.isnan(s), np.inf, -s)
    return np.argsort(key, axis=1, kind="stable").astype(np.int64)


def _rows(ranks, num_queries: int, num_db: int) -> list[np.ndarray]:
    if isinstance(ranks, np.ndarray) and ranks.ndim == 2:
        if ranks.shape[0] != num_queries:
            hint = ""
            if ranks.shape[1] == num_queries:
                hint = " (revisitop's (num_db, num_queries) layout must be transposed)"
            raise ValueError(
                f"ranks: expected (num_queries={num_queries}, <= num_db={num_db}), got {ranks.shape}{hint}"
            )
        rows = list(ranks)
    else:
        rows = list(ranks)
        if len(rows) != num_queries:
            raise ValueError(f"ranks: expected {num_queries} per-query rankings, got {len(rows)}")
    out = []
    for q, r in enumerate(rows):
        r = np.asarray(r)
        if r.ndim != 1 or (r.size and not np.issubdtype(r.dtype, np.integer)):
            raise ValueError(f"ranks[{q}]: expected a 1-D integer array of database indices, got {r.dtype} {r.shape}")
        r = r.astype(np.int64, copy=False)
        if r.size > num_db or (r.size and (r.min() < 0 or r.max() >= num_db)):
            raise ValueError(f"ranks[{q}]: database indices must lie in [0, {num_db}) and number at most {num_db}")
        if np.unique(r).size != r.size:
            raise ValueError(f"ranks[{q}]: a database index appears twice")
        out.append(r)
    return out


def per_query_metrics(ranks, positives, junk, num_db: int, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Per-query AP, precision@k and recall@k as fractions; NaN rows for queries without positives.

    ``ranks``: (Q, <= num_db) int array or list of 1-D arrays (see module docstring); ``positives``/``junk``: per-query
    int arrays. Returns {"ap": (Q,), "precision": (Q, len(ks)), "recall": (Q, len(ks))} float64.
    """
    rows = _rows(ranks, len(positives), num_db)
    nq = len(rows)
    ap = np.full(nq, np.nan)
    prec = np.full((nq, len(ks)), np.nan)
    rec = np.full((nq, len(ks)), np.nan)
    for q, row in enumerate(rows):
        pos = np.unique(np.asarray(positives[q], dtype=np.int64))
        if pos.size == 0:
            continue
        jk = np.setdiff1d(np.asarray(junk[q], dtype=np.int64), pos)
        r = positive_ranks(row, pos, jk, num_db)
        ap[q] = compute_ap(r, pos.size)
        prec[q], rec[q] = precision_recall_at(r, pos.size, ks)
    return {"ap": ap, "precision": prec, "recall": rec}


def evaluate(
    ranks,
    gnd: GroundTruth,
    ks: Sequence[int] = (1, 5, 10),
    protocols: Sequence[str] = PROTOCOLS,
    query_in_database: bool = False,
) -> dict:
    """revisitop metrics of a ranking, in percent.

    Args:
        ranks: (num_queries, num_db) int array, row q = database indices best first (or per-query 1-D arrays,
            possibly truncated; see the module docstring).
        gnd: :class:`GroundTruth` (``load_gnd``).
        ks: cut-offs for mP@k / mR@k.
        protocols: any of "easy", "medium", "hard".
        query_in_database: treat each query's own database image as junk (queries that are also database images,
            as in instance_bench_dev; harmless when the gnd already lists it as junk).

    Returns:
        {protocol: {"mAP": float, "mP@k": float, "mR@k": float (for each k), "num_queries": int}} with
        percentages; ``num_queries`` counts the queries with positives. With none, the metrics are NaN.
    """
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")
    rows = _rows(ranks, gnd.num_queries, gnd.num_db)
    out = {}
    for name in protocols:
        positives, junk = gnd.protocol(name, query_in_database=query_in_database)
        m = per_query_metrics(rows, positives, junk, gnd.num_db, ks)
        valid = ~np.isnan(m["ap"])
        n = int(valid.sum())
        res: dict = {}
        if n == 0:
            log.warning("protocol %s: no query has positives; metrics are NaN", name)
        res["mAP"] = float(100.0 * m["ap"][valid].mean()) if n else float("nan")
        for i, k in enumerate(ks):
            res[f"mP@{k}"] = float(100.0 * m["precision"][valid, i].mean()) if n else float("nan")
        for i, k in enumerate(ks):
            res[f"mR@{k}"] = float(100.0 * m["recall"][valid, i].mean()) if n else float("nan")
        res["num_queries"] = n
        out[name] = res
    return out
