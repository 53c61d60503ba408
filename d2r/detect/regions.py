"""Regions of an image (whole image + boxes) described by local features, and the region -> image mapping.

Official detect-to-retrieve semantics (index side): regions = whole image (box id -1) then each selected box,
in detector order; each box is CROPPED and the local features are re-extracted on the crop. We shift crop
keypoints back to original-image pixels (the official .delf files keep crop coordinates).

Cheaper option (``reextract=False``): run the extractor once and give each box the whole-image features whose
keypoint lies inside it (a keypoint may belong to several boxes). Trade-off: one extraction instead of 1 + B,
but features near a box border were computed with context from outside the box, and the detector's scale
normalisation is lost (a crop is resized by scale-space / DELF's image pyramid as a new image; whole-image
features only exist at the scales chosen for the whole image), so regional descriptors differ from the
official ones.

Failures: boxes with NaN/inf coordinates, or zero/negative area once clipped to the image (e.g. entirely
outside it), are dropped and counted (``dropped_boxes``, log warning); other boxes are clipped. A proposer
that raises on an image leaves that image with its whole-image region only: the error is logged as a warning
and recorded in ``detector_error`` (None when detection succeeded). Extractor errors are not caught.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from d2r.detect.base import Detections, sanitize_boxes
from d2r.features.base import LocalFeatures, RegionFeatures
from d2r._io import write_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ImageRegions(RegionFeatures):
    """:class:`RegionFeatures` plus what the region stage did (usable wherever RegionFeatures is expected).

    Attributes (besides RegionFeatures'):
        detector_error: None, or "<ExceptionType>: <message>" when the proposer failed on this image (the
            record then holds the whole-image region only).
        dropped_boxes: number of proposer boxes dropped as degenerate (NaN/inf, empty after clipping).
        timings: seconds spent per step: "extract" (all extractor calls), "detect".
    """
    detector_error: str | None = None
    dropped_boxes: int = 0
    timings: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.detector_error is not None


def _shift(features: LocalFeatures, dx: float, dy: float) -> LocalFeatures:
    loc = features.locations.astype(np.float32, copy=True)
    loc += np.array([dx, dy], np.float32)
    return LocalFeatures(loc, features.scales, features.scores, features.descriptors)


def _detect(proposer, image, whole: LocalFeatures) -> Detections:
    if getattr(proposer, "uses_features", False):
        dets = proposer.detect(image, features=whole)
    else:
        dets = proposer.detect(image)
    if not isinstance(dets, Detections):
        raise TypeError(
            f"{type(proposer).__name__}.detect returned {type(dets).__name__}, expected Detections")
    return dets


def extract_regions(image, extractor, proposer=None, reextract: bool = True,
                    name: str = "image") -> ImageRegions:
    """Describe ``image`` region by region: whole image first, then each box of ``proposer``.

    Args:
        image: (H, W) or (H, W, C) array as the extractor takes it (RGB uint8 for d2r extractors).
        extractor: any object with ``extract(image) -> LocalFeatures`` and ``dim``.
        proposer: detector or proposer (``detect(image) -> Detections``; proposers with ``uses_features`` get
            the whole-image features as ``features=``), or None for the whole image only.
        reextract: True (official): crop each box (clipped pixel box) and run the extractor on the crop,
            locations shifted back to image pixels; False: assign whole-image features to boxes by keypoint
            location, a keypoint (x, y) belonging to box [x1, y1, x2, y2] when x1 <= x < x2 and y1 <= y < y2.
        name: used in log messages.

    Returns:
        ImageRegions (a RegionFeatures): R = 1 + kept boxes; boxes (R, 4) float32 with [0, 0, W, H] first;
        box_ids = index of the box in the proposer's Detections (-1 for the whole image; equal to the official
        box numbering unless boxes were dropped); box_scores (1.0 for the whole image). Regions without
        features have count 0.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or 0 in image.shape[:2]:
        shape = getattr(image, "shape", None)
        raise ValueError(
            f"{name}: expected a non-empty (H, W[, C]) image array, got {type(image).__name__} {shape}")
    h, w = int(image.shape[0]), int(image.shape[1])
    dim = int(extractor.dim)
    t0 = time.perf_counter()
    whole = extractor.extract(image)
    t_extract = time.perf_counter() - t0

    error, dropped = None, 0
    boxes = np.zeros((0, 4), np.float32)
    ids = np.zeros(0, np.int64)
    scores = np.zeros(0, np.float32)
    t0 = time.perf_counter()
    if proposer is not None:
        try:
            dets = _detect(proposer, image, whole)
        except Exception as exc:  # one bad image must not kill a batch: keep the whole image, report
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("%s: detector failed, whole-image region only (%s)", name, error)
        else:
            boxes, ids = sanitize_boxes(dets.boxes, w, h)
            scores = dets.scores[ids].astype(np.float32)
            dropped = len(dets) - len(ids)
            if dropped:
                logger.warning("%s: dropped %d of %d boxes (NaN/inf or empty after clipping to %dx%d)",
                               name, dropped, len(dets), w, h)
    t_detect = time.perf_counter() - t0

    parts = [whole]
    t0 = time.perf_counter()
    if reextract:
        for x1, y1, x2, y2 in boxes.astype(np.int64):
            crop = np.ascontiguousarray(image[y1:y2, x1:x2])
            parts.append(_shift(extractor.extract(crop), x1, y1))
    else:
        x, y = whole.locations[:, 0], whole.locations[:, 1]
        for x1, y1, x2, y2 in boxes:
            parts.append(whole.select((x >= x1) & (x < x2) & (y >= y1) & (y < y2)))
    t_extract += time.perf_counter() - t0

    for p in parts:
        if len(p) and p.dim != dim:
            raise ValueError(f"{name}: extractor returned D={p.dim}, its dim says {dim}")
    return ImageRegions(
        features=LocalFeatures.concatenate(parts, dim),
        counts=np.array([len(p) for p in parts], np.int64),
        boxes=np.concatenate([np.array([[0, 0, w, h]], np.float32), boxes]),
        box_ids=np.concatenate([np.array([-1], np.int64), ids]),
        box_scores=np.concatenate([np.ones(1, np.float32), scores]),
        detector_error=error,
        dropped_boxes=int(dropped),
        timings={"extract": t_extract, "detect": t_detect},
    )


