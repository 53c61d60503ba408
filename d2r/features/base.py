"""The record every local-feature extractor returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """Local features of one image (or one region crop).

    Attributes:
        locations: (N, 2) float32 keypoint centres as (x, y) in ORIGINAL-image pixels (column, row). The
            official DELF files store (y, x); importers swap them.
        scales: (N,) float32 scale of each feature (DELF: 1 / the image scale it came from, the official file
            convention; SIFT: keypoint size).
        scores: (N,) float32 strength (DELF attention score, SIFT detector response).
        descriptors: (N, D) float32, L2-normalised rows unless the extractor documents otherwise.

    An image with no features (smaller than 10×10, blank, ...) has N = 0 with the extractor's D.
    """

    locations: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self):
        n = self.descriptors.shape[0]
        if self.descriptors.ndim != 2:
            raise ValueError(f"descriptors: expected (N, D), got shape {self.descriptors.shape}")
        if self.locations.shape != (n, 2):
            raise ValueError(f"locations: expected ({n}, 2), got {self.locations.shape}")
        if self.scales.shape != (n,) or self.scores.shape != (n,):
            raise ValueError(f"scales/scores: expected ({n},), got {self.scales.shape} / {self.scores.shape}")

    @classmethod
    def empty(cls, dim: int) -> "LocalFeatures":
        z = np.zeros(0, np.float32)
        return cls(np.zeros((0, 2), np.float32), z, z.copy(), np.zeros((0, dim), np.float32))

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def select(self, index) -> "LocalFeatures":
        """Subset by boolean mask or integer index array (order kept)."""
        return LocalFeatures(self.locations[index], self.scales[index], self.scores[index], self.descriptors[index])

    @staticmethod
    def concatenate(parts, dim: int) -> "LocalFeatures":
        """Concatenate features region by region (e.g. whole image, then each box)."""
        parts = list(parts)
        if not parts:
            return LocalFeatures.empty(dim)
        return LocalFeatures(
            np.concatenate([p.locations for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p.scales for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p.scores for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p.descriptors for p in parts]).astype(np.float32, copy=False).reshape(-1, dim),
        )


@dataclass(frozen=True, eq=False)
class RegionFeatures:
    """Local features of an image described region by region (the index side of detect-to-retrieve).

    Regions are the whole image (box id -1) first, then each selected box, in that order. ``features`` holds
    every region's features concatenated region by region, ``counts[r]`` of them for region r (zeros allowed),
    which is exactly what ``Aggregator(..., regions=counts)`` and the database's regional-search mode take.

    Attributes:
        features: LocalFeatures, concatenated region by region; locations are in ORIGINAL-image pixels.
        counts: (R,) int64 number of features of each region.
        boxes: (R, 4) float32 [x1, y1, x2, y2] pixel boxes; the whole image is [0, 0, W, H].
        box_ids: (R,) int64 index of the box in the detector/proposer output, -1 for the whole image.
        box_scores: (R,) float32 detector score of each box (1.0 for the whole image).
    """

    features: LocalFeatures
    counts: np.ndarray
    boxes: np.ndarray
    box_ids: np.ndarray
    box_scores: np.ndarray

    def __post_init__(self):
        r = self.counts.shape[0]
        if self.boxes.shape != (r, 4) or self.box_ids.shape != (r,) or self.box_scores.shape != (r,):
            raise ValueError(f"RegionFeatures: inconsistent shapes for {r} regions")
        if int(self.counts.sum()) != len(self.features):
            raise ValueError(f"RegionFeatures: counts sum to {int(self.counts.sum())}, features has {len(self.features)}")

    @property
    def num_regions(self) -> int:
        return int(self.counts.shape[0])

    def region(self, r: int) -> LocalFeatures:
        start = int(self.counts[:r].sum())
        return self.features.select(slice(start, start + int(self.counts[r])))


def whole_image(features) -> LocalFeatures:
    """The whole-image features of a stored item: LocalFeatures as they are; for RegionFeatures the region
    with box id -1 (the first region by convention; region 0 if none is marked). The one rule d2r uses."""
    if isinstance(features, RegionFeatures):
        whole = np.flatnonzero(np.asarray(features.box_ids) == -1)
        return features.region(int(whole[0]) if whole.size else 0)
    return features
