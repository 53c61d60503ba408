"""The :class:`Detections` record every detector and region proposer returns, and shared box helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Detections:
    """Boxes found in one image, best first.

    Attributes:
        boxes: (B, 4) float32 [x1, y1, x2, y2] in pixels of the image given to ``detect`` (integer-valued for
            the official detectors: min corner floored, max corner ceiled). Not clipped to the image: the
            region stage clips and drops degenerate boxes.
        scores: (B,) float32 confidence in [0, 1].
        classes: (B,) int64 class index (detector class; grid level for the grid proposer; 1 otherwise).

    No box: B = 0 (``Detections.empty()``).
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self):
        b = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if self.boxes.shape != (b, 4):
            raise ValueError(f"Detections: boxes must be (B, 4) for B={b} scores, got {self.boxes.shape}")
        if self.scores.shape != (b,) or self.classes.shape != (b,):
            raise ValueError(
                f"Detections: scores/classes must be ({b},), got {self.scores.shape} / {self.classes.shape}")

    @classmethod
    def create(cls, boxes, scores, classes=None) -> "Detections":
        """Build a record with the documented dtypes (classes default to 1)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if classes is None:
            classes = np.ones(scores.shape[0], np.int64)
        classes = np.asarray(classes).reshape(-1).astype(np.int64)
        return cls(np.ascontiguousarray(boxes), np.ascontiguousarray(scores), np.ascontiguousarray(classes))

    @classmethod
    def empty(cls) -> "Detections":
        return cls.create(np.zeros((0, 4)), np.zeros(0))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, index) -> "Detections":
        """Subset by boolean mask or integer index array (order kept)."""
        return Detections(self.boxes[index].reshape(-1, 4), self.scores[index], self.classes[index])


def normalized_to_pixels(boxes, height: int, width: int) -> np.ndarray:
    """Normalised [ymin, xmin, ymax, xmax] (TF Object Detection API) -> pixel [x1, y1, x2, y2] float32.

    Official rounding (D2R box extraction): x1 = floor(xmin·W), y1 = floor(ymin·H), x2 = ceil(xmax·W),
    y2 = ceil(ymax·H). As in the official code (float32 detector outputs times Python ints), each product is
    rounded to float32 before floor/ceil: e.g. ymax = float32(0.1), H = 50 gives y2 = 5, not 6.
    NaN/inf coordinates stay NaN/inf (the region stage drops them). (0, 4) input gives (0, 4).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w, h = np.float32(width), np.float32(height)
    with np.errstate(invalid="ignore", over="ignore"):
        out = np.stack(
            [np.floor(b[:, 1] * w), np.floor(b[:, 0] * h), np.ceil(b[:, 3] * w), np.ceil(b[:, 2] * h)], axis=1
        )
    return out.astype(np.float32)


def sanitize_boxes(boxes, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Make pixel boxes safe to crop: snap outwards to whole pixels, clip to the image, drop unusable ones.

    A box is dropped when a coordinate is NaN/inf, or when, after clipping to [0, W] × [0, H], it has zero or
    negative area (this includes boxes entirely outside the image and boxes given as x2 < x1).

    Returns:
        (kept (K, 4) float32 integer-valued [x1, y1, x2, y2] with 0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H,
         index (K,) int64 of the kept boxes in the input, in input order).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(b).all(axis=1)
    out = np.zeros_like(b)
    if finite.any():
        f = b[finite]
        x1 = np.clip(np.floor(f[:, 0]), 0, width)
        y1 = np.clip(np.floor(f[:, 1]), 0, height)
        x2 = np.clip(np.ceil(f[:, 2]), 0, width)
        y2 = np.clip(np.ceil(f[:, 3]), 0, height)
        out[finite] = np.stack([x1, y1, x2, y2], axis=1)
    keep = finite & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    index = np.flatnonzero(keep).astype(np.int64)
    return out[index].astype(np.float32), index


def select_top(detections: Detections, score_threshold: float | None, max_boxes: int | None) -> Detections:
    """Keep boxes with score >= ``score_threshold`` (official: inclusive), best ``max_boxes`` first.

    Sorting is stable by descending score, so a detector that already orders its output (the TF Object
    Detection API does) keeps its order and the official box numbering. NaN scores never pass.
    """
    scores = detections.scores
    keep = np.isfinite(scores)
    if score_threshold is not None:
        # float32 comparison, like the official np.float32 score >= Python float
        keep &= scores.astype(np.float32) >= np.float32(score_threshold)
    index = np.flatnonzero(keep)
    index = index[np.argsort(-scores[index], kind="stable")]
    if max_boxes is not None:
        index = index[: max(int(max_boxes), 0)]
    return detections.select(index)


def check_max_boxes(max_boxes) -> int | None:
    if max_boxes is None:
        return None
    if isinstance(max_boxes, bool) or not float(max_boxes).is_integer() or max_boxes < 0:
        raise ValueError(f"max_boxes must be a non-negative integer or None, got {max_boxes!r}")
    return int(max_boxes)


def check_fraction(name: str, value, low_open: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or v > 1 or (low_open and v == 0):
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value!r}")
    return v


def as_image(image, name: str = "image") -> np.ndarray:
    """Validate an image for detection: (H, W, 3) or (H, W) (grayscale, repeated to 3 channels) uint8."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected shape (H, W, 3) or (H, W), got {image.shape}")
    return image
