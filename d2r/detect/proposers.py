"""Weight-free region proposers with the detector interface (``detect(image) -> Detections``).

For users without a trained landmark detector (and to measure whether regions help without one):

* :class:`GridProposer` — R-MAC-style multi-scale grid of overlapping squares (Tolias et al., ICLR 2016).
* :class:`DensityProposer` — boxes around dense clusters of strong keypoints.
* :class:`NoProposer` — no boxes (regions = whole image only).

:func:`get_proposer` maps a config string ("grid", "density", "none" or a SavedModel path) to an instance.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from d2r.detect.base import Detections, as_image, check_fraction, check_max_boxes
from d2r.detect.savedmodel import SavedModelDetector


def grid_positions(length: int, side: int, overlap: float) -> np.ndarray:
    """Left (or top) coordinates of squares of ``side`` px tiling a side of ``length`` px.

    Our rule: the fewest evenly spaced squares, the first flush with 0 and the last flush with ``length``,
    such that consecutive squares overlap by at least ``overlap`` of their side:
    n = 1 + ceil((length - side) / (side · (1 - overlap))); positions floor(i · (length - side) / (n - 1)),
    i = 0..n-1 (0 <= overlap < 1).
    """
    span = length - side
    if span <= 0:
        return np.zeros(1, np.int64)
    n = 1 + math.ceil(span / (side * (1.0 - overlap)) - 1e-9)
    return np.floor(np.arange(n) * (span / (n - 1)) + 1e-9).astype(np.int64)


class GridProposer:
    """Multi-scale grid of overlapping square regions, as in R-MAC (Tolias, Sicre, Jégou 2016).

    At level l = 1..``levels`` the squares have side floor(2·min(W, H) / (l + 1)) (level 1: the largest square
    that fits) and are placed along each side by :func:`grid_positions` with ``overlap`` (R-MAC: ~40%); on the
    short side this gives l squares at level l (50% overlap), on the long side as many as the overlap needs.
    Order: level by level, then row by row (top to bottom, left to right). Squares of side < ``min_side`` px
    are skipped, and with ``skip_full`` a square equal to the whole image is left out (the whole image is
    always region 0 anyway).

    Scores are 1.0, classes the level. ``max_boxes`` keeps the first boxes in that order (None: all).
    """
    uses_features = False

    def __init__(self, levels: int = 3, overlap: float = 0.4, min_side: int = 8, skip_full: bool = True,
                 max_boxes: int | None = None):
        if isinstance(levels, bool) or int(levels) != levels or levels < 1:
            raise ValueError(f"levels must be a positive integer, got {levels!r}")
        if not 0 <= float(overlap) < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
        if int(min_side) < 1:
            raise ValueError(f"min_side must be >= 1, got {min_side!r}")
        self.levels = int(levels)
        self.overlap = float(overlap)
        self.min_side = int(min_side)
        self.skip_full = bool(skip_full)
        self.max_boxes = check_max_boxes(max_boxes)

    def boxes_for_size(self, width: int, height: int) -> Detections:
        """The grid for an image of ``width`` × ``height`` pixels (no pixels needed)."""
        boxes, levels = [], []
        m = min(width, height)
        for level in range(1, self.levels + 1):
            side = (2 * m) // (level + 1)
            if side < self.min_side or side < 1:
                continue
            xs = grid_positions(width, side, self.overlap)
            ys = grid_positions(height, side, self.overlap)
            for y in ys:
                for x in xs:
                    if self.skip_full and side == width and side == height:
                        continue
                    boxes.append((x, y, x + side, y + side))
                    levels.append(level)
        if self.max_boxes is not None:
            boxes, levels = boxes[: self.max_boxes], levels[: self.max_boxes]
        return Detections.create(np.array(boxes, np.float32).reshape(-1, 4), np.ones(len(boxes)), levels)

    def detect(self, image) -> Detections:
        image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(f"image: expected shape (H, W[, C]), got {image.shape}")
        return self.boxes_for_size(int(image.shape[1]), int(image.shape[0]))

    def __repr__(self) -> str:
        return f"GridProposer(levels={self.levels}, overlap={self.overlap}, max_boxes={self.max_boxes})"


class DensityProposer:
    """Boxes around dense clusters of strong keypoints (deterministic, weight-free).

    1. Take the ``num_keypoints`` strongest keypoints (by score): those of ``features`` when given (reuses an
       extractor's output), else OpenCV SIFT keypoints of the image (detector response as score).
    2. Count them on a coarse grid (``grid`` cells along the longer side) and mark the cells whose count, and
       whose count summed over the 3×3 neighbourhood, are both >= ``density_factor`` × their mean over the
       grid (the neighbourhood sum discards isolated busy cells).
    3. Each 8-connected component of marked cells holding >= ``min_keypoints`` strong keypoints gives one box:
       the bounding box of its keypoints, grown by ``margin`` × its size (at least half a cell) on every side,
       clipped to the image and snapped outwards to whole pixels.
    4. Boxes smaller than ``min_area_fraction`` or larger than ``max_area_fraction`` of the image are dropped;
       score = fraction of the strong keypoints inside the component (in [0, 1]); best ``max_boxes`` first.

    No keypoints, or a uniform spread of them, gives no boxes. Classes are 1.
    """
    uses_features = True

    def __init__(self, grid: int = 16, num_keypoints: int = 1000, density_factor: float = 2.0,
                 min_keypoints: int = 10, margin: float = 0.1, min_area_fraction: float = 0.02,
                 max_area_fraction: float = 0.8, max_boxes: int | None = 5):
        if int(grid) < 2:
            raise ValueError(f"grid must be >= 2, got {grid!r}")
        if int(num_keypoints) < 1 or int(min_keypoints) < 1:
            raise ValueError(
                f"num_keypoints and min_keypoints must be >= 1, got {num_keypoints}, {min_keypoints}")
        if not float(density_factor) > 0:
            raise ValueError(f"density_factor must be > 0, got {density_factor!r}")
        if not 0 <= float(margin) <= 10:
            raise ValueError(f"margin must be in [0, 10], got {margin!r}")
        self.grid = int(grid)
        self.num_keypoints = int(num_keypoints)
        self.density_factor = float(density_factor)
        self.min_keypoints = int(min_keypoints)
        self.margin = float(margin)
        self.min_area_fraction = check_fraction("min_area_fraction", min_area_fraction)
        self.max_area_fraction = check_fraction("max_area_fraction", max_area_fraction, low_open=True)
        self.max_boxes = check_max_boxes(max_boxes)

    def _keypoints(self, image):
        import cv2

        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        kps = cv2.SIFT_create(nfeatures=self.num_keypoints).detect(np.ascontiguousarray(gray), None)
        loc = np.array([k.pt for k in kps], np.float64).reshape(-1, 2)
        return loc, np.array([k.response for k in kps], np.float64)

    def detect(self, image, features=None) -> Detections:
        """Boxes for ``image`` ((H, W[, 3]) uint8); ``features`` (its LocalFeatures) skips detection."""
        image = np.asarray(image)
        if image.ndim not in (2, 3):
            raise ValueError(f"image: expected shape (H, W[, C]), got {image.shape}")
        h, w = int(image.shape[0]), int(image.shape[1])
        if h == 0 or w == 0:
            return Detections.empty()
        if features is None:
            loc, score = self._keypoints(as_image(image))
        else:
            loc = np.asarray(features.locations, np.float64).reshape(-1, 2)
            score = np.asarray(features.scores, np.float64).reshape(-1)
        return self.boxes_from_keypoints(loc, score, w, h)

    def boxes_from_keypoints(self, locations, scores, width: int, height: int) -> Detections:
        """The proposer's steps 1-4 on given (N, 2) (x, y) keypoint locations and (N,) scores."""
        import cv2

        loc = np.asarray(locations, np.float64).reshape(-1, 2)
        scores = np.asarray(scores, np.float64).reshape(-1)
        ok = np.isfinite(loc).all(axis=1) & np.isfinite(scores)
        ok &= (loc[:, 0] >= 0) & (loc[:, 0] < width) & (loc[:, 1] >= 0) & (loc[:, 1] < height)
        loc, scores = loc[ok], scores[ok]
        if loc.shape[0] > self.num_keypoints:
            top = np.argsort(-scores, kind="stable")[: self.num_keypoints]
            loc = loc[np.sort(top)]
        n = loc.shape[0]
        if n < self.min_keypoints:
            return Detections.empty()
        cell = max(width, height) / self.grid
        gw, gh = max(1, math.ceil(width / cell)), max(1, math.ceil(height / cell))
        cx = np.minimum((loc[:, 0] / cell).astype(np.int64), gw - 1)
        cy = np.minimum((loc[:, 1] / cell).astype(np.int64), gh - 1)
        counts = np.zeros((gh, gw), np.float64)
        np.add.at(counts, (cy, cx), 1.0)
        padded = np.pad(counts, 1)
        smooth = sum(padded[dy:dy + gh, dx:dx + gw] for dy in range(3) for dx in range(3))
        f = self.density_factor
        dense = (smooth >= f * smooth.mean()) & (counts >= f * counts.mean())
        num, labels = cv2.connectedComponents(dense.astype(np.uint8), connectivity=8)
        point_label = labels[cy, cx]
        image_area = float(width) * float(height)
        boxes, box_scores = [], []
        for lab in range(1, num):
            pts = loc[point_label == lab]
            if pts.shape[0] < self.min_keypoints:
                continue
            (x1, y1), (x2, y2) = pts.min(axis=0), pts.max(axis=0)
            grow_x = max(self.margin * (x2 - x1), cell / 2)
            grow_y = max(self.margin * (y2 - y1), cell / 2)
            box = (
                max(0.0, math.floor(x1 - grow_x)), max(0.0, math.floor(y1 - grow_y)),
                min(float(width), math.ceil(x2 + grow_x)), min(float(height), math.ceil(y2 + grow_y)),
            )
            area = (box[2] - box[0]) * (box[3] - box[1])
            if not self.min_area_fraction * image_area <= area <= self.max_area_fraction * image_area:
                continue
            boxes.append(box)
            box_scores.append(pts.shape[0] / n)
        order = np.argsort(-np.array(box_scores), kind="stable")
        if self.max_boxes is not None:
            order = order[: self.max_boxes]
        boxes = np.array(boxes, np.float32).reshape(-1, 4)[order]
        return Detections.create(boxes, np.array(box_scores, np.float32)[order])

    def __repr__(self) -> str:
        return (f"DensityProposer(grid={self.grid}, num_keypoints={self.num_keypoints}, "
                f"max_boxes={self.max_boxes})")


class NoProposer:
    """No boxes: every image is described by its whole-image region only."""
    uses_features = False

    def detect(self, image) -> Detections:
        return Detections.empty()

    def __repr__(self) -> str:
        return "NoProposer()"


#: Proposers by name (the list of what exists, in one place); a SavedModel path selects SavedModelDetector.
PROPOSERS = {"grid": GridProposer, "density": DensityProposer, "none": NoProposer}


def get_proposer(name_or_path, **kwargs):
    """Build a proposer from a config value: "grid", "density", "none", or a SavedModel directory.

    ``kwargs`` go to the constructor (e.g. ``score_threshold`` for a detector, ``levels`` for the grid).
    An object that already has ``detect`` is returned as is (kwargs must then be empty).

    Raises:
        ValueError: unknown name (the message lists the known ones) or a path that is not a directory.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        if hasattr(name_or_path, "detect") and not kwargs:
            return name_or_path
        raise ValueError(f"proposer: expected a name or a SavedModel path, got {type(name_or_path).__name__}")
    key = os.fspath(name_or_path)
    if key.lower() in PROPOSERS:
        return PROPOSERS[key.lower()](**kwargs)
    path = Path(key).expanduser()
    if path.is_dir():
        return SavedModelDetector(path, **kwargs)
    raise ValueError(
        f"unknown proposer {key!r}: expected one of {sorted(PROPOSERS)} or a SavedModel directory")
