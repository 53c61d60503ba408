"""Local features: the :class:`LocalFeatures` record and the extractors that produce it."""

from d2r.features.base import LocalFeatures, RegionFeatures

__all__ = ["LocalFeatures", "RegionFeatures"]
