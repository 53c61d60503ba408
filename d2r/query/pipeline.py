"""The query path after the first search: verified neighbours, the expanded query, searched and verified again."""

from __future__ import annotations

import numpy as np

from d2r.aggregate import Aggregator
from d2r.query.expand import ExpansionConfig, aqe_weights, average_expansion, check_method, hamming_expansion
from d2r.query.verify import geometric_verification, order_verified


# ---- one step of a search pipeline ------------------------------------------------------------------------------
def reliable_neighbours(ids, scores, inliers: dict | None, top: int, min_inliers: int, exclude=()) -> list:
    """Which ranked ids expand the query: with ``inliers`` (verification ran), the ids with at least
    ``min_inliers`` inliers, most inliers first (ties in rank order); else the first ids in rank order. Ids in
    ``exclude`` are skipped; at most ``top``. Returns [(id, initial score)]."""
    skip = set(exclude)
    pairs = [(i, float(s)) for i, s in zip(np.asarray(ids).tolist(), np.asarray(scores).tolist()) if i not in skip]
    if inliers is not None:
        pairs = [p for p in pairs if inliers.get(p[0], -1) >= min_inliers]
        pairs = sorted(pairs, key=lambda p: -inliers[p[0]])  # stable: rank order among ties
    return pairs[:top]


def expanded_query(method: str, db, query_descriptors: np.ndarray, neighbours, get_descriptors,
                   config: ExpansionConfig, verified: bool, query_num_assignments: int | None = None):
    """The expanded query of ``method`` ("aqe" / "hqe") for a :class:`~d2r.index.Database` ``db``.

    neighbours: [(id, score)] from :func:`reliable_neighbours`; get_descriptors: id -> (F, D) float32
    whole-image descriptors; query_num_assignments: None = the database's. Returns (Aggregated, info dict:
    neighbours used, descriptors added)."""
    check_method(method)
    config = config.validate()
    cfg = db.config
    book = db.codebook
    ma = int(query_num_assignments or cfg.query_num_assignments)
    qagg = Aggregator(book, cfg.kernel, ma)
    qx = np.ascontiguousarray(query_descriptors, np.float32)
    qwords = book.assign(qx, ma)
    query = qagg(qx, assignments=qwords)
    if not neighbours:
        return query, {"neighbours": 0}
    xs = [np.ascontiguousarray(get_descriptors(i), np.float32) for i, _ in neighbours]
    if method == "aqe":
        dagg = Aggregator(book, cfg.kernel, cfg.num_assignments)
        recs = [dagg(x) for x in xs]
        w = aqe_weights(query, recs, config.alpha, normalize=cfg.normalize)
        return average_expansion(query, recs, w), {"neighbours": len(recs)}
    sizes = [x.shape[0] for x in xs]
    allw = book.assign(np.concatenate(xs), 1)[:, 0] if sum(sizes) else np.zeros(0, np.int64)
    parts = np.split(allw, np.cumsum(sizes)[:-1])
    rec, added = hamming_expansion(book, cfg.kernel, qx, qwords, list(zip(xs, parts)), config.hamming,
                                   0 if verified else config.min_matches)
    return rec, {"neighbours": int(np.count_nonzero(added)), "added": int(added.sum())}


def search_expanded(method: str, db, query, ids, scores, inliers: dict | None, get_features, config: ExpansionConfig,
                    rerank_config, depth: int, exclude=(), query_num_assignments: int | None = None):
    """One query-expansion step of a search: neighbours, expanded query, second search and, when the first
    ranking was verified (``inliers``: id -> count), verification of the new top candidates with the same rule.

    query: the query's LocalFeatures; get_features: id -> whole-image LocalFeatures. ``inliers`` is extended in
    place with the newly verified ids. Returns (ids, scores, regions, inliers (L,) int64 with -1 where
    unverified, info dict)."""
    verified = inliers is not None
    neighbours = reliable_neighbours(ids, scores, inliers, config.top,
                                     rerank_config.min_inliers if verified else 0, exclude)
    rec, info = expanded_query(method, db, query.descriptors, neighbours,
                               lambda i: get_features(i).descriptors, config, verified, query_num_assignments)
    ranking = db.search(rec, top_k=depth)
    new_ids, new_scores, regions = np.asarray(ranking.ids), ranking.scores, ranking.regions
    inl = np.full(len(new_ids), -1, np.int64)
    if verified and len(new_ids) and rerank_config.num_to_rerank > 0:
        todo = [i for i in new_ids[: rerank_config.num_to_rerank].tolist() if i not in inliers]
        if todo:
            counts = geometric_verification(query, [get_features(i) for i in todo], rerank_config,
                                            db.codebook)
            inliers.update(zip(todo, counts.tolist()))
        position = {i: k for k, i in enumerate(new_ids.tolist())}
        new_ids, new_scores, inl = order_verified(new_ids, new_scores, inliers, rerank_config)
        regions = regions[[position[i] for i in new_ids.tolist()]]
    return new_ids, new_scores, regions, inl, info
