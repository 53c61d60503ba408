"""Geometric-verification re-ranking: the official Detect-to-Retrieve rule and a robust one that never hurts.

``method: official`` (paper reproduction) is described first; ``method: usac`` at the end.

For each candidate image: every QUERY descriptor finds its nearest neighbour among the candidate's descriptors
and becomes a putative match if their Euclidean distance is < ``descriptor_distance`` (strict, like the official
cKDTree ``distance_upper_bound``; several query features may match the same candidate feature). Fewer than
``min_matches`` putative matches (official: ≤ 3) → 0. Otherwise an affine model from candidate to query locations is
fitted by RANSAC on 3-point samples (``max_trials`` trials, inlier when the residual in query pixels is <
``residual_threshold``) and the score is the best inlier count. The official code calls skimage's ``ransac``; ours is
the numba kernel in ``d2r.kernels.ransac`` (same model, threshold and trial count, its own seeded sampler), which
always runs all trials and reports the best trial's count.

Re-ranking (``rerank``): the first ``num_to_rerank`` ranked ids that are not junk are verified and sorted by
(inliers, initial score) descending (ties keep their input order); everything else follows in its input order.
For a score-sorted input this is the official order except for where junk lands, which no metric sees.

``method: usac`` (the default for RootSIFT): tentative correspondences are MUTUAL nearest neighbours that pass
Lowe's ratio test (distance to the nearest < ``ratio`` × distance to the second nearest; Lowe 2004 uses 0.8);
an affine (or homography) model from candidate to query locations is fitted with OpenCV's USAC MAGSAC++
(``cv2.USAC_MAGSAC``, or ``USAC_ACCURATE``: LO-RANSAC with GC) and the score is its inlier count. The decision
rule treats inliers as evidence, not as a score: candidates with at least ``min_inliers`` inliers move above the
rest, ordered by inliers (ties by initial order); every other candidate keeps its initial order. An image without
enough geometric evidence is therefore never pushed down by one that merely has a few chance inliers, so with a
threshold above the chance level the initial ranking can only be refined. With ``fusion_weight`` λ > 0 the
verified candidates are instead ordered by the fused score s + λ·min(n, cap)/cap
(:func:`d2r.query.order.order_by_fused`).

``correspondences: hamming`` (with ``method: usac``) replaces the ratio-test correspondences by those of
Hamming embedding / ASMK*+SP (Jégou et al. 2008; Tolias et al. 2013): every pair of a query and a candidate
descriptor assigned to the same visual word (nearest centroid of the index's codebook) whose binary
signatures, sign(x − c_w), differ in at most ``floor(hamming · D)`` bits. Pairs are many-to-many, so the
score is the number of distinct query descriptors and of distinct candidate descriptors among the inliers,
whichever is smaller.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

from d2r._threads import numba_threads, one_blas_thread
from d2r.features.base import LocalFeatures
from d2r.kernels.ransac import ransac_affine_batch
from d2r.query import lightglue
from d2r.query.config import RerankConfig
from d2r.query.order import candidates as _candidates
from d2r.query.order import order_verified
from d2r.signatures import bit_threshold, cached_word_signatures, cached_word_signatures_many, \
    hamming_correspondences, word_signatures

log = logging.getLogger(__name__)

# Query rows per BLAS block in the nearest-neighbour search (bounds the float32 distance block).
_BLOCK_ROWS = 4096


def putative_matches(query_descriptors: np.ndarray, index_descriptors: np.ndarray, max_distance: float = 0.9):
    """Nearest index descriptor of each query descriptor, kept when closer than ``max_distance`` (strict).

    query_descriptors (Nq, D), index_descriptors (Ni, D) float32. Returns (query_ids, index_ids) int64 arrays,
    query_ids ascending. The neighbour is found with a float32 BLAS product; the kept distance is then recomputed in
    float64, so the threshold test matches an exact search. Either side empty → two empty arrays.
    """
    nq, ni = query_descriptors.shape[0], index_descriptors.shape[0]
    if nq == 0 or ni == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    x = np.ascontiguousarray(index_descriptors, dtype=np.float32)
    x_sq = np.einsum("ij,ij->i", x, x)
    nn = np.empty(nq, np.int64)
    for s in range(0, nq, _BLOCK_ROWS):
        q = np.ascontiguousarray(query_descriptors[s : s + _BLOCK_ROWS], dtype=np.float32)
        d = q @ x.T
        d *= np.float32(-2.0)
        d += x_sq
        nn[s : s + q.shape[0]] = np.argmin(d, axis=1)
    diff = query_descriptors.astype(np.float64) - index_descriptors[nn].astype(np.float64)
    keep = np.einsum("ij,ij->i", diff, diff) < float(max_distance) ** 2
    qi = np.flatnonzero(keep).astype(np.int64)
    return qi, nn[qi]


def _check_dim(query: LocalFeatures, cand: LocalFeatures, i: int) -> None:
    if len(query) and len(cand) and cand.dim != query.dim:
        raise ValueError(f"candidate {i}: descriptor dimension {cand.dim} differs from the query's {query.dim}")


def geometric_verification(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures],
    config: RerankConfig | None = None,
    codebook=None,
    query_words=None,
) -> np.ndarray:
    """Inlier count of each candidate against the query: int64 (len(candidates),).

    ``codebook``: the index's :class:`~d2r.codebook.Codebook`, needed (only) by ``correspondences: hamming``;
    ``query_words``: (N, ≥ m) int64, the query's nearest words already computed (nearest first), so the query is
    not assigned again (m = ``config.query_num_assignments``).

    Empty query or candidate features give 0. Deterministic: the same inputs give the same counts whatever the
    thread count or the order of the candidates. Runs on ``config.num_workers()`` threads with BLAS at one
    thread meanwhile (:mod:`d2r._threads`), so parallelise over queries by processes, or by threads that each
    run numba single-threaded (as :meth:`~d2r.engine.Engine.search_batch` does).
    """
    config = (config or RerankConfig()).check()
    candidates = list(candidates)
    n = len(candidates)
    if n == 0 or len(query) == 0:
        return np.zeros(n, np.int64)
    for i, c in enumerate(candidates):
        _check_dim(query, c, i)
    workers = config.num_workers()
    if config.method == "lightglue":
        return _verify_lightglue(query, candidates, config, workers)
    if config.method == "usac":
        if config.correspondences == "hamming":
            if codebook is None:
                raise ValueError("rerank.correspondences 'hamming' needs the index's codebook")
            if codebook.dim != query.dim:
                raise ValueError(f"codebook dimension {codebook.dim} differs from the query's {query.dim}")
            return _verify_hamming(query, candidates, config, workers, codebook, query_words)
        return _verify_usac(query, candidates, config, workers)

    def match(c: LocalFeatures):
        qi, ii = putative_matches(query.descriptors, c.descriptors, config.descriptor_distance)
        return c.locations[ii].astype(np.float64), query.locations[qi].astype(np.float64)

    t0 = time.perf_counter()
    pairs = _map(match, candidates, workers)
    t1 = time.perf_counter()
    sizes = np.array([p[0].shape[0] for p in pairs], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    src = np.concatenate([p[0] for p in pairs]).reshape(-1, 2)
    dst = np.concatenate([p[1] for p in pairs]).reshape(-1, 2)
    with numba_threads(workers):  # the RANSAC kernel's prange over pairs
        counts, _ = ransac_affine_batch(src, dst, offsets, int(config.max_trials),
                                        float(config.residual_threshold), np.uint64(config.seed),
                                        int(config.min_matches))
    log.debug("verified %d candidates: matching %.3fs, ransac %.3fs", n, t1 - t0, time.perf_counter() - t1)
    return counts


def _map(fn, items, workers: int) -> list:
    """``[fn(item) for item in items]`` on ``workers`` threads (numpy, OpenCV and the kernels release the GIL),
    BLAS held at one thread meanwhile so its pool does not compete with ours; one item or one worker runs on
    the calling thread, with no pool."""
    with one_blas_thread():
        if workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
                return list(pool.map(fn, items))
        return [fn(item) for item in items]


def verify_ids(query: LocalFeatures, ids, get_features: Callable[[object], LocalFeatures],
               config: RerankConfig | None = None, codebook=None, known: dict | None = None,
               query_words=None) -> dict:
    """Inlier counts ``{id: count}`` of ``ids`` against ``query``.

    get_features: id -> LocalFeatures of that database image, called (from ``config.num_workers()`` threads)
    for the ids not in ``known``. known: counts already computed for this query with this config (a pair's
    count depends on nothing else), reused and extended in place. codebook, query_words: as
    :func:`geometric_verification`."""
    config = (config or RerankConfig()).check()
    known = {} if known is None else known
    todo = [i for i in dict.fromkeys(ids) if i not in known]
    if todo and len(query) == 0:  # nothing to match: no candidate needs loading
        known.update((i, 0) for i in todo)
    elif todo:
        feats = _map(get_features, todo, config.num_workers())
        for k, f in enumerate(feats):
            if not isinstance(f, LocalFeatures):
                raise ValueError(f"rerank: get_features({todo[k]!r}) returned {type(f).__name__}, "
                                 "not LocalFeatures")
        counts = geometric_verification(query, feats, config, codebook, query_words)
        known.update(zip(todo, counts.tolist()))
    return {i: known[i] for i in ids}


def rerank(
    query: LocalFeatures,
    ranked_ids,
    scores,
    get_features: Callable[[object], LocalFeatures],
    config: RerankConfig | None = None,
    junk=None,
    codebook=None,
):
    """Re-rank one query's ranking by geometric verification (the verified stage of
    :func:`d2r.query.pipeline.search_query`, on a ranking you already have).

    Args:
        query: the query's local features (cropped to its box if it has one).
        ranked_ids: (L,) database ids, best first (ints or strings; whatever ``get_features`` takes).
        scores: (L,) initial similarity of each ranked id (aligned with ``ranked_ids``).
        get_features: id -> LocalFeatures of that database image; called only for the verified candidates.
        config: :class:`~d2r.query.config.RerankConfig` (``enabled`` False returns the input order).
        junk: ids never verified (the protocol's junk list); they keep their place among the unverified.
        codebook: the index's codebook (``correspondences: hamming`` only).

    Returns:
        (ids (L,), scores (L,) float64 — the initial scores in the new order (fused ones under
        ``fusion_weight``), inliers (L,) int64 with -1 for ids that were not verified). Empty input gives
        three empty arrays.
    """
    config = (config or RerankConfig()).check()
    ids = np.asarray(ranked_ids)
    sc = np.asarray(scores, dtype=np.float64)
    if ids.ndim != 1 or sc.shape != ids.shape:
        raise ValueError(f"rerank: ranked_ids and scores must be 1-D of equal length, got {ids.shape} and {sc.shape}")
    if ids.size == 0 or not config.enabled:
        return ids.copy(), sc.copy(), np.full(ids.shape[0], -1, np.int64)
    junk = () if junk is None else junk
    chosen = _candidates(ids, config.num_to_rerank, junk)
    counts = verify_ids(query, chosen, get_features, config, codebook)
    return order_verified(ids, sc, counts, config, junk)


# ---- method "usac" ---------------------------------------------------------------------------------------------
def mutual_ratio_matches(query_descriptors: np.ndarray, index_descriptors: np.ndarray, ratio: float = 0.8):
    """Tentative correspondences: mutual nearest neighbours passing Lowe's ratio test.

    query_descriptors (Nq, D), index_descriptors (Ni, D) float32, L2-normalised rows (squared distance
    2 − 2⟨q, x⟩). A pair (i, j) is kept when j is i's nearest neighbour, i is j's nearest neighbour, and
    d(i, j) < ratio · d(i, j2) with j2 i's second-nearest neighbour (with one index descriptor, no ratio test).
    Exact ties of similarity count as mutual for every tied query descriptor.
    Returns (query_ids, index_ids) int64, query_ids ascending; either side empty → two empty arrays.
    """
    nq, ni = query_descriptors.shape[0], index_descriptors.shape[0]
    if nq == 0 or ni == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q = np.ascontiguousarray(query_descriptors, dtype=np.float32)
    x = np.ascontiguousarray(index_descriptors, dtype=np.float32)
    dots = q @ x.T  # (nq, ni)
    rows = np.arange(nq)
    nn = np.argmax(dots, axis=1)
    best_f32 = dots[rows, nn]
    keep = best_f32 >= dots.max(axis=0)[nn]  # i is also j's nearest (a contiguous max, not a strided argmax)
    best = best_f32.astype(np.float64)
    if ni > 1:
        dots[rows, nn] = -np.inf
        second = dots.max(axis=1).astype(np.float64)
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
        keep &= d1 < float(ratio) * d2
    qi = np.flatnonzero(keep).astype(np.int64)
    return qi, nn[qi].astype(np.int64)


def fit_inliers(src: np.ndarray, dst: np.ndarray, config: RerankConfig) -> np.ndarray:
    """Inlier mask (n,) bool of a robust ``config.model`` fit src -> dst ((n, 2) pixel coordinates) with OpenCV
    USAC; fewer than ``config.min_matches`` (or than the minimal sample) matches, or no model → all False."""
    import cv2

    n = src.shape[0]
    minimal = 3 if config.model == "affine" else 4
    if n < max(config.min_matches, minimal):
        return np.zeros(n, bool)
    method = cv2.USAC_MAGSAC if config.estimator == "magsac" else cv2.USAC_ACCURATE
    a = np.ascontiguousarray(src, np.float32).reshape(-1, 1, 2)
    b = np.ascontiguousarray(dst, np.float32).reshape(-1, 1, 2)
    try:
        if config.model == "affine":
            model, mask = cv2.estimateAffine2D(a, b, method=method,
                                               ransacReprojThreshold=float(config.residual_threshold),
                                               maxIters=int(config.max_trials), confidence=0.999)
        else:
            model, mask = cv2.findHomography(a, b, method, float(config.residual_threshold),
                                             maxIters=int(config.max_trials), confidence=0.999)
    except cv2.error:  # degenerate configurations (all points equal, ...) are no evidence
        return np.zeros(n, bool)
    if model is None or mask is None:
        return np.zeros(n, bool)
    return mask.reshape(-1).astype(bool)


def verify_pair(query: LocalFeatures, cand: LocalFeatures, config: RerankConfig):
    """One pair with the "usac" method: (query_ids, index_ids) of the inlier correspondences, int64."""
    qi, ii = mutual_ratio_matches(query.descriptors, cand.descriptors, config.ratio)
    mask = fit_inliers(cand.locations[ii].astype(np.float64), query.locations[qi].astype(np.float64), config)
    return qi[mask], ii[mask]


def _verify_usac(query: LocalFeatures, candidates, config: RerankConfig, workers: int) -> np.ndarray:
    def one(c: LocalFeatures) -> int:
        if len(c) == 0:
            return 0
        return int(verify_pair(query, c, config)[0].shape[0])

    return _count_each(one, candidates, workers)


def _verify_lightglue(query: LocalFeatures, candidates, config: RerankConfig, workers: int) -> np.ndarray:
    """LightGlue matches (:mod:`d2r.query.lightglue`), then the "usac" model fit of each candidate."""
    matches = lightglue.lightglue_matches(query, candidates, config.lightglue, config.device)

    def one(k: int) -> int:
        qi, ii = matches[k]
        c = candidates[k]
        mask = fit_inliers(c.locations[ii].astype(np.float64), query.locations[qi].astype(np.float64), config)
        return int(mask.sum())

    return _count_each(one, list(range(len(candidates))), workers)


def _count_each(count, items, workers: int) -> np.ndarray:
    """``count(item)`` for every item, (len(items),) int64, on ``workers`` threads (:func:`_map`)."""
    return np.asarray(_map(count, items, workers), np.int64)


def _verify_hamming(query: LocalFeatures, candidates, config: RerankConfig, workers: int,
                    codebook, query_words=None) -> np.ndarray:
    bits = bit_threshold(config.hamming, codebook.dim)
    m = int(config.query_num_assignments)
    if query_words is None:
        qw, qs = cached_word_signatures(query.descriptors, codebook, m)
    else:
        qw, qs = word_signatures(query.descriptors, codebook, m, assignments=query_words)
    found = cached_word_signatures_many([c.descriptors for c in candidates], codebook)
    parts = [(c, cw, cs) for c, (cw, cs) in zip(candidates, found)]

    def one(part) -> int:
        c, cw, cs = part
        if len(c) == 0:
            return 0
        qi, ii = hamming_correspondences(qw, qs, cw, cs, bits)
        qi //= m  # assignment row -> query descriptor
        mask = fit_inliers(c.locations[ii].astype(np.float64), query.locations[qi].astype(np.float64), config)
        return min(np.unique(qi[mask]).size, np.unique(ii[mask]).size)

    return _count_each(one, parts, workers)
