"""RootSIFT (Arandjelović & Zisserman 2012): OpenCV SIFT → L1 → element-wise sqrt → optional PCA.

The weight-free default extractor. Output rows are non-negative with unit L2 norm (sqrt of an L1-normalised
non-negative vector); with PCA they are L2 → PCA → L2 like DELF. Deterministic: keypoints are sorted by
(response desc, y, x, size, angle) before the top ``max_features`` are kept, so the thread count OpenCV uses
does not change the result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from d2r.config import Config
from d2r.features.base import LocalFeatures
from d2r.features.image import load_image, resize_max_side
from d2r.features.pca import PCA, load_pca

MIN_SIDE = 10


@dataclass
class RootSIFTConfig(Config):
    """RootSIFT options. ``max_side``: the image is downscaled so its longer side is at most this
    (None: never); locations are mapped back to original pixels. SIFT thresholds are OpenCV's defaults."""

    max_features: int = 1000
    max_side: int | None = 1024
    contrast_threshold: float = 0.04
    edge_threshold: float = 10.0
    sigma: float = 1.6
    n_octave_layers: int = 3
    pca_dim: int = 128  # used only when a PCA is given
    upright: bool = False  # gravity-vector assumption (Perdoch et al. 2009): orientation 0, one per keypoint
    affine_simulation: bool = False  # ASIFT (Morel & Yu 2009): cv2.AffineFeature views, OpenCV's tilt grid
    # ASIFT: drop keypoints closer (px) to a stronger kept one (0: keep all). √2 px, one pixel's diagonal: the
    # same point found in several simulated views (round 4 of benchmarks/results/dev_results.md)
    affine_min_distance: float = 2 ** 0.5

    def __post_init__(self):
        if self.upright and self.affine_simulation:
            raise ValueError("upright and affine_simulation cannot both be set (ASIFT simulates rotations)")
        if not self.affine_min_distance >= 0:
            raise ValueError(f"affine_min_distance must be >= 0, got {self.affine_min_distance}")
        if self.max_features <= 0:
            raise ValueError(f"max_features must be positive, got {self.max_features}")
        if self.max_side is not None and self.max_side < MIN_SIDE:
            raise ValueError(f"max_side must be >= {MIN_SIDE} or None, got {self.max_side}")
        for name in ("n_octave_layers", "pca_dim"):  # 0: OpenCV's assertion / an empty PCA on every image
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def rootsift(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """SIFT (N, 128) → RootSIFT float32: L1-normalise, sqrt (rows stay non-negative, unit L2)."""
    d = np.asarray(descriptors, dtype=np.float64)
    d = np.maximum(d, 0.0)
    s = d.sum(axis=1, keepdims=True)
    return np.sqrt(d / np.maximum(s, eps)).astype(np.float32)


def spread_keypoints(points: np.ndarray, order: np.ndarray, radius: float, limit: int) -> np.ndarray:
    """Greedy suppression: walk ``order`` (indices into ``points`` (N, 2) x, y, strongest first), keep a point
    unless a kept one lies closer than ``radius``; stop at ``limit`` kept. Returns kept indices (int64)."""
    grid: dict[tuple[int, int], list[int]] = {}
    kept = []
    r2 = radius * radius
    for i in order:
        x, y = points[i]
        cx, cy = int(x // radius), int(y // radius)
        near = any((points[j, 0] - x) ** 2 + (points[j, 1] - y) ** 2 < r2
                   for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in grid.get((cx + dx, cy + dy), ()))
        if not near:
            kept.append(i)
            grid.setdefault((cx, cy), []).append(i)
            if len(kept) == limit:
                break
    return np.asarray(kept, dtype=np.int64)


class RootSIFT:
    """``RootSIFT(config=None, pca=None, **overrides).extract(image) -> LocalFeatures``.

    ``image``: anything :func:`d2r.features.load_image` takes. Result: locations (N, 2) float32 (x, y) in
    ORIGINAL pixels, scales = SIFT keypoint size in original pixels, scores = detector response, descriptors
    (N, 128) float32 (or (N, pca_dim) with PCA), strongest first, N <= max_features. Images smaller than
    10×10 or without keypoints give N = 0.
    """

    name = "rootsift"
    default_workers = 2  # OpenCV releases the GIL: threads over images help

    def __init__(self, config: RootSIFTConfig | None = None, pca: PCA | str | None = None, **overrides):
        config = config or RootSIFTConfig()
        if overrides:
            config = config.replace(**overrides)
        self.pca = load_pca(pca, dim=config.pca_dim)
        if self.pca is not None and self.pca.dim != config.pca_dim:
            config = config.replace(pca_dim=self.pca.dim)  # a PCA object carries its own dimension
        self.config = config

    @property
    def dim(self) -> int:
        return self.pca.dim if self.pca is not None else 128

    def info(self) -> dict:
        """What a feature store or codebook records about this extractor."""
        return {"name": self.name, "config": self.config.to_dict(), "fingerprint": self.fingerprint(),
                "dim": self.dim}

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        config = self.config.to_dict()
        # Options left off: the fingerprint of stores and codebooks made before they existed.
        if not config["affine_simulation"]:
            del config["affine_min_distance"]  # used only by ASIFT
        for key in ("upright", "affine_simulation", "affine_min_distance"):
            if key in config and not config[key]:
                del config[key]
        h.update(json.dumps({"name": self.name, "config": config}, sort_keys=True).encode())
        if self.pca is not None:
            h.update(self.pca.fingerprint().encode())
        return h.hexdigest()[:16]

    def _sift(self):
        import cv2

        c = self.config
        return cv2.SIFT_create(
            nfeatures=0,
            nOctaveLayers=c.n_octave_layers,
            contrastThreshold=c.contrast_threshold,
            edgeThreshold=c.edge_threshold,
            sigma=c.sigma,
        )

    def extract(self, image) -> LocalFeatures:
        import cv2

        rgb = load_image(image)
        h, w = rgb.shape[:2]
        if h < MIN_SIDE or w < MIN_SIDE:
            return LocalFeatures.empty(self.dim)
        small = rgb if self.config.max_side is None else resize_max_side(rgb, self.config.max_side)
        sx = small.shape[1] / w
        sy = small.shape[0] / h
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        sift = self._sift()
        if self.config.affine_simulation:
            # Descriptors come from each simulated view, so detect and describe together, then cap.
            kps, desc = cv2.AffineFeature_create(sift).detectAndCompute(gray, None)
        else:
            kps, desc = sift.detect(gray, None), None
        if not kps:
            return LocalFeatures.empty(self.dim)
        attrs = np.array([(k.response, k.pt[1], k.pt[0], k.size, k.angle) for k in kps], dtype=np.float64)
        order = np.lexsort((attrs[:, 4], attrs[:, 3], attrs[:, 2], attrs[:, 1], -attrs[:, 0]))
        if self.config.upright:
            # Orientation duplicates share response, position and size and are adjacent in this order.
            a = attrs[order, :4]
            order = order[np.r_[True, np.any(a[1:] != a[:-1], axis=1)]]
        if self.config.affine_simulation and self.config.affine_min_distance > 0:
            order = spread_keypoints(attrs[:, [2, 1]], order, self.config.affine_min_distance,
                                     self.config.max_features)
        order = order[: self.config.max_features]
        kps = [kps[i] for i in order]
        if desc is not None:
            desc = desc[order]
        else:
            if self.config.upright:
                for k in kps:
                    k.angle = 0.0
            kps, desc = sift.compute(gray, kps)
        if desc is None or not kps:
            return LocalFeatures.empty(self.dim)
        desc = np.asarray(desc, dtype=np.float32)
        keep = desc.sum(axis=1) > 0
        pts = np.array([k.pt for k in kps], dtype=np.float64).reshape(-1, 2)
        size = np.array([k.size for k in kps], dtype=np.float64)
        resp = np.array([k.response for k in kps], dtype=np.float64)
        # OpenCV pixel centres sit at integer coordinates: x_orig + 0.5 = (x_small + 0.5) / s.
        loc = np.stack([(pts[:, 0] + 0.5) / sx - 0.5, (pts[:, 1] + 0.5) / sy - 0.5], axis=1)
        scales = size / np.sqrt(sx * sy)
        d = rootsift(desc[keep])
        if self.pca is not None:
            d = self.pca.transform(d)
        return LocalFeatures(
            loc[keep].astype(np.float32),
            scales[keep].astype(np.float32),
            resp[keep].astype(np.float32),
            np.ascontiguousarray(d, dtype=np.float32),
        )

    __call__ = extract

    def __repr__(self) -> str:
        return f"RootSIFT({self.config!r}, pca={self.pca!r})"
