"""Configuration of the region stage (index side): which boxes, and how their features are computed."""

from __future__ import annotations

import dataclasses

from d2r.config import Config
from pathlib import Path
from d2r.detect.base import check_max_boxes
from d2r.detect.proposers import PROPOSERS
from d2r.detect.proposers import PROPOSERS, get_proposer


@dataclasses.dataclass
class RegionsConfig(Config):
    """Region stage options (official values where the official code has one).

    Attributes:
        proposer: "none" (whole image only), "grid", "density", or a detector SavedModel directory (official:
            the D2R Faster R-CNN detector, ``d2r_frcnn_20190411``).
        score_threshold: detectors only: keep boxes with score >= this (official 0.1).
        max_boxes: at most this many boxes per image; None: every box the proposer keeps (official).
        reextract: crop each box and re-extract features on it (official); False assigns whole-image
            features to boxes by keypoint location (faster, see :mod:`d2r.detect.regions`).
        options: extra keyword arguments of the grid / density proposer (e.g. ``{"levels": 2}``).
    """
    proposer: str = "none"
    score_threshold: float = 0.1
    max_boxes: int | None = None
    reextract: bool = True
    options: dict = dataclasses.field(default_factory=dict)

    def build_proposer(self):
        """Instantiate the configured proposer (a SavedModel path loads TensorFlow)."""
        kwargs = dict(self.options)
        name = str(self.proposer)
        if name.lower() == "none":
            return get_proposer("none")
        if name.lower() in PROPOSERS:
            if self.max_boxes is not None:
                kwargs.setdefault("max_boxes", self.max_boxes)
            return get_proposer(name, **kwargs)
        return get_proposer(name, score_threshold=self.score_threshold, max_boxes=self.max_boxes, **kwargs)


def check_regions(regions) -> None:
    """ValueError naming ``regions.proposer`` when it is neither none/grid/density nor a SavedModel folder, or
    ``regions.max_boxes`` when it is not a count (checked when the proposer is built: after the folder)."""
    try:
        check_max_boxes(regions.max_boxes)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"regions.{exc}") from None
    name = str(regions.proposer)
    if name.lower() == "none" or name.lower() in PROPOSERS:
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"regions.proposer: {name!r} is neither one of {sorted({'none', *PROPOSERS})} "
                         f"nor a detector SavedModel folder")
    if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
        raise ValueError(f"regions.proposer: {path} is not a SavedModel folder (no saved_model.pb)")