@dataclass(frozen=True, eq=False)
class RegionTable:
    """Region -> image mapping over a list of images (the official ``index_mapping.csv``), plus boxes.

    Row i describes region i in the order regions are stored (image by image, whole image first).

    Attributes:
        names: (M,) str region name: the image id for the whole image, "<image_id>_<box_id>" for a box
            (official .delf file naming).
        image_index: (M,) int64 position of the image in the list (official ``index_image_id``).
        image_ids: (M,) str image id of each region.
        box_ids: (M,) int64, -1 for the whole image.
        boxes: (M, 4) float32 [x1, y1, x2, y2] pixels.
        box_scores: (M,) float32.
    """
    names: np.ndarray
    image_index: np.ndarray
    image_ids: np.ndarray
    box_ids: np.ndarray
    boxes: np.ndarray
    box_scores: np.ndarray

    def __len__(self) -> int:
        return int(self.names.shape[0])

    def to_csv(self, path=None) -> str:
        """Official mapping CSV (header ``name,index_image_id,box_id``); written atomically if ``path``."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["name", "index_image_id", "box_id"])
        for row in zip(self.names, self.image_index, self.box_ids):
            writer.writerow([row[0], int(row[1]), int(row[2])])
        text = buf.getvalue()
        if path is not None:
            write_bytes(path, text.encode())
        return text


def region_table(image_ids, region_features_list) -> RegionTable:
    """Build the :class:`RegionTable` of images ``image_ids`` described by ``region_features_list``.

    Args:
        image_ids: sequence of image ids (str; other values are converted with ``str``).
        region_features_list: sequence of RegionFeatures, one per image, same length.

    Empty lists give an empty table. Raises ValueError when the lengths differ.
    """
    image_ids = [str(i) for i in image_ids]
    records = list(region_features_list)
    if len(image_ids) != len(records):
        raise ValueError(f"region_table: {len(image_ids)} image ids but {len(records)} RegionFeatures")
    names, index, ids, box_ids, boxes, scores = [], [], [], [], [], []
    for i, (image_id, rf) in enumerate(zip(image_ids, records)):
        for b in rf.box_ids.tolist():
            names.append(image_id if b == -1 else f"{image_id}_{b}")
        index.append(np.full(rf.num_regions, i, np.int64))
        ids.extend([image_id] * rf.num_regions)
        box_ids.append(rf.box_ids.astype(np.int64))
        boxes.append(rf.boxes.astype(np.float32).reshape(-1, 4))
        scores.append(rf.box_scores.astype(np.float32))
    return RegionTable(
        names=np.array(names, dtype=str),
        image_index=np.concatenate(index) if index else np.zeros(0, np.int64),
        image_ids=np.array(ids, dtype=str),
        box_ids=np.concatenate(box_ids) if box_ids else np.zeros(0, np.int64),
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        box_scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
    )
