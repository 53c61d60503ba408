"""THE query path: features -> search -> verify -> expand -> search -> verify, every stage returned.

    result = search_query(features, db, get_features, config.rerank, config.qe, depth=100)
    result.final.ids, result.stages["initial"].scores, result.timings["rerank"]

:meth:`Engine.search <d2r.engine.Engine.search>` and ``search_batch`` (so ``d2r search``, ``d2r serve`` and
:class:`~d2r.distributed.ShardedEngine`) and ``d2r bench`` (revisitop and GLDv2) all call :func:`search_query`;
the benchmark adds only protocol things (each protocol's junk list, metrics, the report). The query is assigned
to the codebook and aggregated once (:func:`prepare_query`); Hamming correspondences and HQE reuse its
assignments, and αQE averages the neighbours' records as the index holds them (``db.record``) instead of
aggregating their features again.

Stages, in the order they run (each a :class:`Stage`):

- ``global`` (two-stage search, a ``shortlist`` given): the global stage's shortlist, by global score; the
  stages after it rank only the shortlist's images, by (1 − w)·local + w·global score (``global_weight`` w).
- ``initial``: the index's ranking of the query record (the top ``depth``).
- ``verified`` (``rerank.enabled``): the first ``rerank.num_to_rerank`` ids that are not junk are verified and
  re-ordered by the rule of ``rerank.method`` (:mod:`d2r.query.order`).
- ``expanded`` (``qe.method`` not "none"): the ranking of the expanded record; with verification its first
  ``num_to_rerank`` non-junk ids are verified too (counts known from the first round are reused) and ordered by
  the same rule. Neighbours: the verified ids with at least ``rerank.min_inliers`` inliers, most first (ties in
  initial order), or without verification the first ids of the initial ranking; at most ``qe.top``.

Junk ids (a protocol's ignore list, or ids the caller excludes) are never verified nor used to expand the
query; they keep their place among the unverified ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from d2r.aggregate import Aggregated, Aggregator
from d2r.features.base import LocalFeatures
from d2r.query.config import ExpansionConfig, RerankConfig
from d2r.query.expand import aqe_weights, average_expansion, hamming_expansion
from d2r.query.order import candidates, moved, order_verified
from d2r.query.verify import verify_ids
from d2r.signatures import cached_word_signatures_many

STAGES = ("global", "initial", "verified", "expanded")


@dataclass(frozen=True)
class Query:
    """A query ready to search: its features, nearest words and record, each computed once.

    features: the query's LocalFeatures (cropped to its box if it has one); words: (N, M) int64 nearest words
    of each descriptor, nearest first (M = the most any step needs); record: the query aggregated with the
    search's ``num_assignments`` (<= M) words per descriptor."""
    features: LocalFeatures
    words: np.ndarray
    record: Aggregated
    num_assignments: int


@dataclass(frozen=True)
class Stage:
    """One ranking of a query, all arrays (L,), best first.

    ids: database ids; scores: float64, the similarity of the search that produced the ranking (the fused
    score for ids verified under ``rerank.fusion_weight``); inliers: int64, -1 where not verified; regions:
    int64, the best-scoring region of each image (regional search; 0 otherwise); promoted: bool, True where
    verification placed the id (moved up by its inliers, or by the fused score) rather than score order."""
    ids: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray
    regions: np.ndarray
    promoted: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class QueryResult:
    """Every stage of one query (:data:`STAGES` order, those that ran) and what it cost.

    timings: seconds of "search" (assignment, aggregation, first search), "rerank" (verification, both
    rounds) and "expand" (expanded record and its search); info: "verified" pairs verified by this call,
    "neighbours" images that expanded the query, "added" descriptors HQE joined."""
    stages: dict
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def final(self) -> Stage:
        """The last stage that ran: what a search returns."""
        return self.stages[list(self.stages)[-1]]


