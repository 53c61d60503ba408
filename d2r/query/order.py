"""The order after verification: which ids are verified, and where each ends up (official, threshold, fused).

Every rule verifies the first ``num_to_rerank`` ids of a ranking that are not junk and leaves every other id in
its input order behind the ones it moves; junk ids are never verified (the protocol's "ignore" list, or the ids a
caller excludes) and keep their place among the unverified. ``inliers``: id -> count for (at least) the verified
ids. Each rule returns (ids, scores (float64), inliers per position (int64, -1 where not verified)).
"""

from __future__ import annotations

import numpy as np


def candidates(ids, num_to_rerank: int, junk=()) -> list:
    """The ids verification looks at: the first ``num_to_rerank`` of ``ids`` not in ``junk``, in order."""
    junk = set(junk)
    return [x for x in np.asarray(ids).tolist() if x not in junk][:num_to_rerank]


def order_verified(ids, scores, inliers: dict, config, junk=()):
    """The final order of ``config.method`` (a :class:`~d2r.query.config.RerankConfig`):
    :func:`order_by_inliers` (official), :func:`order_by_fused` (usac with ``fusion_weight`` > 0) or
    :func:`order_by_threshold` (usac)."""
    if config.method == "official":
        return order_by_inliers(ids, scores, inliers, config.num_to_rerank, junk)
    if config.fusion_weight > 0:
        return order_by_fused(ids, scores, inliers, config.num_to_rerank, config.min_inliers,
                              config.fusion_weight, config.fusion_cap, junk)
    return order_by_threshold(ids, scores, inliers, config.num_to_rerank, config.min_inliers, junk)


def order_by_threshold(ids, scores, inliers: dict, num_to_rerank: int, min_inliers: int, junk=()):
    """The "usac" decision rule: of the verified ids, those with at least ``min_inliers`` inliers move to the
    front, sorted by inliers descending (ties in input order); everything else keeps its input order."""
    ids, chosen, inl = _verified(ids, inliers, num_to_rerank, junk)
    strong = chosen[inl[chosen] >= min_inliers]
    return _to_front(ids, np.asarray(scores, np.float64), inl, strong[np.lexsort((strong, -inl[strong]))])


def order_by_inliers(ids, scores, inliers: dict, num_to_rerank: int, junk=()):
    """The official rule: the verified ids sorted by (inliers, initial score) descending, ties in input order;
    everything else follows in input order."""
    ids, chosen, inl = _verified(ids, inliers, num_to_rerank, junk)
    sc = np.asarray(scores, np.float64)
    return _to_front(ids, sc, inl, chosen[np.lexsort((chosen, -sc[chosen], -inl[chosen]))])


def order_by_fused(ids, scores, inliers: dict, num_to_rerank: int, min_inliers: int, weight: float, cap: int,
                   junk=()):
    """The fused rule: the verified ids sorted by s + weight·min(n, cap)/cap descending (s the initial score,
    n the inliers; n < ``min_inliers`` adds nothing), ties in input order; everything else follows in input
    order. The scores returned are the fused ones for the verified ids and the initial ones elsewhere."""
    ids, chosen, inl = _verified(ids, inliers, num_to_rerank, junk)
    sc = np.asarray(scores, np.float64).copy()
    n = inl[chosen].astype(np.float64)
    sc[chosen] += np.where(n >= min_inliers, float(weight) * np.minimum(n, cap) / float(cap), 0.0)
    return _to_front(ids, sc, inl, chosen[np.lexsort((chosen, -sc[chosen]))])


def moved_by(config) -> str:
    """What ranks the verified ids a rule moves to the front: "inliers" (official, threshold) or "fused"."""
    return "fused" if config.method == "usac" and config.fusion_weight > 0 else "inliers"


def moved(inliers_per_position: np.ndarray, config) -> np.ndarray:
    """(L,) bool: the positions whose place comes from verification (not from the similarity order) under
    ``config``'s rule: every verified id for official and fused, those with at least ``min_inliers`` for the
    threshold rule."""
    inl = np.asarray(inliers_per_position)
    if config.method == "official" or config.fusion_weight > 0:
        return inl >= 0
    return inl >= config.min_inliers


def _verified(ids, inliers: dict, num_to_rerank: int, junk):
    """(ids as an array, positions of the first ``num_to_rerank`` ids not in ``junk`` (int64), inliers per
    position (int64, -1 where not verified))."""
    ids = np.asarray(ids)
    junk = set(junk)
    chosen = np.array([i for i, x in enumerate(ids.tolist()) if x not in junk][:num_to_rerank], np.int64)
    inl = np.full(len(ids), -1, np.int64)
    if chosen.size:
        inl[chosen] = [inliers[x] for x in ids[chosen].tolist()]
    return ids, chosen, inl


def _to_front(ids, scores, inl, front):
    """The positions ``front`` first (in that order), then every other position in input order."""
    rest = np.setdiff1d(np.arange(len(ids)), front, assume_unique=True)
    final = np.concatenate([front, rest]).astype(np.int64)
    return ids[final], scores[final], inl[final]
