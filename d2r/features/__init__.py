"""Local features: the :class:`LocalFeatures` record, image loading, the extractors and the feature store.

TensorFlow is imported only when a DELF model is built or loaded.
"""

from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.features.image import ImageError, list_images, load_image
from d2r.features.pca import PCA
from d2r.features.rootsift import RootSIFT, RootSIFTConfig
from d2r.features.config import EXTRACTORS, FeaturesConfig, build_extractor, extractor_info, get_extractor
from d2r.features.delf import DELF, DELFConfig
from d2r.features.store import FeatureStore, extract_to_store

__all__ = [
    "LocalFeatures", "RegionFeatures", "ImageError", "load_image", "list_images", "PCA", "RootSIFT",
    "RootSIFTConfig", "DELF", "DELFConfig", "FeatureStore", "extract_to_store", "get_extractor", "EXTRACTORS",
    "FeaturesConfig", "build_extractor", "extractor_info",
]