def prepare_query(features: LocalFeatures, db, rerank: RerankConfig | None = None,
                  query_num_assignments: int | None = None) -> Query:
    """Assign the query's descriptors once (as many nearest words as the search and the Hamming
    correspondences need) and aggregate it once with the search's ``query_num_assignments`` (default: the
    database's ``index.query_num_assignments``). ``db``: a Database or ShardedDatabase."""
    book = db.codebook
    m = int(query_num_assignments or db.config.query_num_assignments)
    x = np.ascontiguousarray(features.descriptors, np.float32)
    most = max(m, rerank.query_assignments() if rerank is not None else 0)
    words = book.assign(x, most)
    record = Aggregator(book, db.config.kernel, m)(x, assignments=words[:, :m])
    return Query(features, words, record, m)


def search_query(query, db, get_features, rerank: RerankConfig, qe: ExpansionConfig, depth: int, *,
                 junk=(), query_num_assignments: int | None = None, known: dict | None = None,
                 shortlist=None, global_weight: float = 0.0) -> QueryResult:
    """Search ``db`` with one query and return every stage (see the module docstring).

    query: the query's LocalFeatures or a :class:`Query`; db: a Database or ShardedDatabase (``search``,
    ``record``, ``codebook``, ``config``); get_features: id -> whole-image LocalFeatures of an indexed image
    (verification, HQE); rerank / qe: the two sections; depth: ids per ranking (the search's top_k, > 0);
    junk: ids (the database's id type) never verified nor used to expand; query_num_assignments: overrides
    the database's for this query; known: inlier counts already computed for this query with this ``rerank``
    (id -> count; a pair's count depends on nothing else), read and extended, so several calls for one query
    (the benchmark's protocols) verify each pair once. shortlist: ``(ids, scores)`` of a global first stage
    (:func:`global_shortlist`): the searches rank only these ids, fused with their global scores by
    ``global_weight``."""
    rerank, qe = rerank.check(), qe.check()
    t0 = time.perf_counter()
    q = query if isinstance(query, Query) else prepare_query(query, db, rerank, query_num_assignments)
    junk = set(junk)
    known = {} if known is None else known
    stages = {}
    if shortlist is None:
        def local_search(record):
            return _stage(db.search(record, top_k=depth))
    else:
        listed_ids, listed_scores = np.asarray(shortlist[0]), np.asarray(shortlist[1], np.float64)
        stages["global"] = Stage(listed_ids, listed_scores, np.full(len(listed_ids), -1, np.int64),
                                 np.zeros(len(listed_ids), np.int64), np.zeros(len(listed_ids), bool))
        by_id = dict(zip(listed_ids.tolist(), listed_scores.tolist()))

        def local_search(record):
            return fuse(_stage(db.search(record, top_k=depth, within=listed_ids)), by_id, global_weight)
    initial = local_search(q.record)
    stages["initial"] = initial
    timings = {"search": time.perf_counter() - t0, "rerank": 0.0, "expand": 0.0}
    info = {"verified": 0}
    verified: dict = {}  # id -> inliers of the ids THIS call verified (neighbours come from these only)

    def verify(stage: Stage) -> Stage:
        t = time.perf_counter()
        chosen = candidates(stage.ids, rerank.num_to_rerank, junk)
        info["verified"] += sum(i not in known for i in chosen)
        verified.update(verify_ids(q.features, chosen, get_features, rerank, db.codebook, known, q.words))
        position = {i: k for k, i in enumerate(stage.ids.tolist())}
        ids, scores, inliers = order_verified(stage.ids, stage.scores, verified, rerank, junk)
        regions = stage.regions[[position[i] for i in ids.tolist()]]
        timings["rerank"] += time.perf_counter() - t
        return Stage(ids, scores, inliers, regions, moved(inliers, rerank))

    if rerank.enabled:
        stages["verified"] = verify(initial)
    if qe.method != "none":
        t = time.perf_counter()
        neighbours = reliable_neighbours(initial.ids, initial.scores, verified if rerank.enabled else None,
                                         qe.top, rerank.min_inliers, junk)
        record, used = expanded_record(qe, db, q, neighbours, get_features, verified=rerank.enabled)
        info.update(used)
        expanded = local_search(record)
        timings["expand"] += time.perf_counter() - t
        stages["expanded"] = verify(expanded) if rerank.enabled else expanded
    return QueryResult(stages, timings, info)


