"""Landmark box detectors exported with the TensorFlow Object Detection API, loaded by path.

Two export flavours are understood:

* TF1 SavedModels addressed by tensor name, like the official D2R detectors (``d2r_frcnn_20190411``,
  ``d2r_mnetssd_20190411``): input ``input_images:0`` uint8 [1, H, W, 3]; outputs ``detection_boxes:0``
  [1, N, 4] normalised [ymin, xmin, ymax, xmax], ``detection_scores:0`` [1, N], ``detection_classes:0`` [1, N]
  and optionally ``num_detections:0`` [1] (the names the official ``delf`` detector wrapper feeds and
  fetches). Classic TF1 OD API exports whose input is ``image_tensor:0`` work the same way.
* TF2 OD API exports: the ``serving_default`` signature with one image input (``input_tensor``, uint8
  [1, H, W, 3]) returning a dict with the same ``detection_*`` keys.

TensorFlow is imported only when a detector is built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from d2r.detect.base import Detections, as_image, check_max_boxes, normalized_to_pixels, select_top

logger = logging.getLogger(__name__)

#: Input tensor names tried, in order, on TF1 graphs (official D2R detectors first).
INPUT_TENSORS = ("input_images:0", "image_tensor:0")
_OUTPUTS = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


class SavedModelDetector:
    """Run an Object Detection API SavedModel on one image and return pixel boxes.

    Args:
        path: SavedModel directory (holding ``saved_model.pb``).
        score_threshold: keep boxes with score >= this (the official D2R index extraction uses >= 0.1).
        max_boxes: keep at most this many boxes (best first); None keeps all (as the official code, whose
            detectors return at most 100 boxes anyway).

    Outputs past ``num_detections`` (when the model has it) are padding and ignored; the official wrapper does
    not fetch it, but OD API padding has score 0, so the selected boxes are the same.
        signature: signature to call on models without the TF1 tensor names (default ``serving_default``).

    Raises:
        ValueError: the path is not a SavedModel, or the model has neither the TF1 input tensor nor the
            signature.
    """

    uses_features = False

    def __init__(self, path, score_threshold: float = 0.1, max_boxes: int | None = 100,
                 signature: str = "serving_default"):
        self.path = Path(path)
        self.score_threshold = float(score_threshold)
        self.max_boxes = check_max_boxes(max_boxes)
        self.signature = signature
        if not (self.path / "saved_model.pb").is_file() and not (self.path / "saved_model.pbtxt").is_file():
            raise ValueError(f"{self.path}: not a SavedModel directory (no saved_model.pb)")
        import tensorflow as tf

        self._tf = tf
        try:
            model = tf.saved_model.load(str(self.path))
        except Exception as exc:  # TF raises many types for corrupt models
            raise ValueError(f"{self.path}: cannot load SavedModel ({type(exc).__name__}: {exc})") from exc
        self._model = model  # keeps variables alive
        self._fn, self._input_key, self._input_dtype = self._bind(model)
        self.mode = "tensors" if self._input_key is None else "signature"
        logger.info("loaded detector %s (%s)", self.path, self.mode)

    def _bind(self, model):
        graph = getattr(model, "graph", None)
        if graph is not None and hasattr(model, "prune"):  # TF1 SavedModel: feed/fetch tensors by name
            names = {op.name for op in graph.get_operations()}
            for feed in INPUT_TENSORS:
                if feed.split(":")[0] in names:
                    fetches = [f"{o}:0" for o in _OUTPUTS if o in names]
                    missing = {"detection_boxes", "detection_scores"} - {f.split(":")[0] for f in fetches}
                    if missing:
                        raise ValueError(f"{self.path}: graph has {feed} but no {sorted(missing)} tensor")
                    dtype = graph.get_tensor_by_name(feed).dtype
                    pruned = model.prune(feed, fetches)
                    keys = [f.split(":")[0] for f in fetches]

                    def run(batch, _pruned=pruned, _keys=keys):
                        return dict(zip(_keys, _pruned(batch)))

                    return run, None, dtype
        signatures = getattr(model, "signatures", {})
        if self.signature not in signatures:
            raise ValueError(
                f"{self.path}: no input tensor {' / '.join(INPUT_TENSORS)} "
                f"and no '{self.signature}' signature "
                f"(signatures: {sorted(signatures)})"
            )
        fn = signatures[self.signature]
        _, kwargs = fn.structured_input_signature
        if not kwargs:
            raise ValueError(f"{self.path}: signature '{self.signature}' takes no named input")
        key = "input_tensor" if "input_tensor" in kwargs else sorted(kwargs)[0]
        if len(kwargs) > 1 and key != "input_tensor":
            raise ValueError(f"{self.path}: signature '{self.signature}' has inputs {sorted(kwargs)}, "
                             "expected one image input (input_tensor)")
        return (lambda batch, _fn=fn, _k=key: _fn(**{_k: batch})), key, kwargs[key].dtype

    def detect(self, image) -> Detections:
        """Detect boxes in ``image`` ((H, W, 3) or (H, W) uint8 RGB).

        Returns Detections in pixels of ``image`` (official rounding), score >= threshold, best first, at most
        ``max_boxes``. An image with no pixels gives no boxes.
        """
        image = as_image(image)
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            return Detections.empty()
        tf = self._tf
        batch = tf.constant(image[None])
        if self._input_dtype != tf.uint8:
            batch = tf.cast(batch, self._input_dtype)
        out = self._fn(batch)
        boxes = np.asarray(out["detection_boxes"]).reshape(-1, 4)
        scores = np.asarray(out["detection_scores"]).reshape(-1)
        if "detection_classes" in out:
            classes = np.asarray(out["detection_classes"]).reshape(-1)
        else:
            classes = np.ones(scores.shape[0])
        n = scores.shape[0]
        if boxes.shape[0] != n or classes.shape[0] != n:
            raise ValueError(f"{self.path}: detector returned {boxes.shape[0]} boxes, {n} scores, "
                             f"{classes.shape[0]} classes")
        if "num_detections" in out:
            n = min(n, int(np.asarray(out["num_detections"]).reshape(-1)[0]))
        classes = np.nan_to_num(classes[:n].astype(np.float64), nan=-1).round().astype(np.int64)
        dets = Detections.create(normalized_to_pixels(boxes[:n], h, w), scores[:n], classes)
        return select_top(dets, self.score_threshold, self.max_boxes)

    def __repr__(self) -> str:
        return (f"SavedModelDetector({str(self.path)!r}, score_threshold={self.score_threshold}, "
                f"max_boxes={self.max_boxes})")
