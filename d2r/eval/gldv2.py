"""Google Landmarks Dataset v2 retrieval metrics, exactly as the official DELF metric code.

Rules (official ``dataset_file_io.py`` / ``metrics.py``):

- Solution CSV ``id,images,Usage`` (header skipped): ``Ignored`` rows are skipped; ``images`` is split on single
  spaces; any Usage other than Public / Private / Ignored is an error.
- Predictions CSV ``id,images`` (header skipped): empty rows skipped; an id seen twice (among Public/Private) is an
  error; ignored ids are skipped; an empty ``images`` field means no prediction; one trailing empty token is dropped;
  a non-empty prediction for an id in no split is an error.
- mAP@100 = (1/Q) Σ_q (1/min(m_q, 100)) Σ_{k ≤ min(n_q, 100)} P_q(k)·rel_q(k), m_q = number of solution images; a
  repeated prediction takes its rank but earns nothing; Q counts every query of the split, so queries without a
  prediction score 0.
- Precision@k = (relevant distinct images in the first k) / k, averaged over the same Q queries.
- Mean / median position of the first relevant prediction (max + 1 = 101 when none in the first 100).

Everything is reported in PERCENT (the official script prints mAP as a fraction and precisions ×100).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from d2r import _io

log = logging.getLogger(__name__)

SPLITS = ("public", "private")
DEFAULT_KS = (1, 5, 10, 50, 100)


@dataclass(frozen=True, eq=False)
class Solution:
    """GLDv2 retrieval ground truth: test id -> list of relevant index ids, per split, plus the ignored ids."""

    public: dict[str, list[str]]
    private: dict[str, list[str]]
    ignored: set[str]

    def split(self, name: str) -> dict[str, list[str]]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.public if name == "public" else self.private


def _rows(path: Path):
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)  # header
            yield from reader
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed CSV ({e})") from e


def read_solution(path) -> Solution:
    """Read ``retrieval_solution_v2.1.csv`` (columns id, images, Usage)."""
    path = Path(path)
    public: dict[str, list[str]] = {}
    private: dict[str, list[str]] = {}
    ignored: set[str] = set()
    for line, row in enumerate(_rows(path), start=2):
        if len(row) < 3:
            raise ValueError(f"{path}:{line}: expected 3 columns id,images,Usage, got {len(row)}")
        test_id, images, usage = row[0], row[1], row[2]
        if usage == "Ignored":
            ignored.add(test_id)
        elif usage == "Public":
            public[test_id] = images.split(" ")
        elif usage == "Private":
            private[test_id] = images.split(" ")
        else:
            raise ValueError(f"{path}:{line}: test image {test_id} has unrecognised Usage {usage!r}")
    return Solution(public, private, ignored)


def read_predictions(path, solution: Solution) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Read a predictions CSV (``id,images``); returns (public, private) dicts test id -> predicted index ids."""
    path = Path(path)
    public: dict[str, list[str]] = {}
    private: dict[str, list[str]] = {}
    for line, row in enumerate(_rows(path), start=2):
        if not row:
            continue
        test_id = row[0]
        if test_id in public or test_id in private:
            raise ValueError(f"{path}:{line}: test image {test_id} is repeated")
        if test_id in solution.ignored:
            continue
        images = row[1] if len(row) > 1 else ""
        if not images:  # no prediction: the query scores 0 (the official reader does not check the id here)
            continue
        pred = images.split(" ")
        if not pred[-1]:
            pred = pred[:-1]
        if test_id in solution.public:
            public[test_id] = pred
        elif test_id in solution.private:
            private[test_id] = pred
        else:
            raise ValueError(f"{path}:{line}: test id {test_id} is not in the solution")
    return public, private


def average_precision(prediction: Sequence[str], relevant: Sequence[str], max_predictions: int = 100) -> float:
    """Official GLDv2 AP@max_predictions of one query (fraction); repeated predictions take a rank, earn
    nothing. No relevant images gives 0.0 (as ``revisitop.compute_ap``; was a ZeroDivisionError)."""
    if len(relevant) == 0:
        return 0.0
    rel = set(relevant)
    seen: set[str] = set()
    correct = 0
    ap = 0.0
    for i, p in enumerate(prediction[:max_predictions]):
        if p in seen:
            continue
        seen.add(p)
        if p in rel:
            correct += 1
            ap += correct / (i + 1)
    return ap / min(len(relevant), max_predictions)


def precisions(prediction: Sequence[str], relevant: Sequence[str], max_predictions: int = 100) -> np.ndarray:
    """Precision at ranks 1..max_predictions of one query (float64 (max_predictions,), fractions)."""
    rel = set(relevant)
    seen: set[str] = set()
    hits = np.zeros(max_predictions)
    for i, p in enumerate(prediction[:max_predictions]):
        if p not in seen:
            seen.add(p)
            hits[i] = p in rel
    return np.cumsum(hits) / np.arange(1, max_predictions + 1)


