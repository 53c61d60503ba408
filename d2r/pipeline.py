"""The pipeline steps shared by :class:`~d2r.engine.Engine`, the benchmark runner and the demo.

Everything that can be wrong with a configuration is checked here, before an image is read or a folder created:
:func:`check_setup` builds the extractor (a wrong model path or a typo in ``features.options`` fails here), checks
the region source and loads the codebook, checking it against the features (dimension, feature type, PCA).
"""

from __future__ import annotations

import logging
from pathlib import Path

from d2r.codebook import Codebook

log = logging.getLogger(__name__)

# A codebook is trained on at least this many descriptors per word (k-means on fewer mostly memorises them).
MIN_DESCRIPTORS_PER_WORD = 4


def _config_class(name: str):
    if name == "rootsift":
        from d2r.features.rootsift import RootSIFTConfig

        return RootSIFTConfig
    from d2r.features.delf import DELFConfig

    return DELFConfig


def build_extractor(features):
    """The extractor of a ``FeaturesConfig``; ValueError naming the option for an unknown name, a model path
    that is not a SavedModel folder, a missing PCA folder, or an unknown / mistyped ``features.options`` key."""
    from d2r.features import EXTRACTORS, get_extractor

    name = str(features.name).lower()
    if name not in EXTRACTORS:
        raise ValueError(f"features.name: unknown extractor {features.name!r}; known: {list(EXTRACTORS)}")
    _config_class(name).from_dict(dict(features.options), _where="features.options.")
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
    if features.pca is not None and not Path(features.pca).expanduser().exists():
        raise ValueError(f"features.pca: {features.pca} not found")
    try:
        return get_extractor(name, model=features.model, pca=features.pca, **features.options)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"features: cannot build the {name} extractor: {exc}") from None


def check_regions(regions) -> None:
    """ValueError naming ``regions.proposer`` when it is neither none/grid/density nor a SavedModel folder."""
    from d2r.detect.proposers import PROPOSERS

    name = str(regions.proposer)
    if name.lower() == "none" or name.lower() in PROPOSERS:
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"regions.proposer: {name!r} is neither one of {['none', *sorted(PROPOSERS)]} "
                         f"nor a detector SavedModel folder")
    if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
        raise ValueError(f"regions.proposer: {path} is not a SavedModel folder (no saved_model.pb)")


def pca_fingerprint(extractor) -> str | None:
    """Fingerprint of the PCA the extractor applies, None without one."""
    pca = getattr(extractor, "pca", None)
    use = getattr(getattr(extractor, "config", None), "use_pca", True)
    return pca.fingerprint() if pca is not None and use else None


def codebook_metadata(extractor, trainset: str) -> dict:
    """What a codebook trained on this extractor's features records about them (checked by :func:`fit_codebook`)."""
    meta = {"feature": extractor.name, "trainset": trainset, "feature_fingerprint": extractor.fingerprint()}
    pca = pca_fingerprint(extractor)
    if pca is not None:
        meta["pca_fingerprint"] = pca
    return meta


def fit_codebook(book, extractor, what: str = "codebook") -> Codebook:
    """Load ``book`` (a :class:`Codebook` or a ``.npz`` path) and check it fits the extractor's features
    (dimension, feature type, PCA fingerprint, via :func:`d2r.train.check_codebook`); ValueError naming it."""
    from d2r.train import check_codebook

    source = what if isinstance(book, Codebook) else f"{what} {book}"
    if not isinstance(book, Codebook):
        book = Codebook.load(book)
    try:
        pca = pca_fingerprint(extractor)
        check_codebook(book, dim=extractor.dim, feature=extractor.name, pca_fingerprint=pca)
        if pca is None and book.metadata.get("pca_fingerprint") is not None:
            raise ValueError(f"codebook {book.fingerprint} was trained after PCA "
                             f"{book.metadata['pca_fingerprint']}, the features use no PCA")
    except ValueError as exc:
        raise ValueError(f"{source}: does not fit the {extractor.name} features ({exc})") from None
    return book


def check_setup(config, codebook=None):
    """Validate a whole ``EngineConfig`` (or ``BenchConfig``) before any image is touched or folder created.

    Returns ``(extractor, codebook or None)``; ``codebook`` (a Codebook or a path) overrides
    ``config.codebook.path``. Raises ValueError / FileNotFoundError naming the option or file."""
    config.check()
    extractor = build_extractor(config.features)
    check_regions(config.regions)
    book = codebook if codebook is not None else config.codebook.path
    if book is not None:
        book = fit_codebook(book, extractor, "--codebook" if codebook is not None else "codebook.path")
    return extractor, book


def check_training_size(n_descriptors: int, k: int, option: str = "--codebook-size") -> None:
    """Refuse to train K words from fewer than K × :data:`MIN_DESCRIPTORS_PER_WORD` descriptors (ValueError
    suggesting a smaller ``option``)."""
    need = int(k) * MIN_DESCRIPTORS_PER_WORD
    if n_descriptors < need:
        raise ValueError(
            f"{n_descriptors} training descriptors are too few for K={k} words (need at least {need}, "
            f"{MIN_DESCRIPTORS_PER_WORD} per word); add more images, or pass a smaller {option} "
            f"(at most {max(1, n_descriptors // MIN_DESCRIPTORS_PER_WORD)})")