def global_shortlist(index, vector: np.ndarray, size: int):
    """The global stage: the ``size`` ids of largest inner product with the query's global ``vector`` (D,)
    float32 in a :class:`~d2r.globaldesc.GlobalIndex`; ``(ids (n,) int64, scores (n,) float64)``, best first."""
    if len(index) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    ids, scores = index.search(np.asarray(vector, np.float32)[None], top_k=size)
    ids, scores = np.asarray(ids[0], np.int64), np.asarray(scores[0], np.float64)
    live = np.isfinite(scores)  # padding past the live count: id -1, score -inf
    return ids[live], scores[live]


def fuse(stage: Stage, global_scores: dict, weight: float) -> Stage:
    """A local ranking of shortlisted ids re-ordered by s = (1 − w)·s_local + w·s_global (w = ``weight``;
    ``global_scores``: id -> global score). w = 0 returns ``stage`` unchanged; ties keep the local order."""
    if weight == 0 or len(stage) == 0:
        return stage
    g = np.array([global_scores[i] for i in stage.ids.tolist()], np.float64)
    fused = (1.0 - weight) * stage.scores + weight * g
    order = np.argsort(-fused, kind="stable")
    return Stage(stage.ids[order], fused[order], stage.inliers[order], stage.regions[order],
                 stage.promoted[order])


def _stage(ranking) -> Stage:
    ids = np.asarray(ranking.ids)
    n = len(ids)
    return Stage(ids, np.asarray(ranking.scores, np.float64), np.full(n, -1, np.int64),
                 np.asarray(ranking.regions, np.int64), np.zeros(n, bool))


def reliable_neighbours(ids, scores, inliers: dict | None, top: int, min_inliers: int, exclude=()) -> list:
    """Which ranked ids expand the query: with ``inliers`` (verification ran), the ids with at least
    ``min_inliers`` inliers, most inliers first (ties in rank order); else the first ids in rank order. Ids in
    ``exclude`` are skipped; at most ``top``. Returns [(id, initial score)]."""
    skip = set(exclude)
    ranked = zip(np.asarray(ids).tolist(), np.asarray(scores).tolist())
    pairs = [(i, float(s)) for i, s in ranked if i not in skip]
    if inliers is not None:
        pairs = [p for p in pairs if inliers.get(p[0], -1) >= min_inliers]
        pairs = sorted(pairs, key=lambda p: -inliers[p[0]])  # stable: rank order among ties
    return pairs[:top]


def expanded_record(qe: ExpansionConfig, db, query: Query, neighbours, get_features, verified: bool):
    """The expanded query record of ``qe.method`` ("aqe" / "hqe") and what went into it.

    neighbours: [(id, score)] from :func:`reliable_neighbours`. αQE averages the query record with the
    neighbours' index records (``db.record``); HQE joins the Hamming-agreeing descriptors of their stored
    features (``get_features``), each assigned to its nearest word (cached with the verification's). Returns
    (Aggregated, {"neighbours": images used, "added": descriptors HQE joined})."""
    if not neighbours:
        return query.record, {"neighbours": 0, "added": 0}
    if qe.method == "aqe":
        records = [db.record(i) for i, _ in neighbours]
        weights = aqe_weights(query.record, records, qe.alpha, normalize=db.config.normalize)
        return average_expansion(query.record, records, weights), {"neighbours": len(records), "added": 0}
    book = db.codebook
    xs = [np.ascontiguousarray(get_features(i).descriptors, np.float32) for i, _ in neighbours]
    words = [w for w, _ in cached_word_signatures_many(xs, book)]
    record, added = hamming_expansion(book, db.config.kernel, query.features.descriptors,
                                      query.words[:, :query.num_assignments], list(zip(xs, words)), qe.hamming,
                                      0 if verified else qe.min_matches)
    return record, {"neighbours": int(np.count_nonzero(added)), "added": int(added.sum())}