def first_position(prediction: Sequence[str], relevant: Sequence[str], max_predictions: int = 100) -> int:
    """1-based position of the first relevant prediction, max_predictions + 1 if none in the first max_predictions."""
    rel = set(relevant)
    for i, p in enumerate(prediction[:max_predictions]):
        if p in rel:
            return i + 1
    return max_predictions + 1


def split_metrics(
    predictions: dict[str, list[str]],
    solution: dict[str, list[str]],
    ks: Sequence[int] = DEFAULT_KS,
    max_predictions: int = 100,
) -> dict:
    """Metrics of one split in percent: {"mAP@100", "mP@k"..., "mean_position", "median_position", "num_queries"}.

    Q = len(solution); queries without a prediction score 0 (position max_predictions + 1). A prediction for a
    test id not in ``solution`` is a ValueError. An empty split gives NaN metrics.
    """
    ks = [int(k) for k in ks]
    if any(k < 1 or k > max_predictions for k in ks):
        raise ValueError(f"ks must lie in [1, {max_predictions}], got {ks}")
    for key in predictions:
        if key not in solution:
            raise ValueError(f"test image {key} is not part of the solution split")
    q = len(solution)
    out: dict = {}
    if q == 0:
        out[f"mAP@{max_predictions}"] = float("nan")
        out.update({f"mP@{k}": float("nan") for k in ks})
        out.update(mean_position=float("nan"), median_position=float("nan"), num_queries=0)
        return out
    ap_sum = 0.0
    prec = np.zeros((q, max_predictions))
    pos = np.full(q, max_predictions + 1, np.float64)
    for row, (key, relevant) in enumerate(solution.items()):
        pred = predictions.get(key)
        if pred is None:
            continue
        ap_sum += average_precision(pred, relevant, max_predictions)
        prec[row] = precisions(pred, relevant, max_predictions)
        pos[row] = first_position(pred, relevant, max_predictions)
    out[f"mAP@{max_predictions}"] = 100.0 * ap_sum / q
    mean_prec = prec.mean(axis=0)
    for k in ks:
        out[f"mP@{k}"] = float(100.0 * mean_prec[k - 1])
    out["mean_position"] = float(pos.mean())
    out["median_position"] = float(np.median(pos))
    out["num_queries"] = q
    return out


def evaluate(predictions, solution, ks: Sequence[int] = DEFAULT_KS, max_predictions: int = 100) -> dict:
    """GLDv2 retrieval metrics for the Public and Private splits: {"public": {...}, "private": {...}} in percent.

    ``predictions``: a predictions CSV path, or a dict test id -> list of index ids (ignored ids are dropped, ids in
    no split are a ValueError). ``solution``: a solution CSV path or a :class:`Solution`.
    """
    if not isinstance(solution, Solution):
        solution = read_solution(solution)
    if isinstance(predictions, (str, Path)):
        public, private = read_predictions(predictions, solution)
    else:
        public, private = {}, {}
        for key, pred in predictions.items():
            key = str(key)
            if key in solution.ignored:
                continue
            if key in solution.public:
                public[key] = [str(p) for p in pred]
            elif key in solution.private:
                private[key] = [str(p) for p in pred]
            else:
                raise ValueError(f"test id {key} is not in the solution")
    return {
        "public": split_metrics(public, solution.public, ks, max_predictions),
        "private": split_metrics(private, solution.private, ks, max_predictions),
    }


def write_predictions(path, ids: Sequence[str], rankings, max_predictions: int | None = 100) -> None:
    """Write a predictions CSV (``id,images``, images space-separated, best first) atomically.

    ``ids``: test image ids; ``rankings``: one sequence of index image ids per test id (e.g. a d2r ranking mapped
    to index names); each is cut to ``max_predictions`` (None keeps all). Ids containing commas, spaces or newlines
    are refused (the format cannot hold them).
    """
    ids = [str(i) for i in ids]
    rankings = list(rankings)
    if len(ids) != len(rankings):
        raise ValueError(f"write_predictions: {len(ids)} ids but {len(rankings)} rankings")
    lines = ["id,images"]
    for test_id, ranking in zip(ids, rankings):
        names = [str(x) for x in (ranking if max_predictions is None else list(ranking)[:max_predictions])]
        for s in (test_id, *names):
            if not s or any(c in s for c in ", \n\r\""):
                raise ValueError(f"write_predictions: id {s!r} is empty or contains a comma, space, quote or newline")
        lines.append(f"{test_id},{' '.join(names)}")
    _io.write_bytes(path, ("\n".join(lines) + "\n").encode())
