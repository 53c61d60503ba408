"""Landmark boxes and regions: official detector SavedModels, weight-free region proposers, region extraction.

Importing this package does not import TensorFlow (``SavedModelDetector`` imports it when built).
"""

from d2r.detect.base import Detections, normalized_to_pixels, sanitize_boxes
from d2r.detect.config import RegionsConfig
from d2r.detect.proposers import PROPOSERS, DensityProposer, GridProposer, NoProposer, get_proposer
from d2r.detect.regions import ImageRegions, RegionTable, extract_regions, region_table
from d2r.detect.savedmodel import SavedModelDetector

__all__ = [
    "Detections",
    "DensityProposer",
    "GridProposer",
    "ImageRegions",
    "NoProposer",
    "PROPOSERS",
    "RegionTable",
    "RegionsConfig",
    "SavedModelDetector",
    "extract_regions",
    "get_proposer",
    "normalized_to_pixels",
    "region_table",
    "sanitize_boxes",
]
