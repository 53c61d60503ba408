"""The pipeline shared by :class:`~d2r.engine.Engine`, the benchmark runner (:mod:`d2r.bench`) and the demo.

:class:`Pipeline` holds one config's extractor and region proposer and runs the steps in one place: index-side
extraction (whole image + regions), the one extraction loop into a feature store (threads, batches, failures
reported per image), codebook training on a store, and building / filling a database.

Everything that can be wrong with a configuration is checked here, before an image is read or a folder is
created: :func:`check_setup` builds the extractor (a wrong model path or a typo in ``features.options`` fails
here), checks the region source and loads the codebook, checking it against the features (dimension, feature
type, PCA).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2r.codebook import Codebook
from d2r.features.base import LocalFeatures, RegionFeatures, whole_image

log = logging.getLogger(__name__)

# A codebook is trained on at least this many descriptors per word (k-means on fewer mostly memorises them).
MIN_DESCRIPTORS_PER_WORD = 4


def _config_class(name: str):
    if name == "rootsift":
        from d2r.features.rootsift import RootSIFTConfig

        return RootSIFTConfig
    if name in ("aliked", "disk"):  # their config modules import no torch
        from d2r.features.aliked import ALIKEDConfig
        from d2r.features.disk import DISKConfig

        return ALIKEDConfig if name == "aliked" else DISKConfig
    from d2r.features.delf import DELFConfig

    return DELFConfig


def build_extractor(features):
    """The extractor of a ``FeaturesConfig``; ValueError naming the option for an unknown name, a model path
    that is not a SavedModel folder, a missing PCA folder, or an unknown / mistyped ``features.options``
    key."""
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
    if name in ("aliked", "disk") and features.model is not None \
            and not Path(features.model).expanduser().is_file():
        raise ValueError(f"features.model: {features.model} is not a file (a {name} .pth weights file)")
    if features.pca is not None and not Path(features.pca).expanduser().exists():
        raise ValueError(f"features.pca: {features.pca} not found")
    try:
        return get_extractor(name, model=features.model, pca=features.pca, **features.options)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"features: cannot build the {name} extractor: {exc}") from None


def check_regions(regions) -> None:
    """ValueError naming ``regions.proposer`` when it is neither none/grid/density nor a SavedModel folder, or
    ``regions.max_boxes`` when it is not a count (checked when the proposer is built: after the folder)."""
    from d2r.detect.base import check_max_boxes
    from d2r.detect.proposers import PROPOSERS

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


def pca_fingerprint(extractor) -> str | None:
    """Fingerprint of the PCA the extractor applies, None without one."""
    pca = getattr(extractor, "pca", None)
    use = getattr(getattr(extractor, "config", None), "use_pca", True)
    return pca.fingerprint() if pca is not None and use else None


def feature_type(extractor) -> str:
    """The feature type a codebook records and is checked against: the extractor's name, or its variant where
    variants are different descriptor spaces (``aliked-n16``, ``aliked-n32``)."""
    return getattr(extractor, "feature_type", extractor.name)


def codebook_metadata(extractor, trainset: str) -> dict:
    """What a codebook trained on this extractor's features records (checked by :func:`fit_codebook`)."""
    meta = {"feature": feature_type(extractor), "trainset": trainset, "feature_fingerprint": extractor.fingerprint()}
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
        check_codebook(book, dim=extractor.dim, feature=feature_type(extractor), pca_fingerprint=pca)
        if pca is None and book.metadata.get("pca_fingerprint") is not None:
            raise ValueError(f"codebook {book.fingerprint} was trained after PCA "
                             f"{book.metadata['pca_fingerprint']}, the features use no PCA")
    except ValueError as exc:
        raise ValueError(f"{source}: does not fit the {feature_type(extractor)} features ({exc})") from None
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


# ---- the pipeline ------------------------------------------------------------------------------------------
class Pipeline:
    """Features → codebook → database for one :class:`~d2r.engine.EngineConfig` (or ``BenchConfig``).

    Args:
        config: the resolved config (``features``, ``regions``, ``codebook``, ``index``, ``batch_size``,
            ``workers``).
        extractor: an already built (checked) extractor; default: built from ``config.features`` when used.
        progress: show tqdm bars.
    """

    def __init__(self, config, extractor=None, progress: bool = True):
        self.config = config
        self.progress = progress
        self._extractor = extractor
        self._proposer = None

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = build_extractor(self.config.features)
        return self._extractor

    @property
    def proposer(self):
        """The index-side region proposer, None for whole images only."""
        if self._proposer is None and str(self.config.regions.proposer).lower() != "none":
            self._proposer = self.config.regions.build_proposer()
        return self._proposer

    @property
    def workers(self) -> int:
        return max(1, int(self.config.workers))

    @property
    def batch_size(self) -> int:
        return max(1, int(self.config.batch_size))

    def store_info(self) -> dict:
        """What a feature store records about the extractor."""
        from d2r.features.store import _extractor_info

        return _extractor_info(self.extractor)

    # ---- extraction ----------------------------------------------------------------------------------------
    def extract(self, image, name: str | None = None) -> LocalFeatures | RegionFeatures:
        """Index-side features of one image (path, array or PIL image): the whole image, plus its regions
        (re-extracted per ``config.regions``) when a proposer is configured."""
        from d2r.features.image import load_image

        pixels = load_image(image)
        if self.proposer is None:
            return self.extractor.extract(pixels)
        from d2r.detect.regions import extract_regions

        return extract_regions(pixels, self.extractor, self.proposer, reextract=self.config.regions.reextract,
                               name=name or str(image))

    def extract_query(self, image, bbox=None, name: str = "query") -> LocalFeatures:
        """Query-side features: the whole image or its crop to ``bbox`` = (x1, y1, x2, y2); never regions."""
        from d2r.features.image import load_image

        pixels = load_image(image)
        if bbox is not None:
            pixels = crop(pixels, bbox, name=name)
        return self.extractor.extract(pixels)

    def extract_into(self, store, todo, fn=None, on_image=None, on_batch=None,
                     desc: str = "extracting") -> dict:
        """The one extraction loop: features of ``todo`` = [(image_id, source)] into ``store``.

        ``fn(image_id, source)`` computes one image's features (default :meth:`extract`); a failure never
        stops the loop. ``config.workers`` threads; the store is flushed every ``config.batch_size`` images,
        then ``on_batch()`` runs (an interruption keeps every flushed batch).
        ``on_image(image_id, source, error)`` runs after each image (``error`` None when extracted, else
        ``"Type: message"``).
        Returns ``{"extracted": n, "failed": n}``."""
        fn = fn or (lambda image_id, source: self.extract(source, name=str(image_id)))

        def work(item):
            try:
                return item, fn(*item), None
            except Exception as exc:  # one bad image never kills the batch: record why and go on
                return item, None, f"{type(exc).__name__}: {exc}"

        counts = {"extracted": 0, "failed": 0}
        bar = progress_bar(len(todo), desc, self.progress)
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start:start + self.batch_size]
                    for (image_id, source), feats, error in pool.map(work, batch):
                        if error is None:
                            store.add(image_id, feats)
                            counts["extracted"] += 1
                        else:
                            log.warning("%s: %s", source, error)
                            counts["failed"] += 1
                        if on_image is not None:
                            on_image(image_id, source, error)
                        bar.update(1)
                    store.flush()
                    if on_batch is not None:
                        on_batch()
        finally:
            bar.close()
        return counts

    def extract_to_store(self, path, pairs, fn=None, desc: str = "extracting") -> dict:
        """Resumable extraction of ``pairs`` into the store at ``path`` (created or reopened): images already
        there are skipped, failures are recorded in its ``failures.json`` and skipped next time. Returns
        ``{"images", "extracted", "skipped", "failed", "seconds", "store"}``."""
        import time

        from d2r.features.store import FeatureStore

        t0 = time.perf_counter()
        store = FeatureStore.create(path, self.store_info())  # shards roll over by size
        try:
            todo = [(i, p) for i, p in pairs if i not in store and i not in store.failures]

            def record(image_id, source, error):
                if error is not None:
                    store.add_failure(image_id, error)

            counts = self.extract_into(store, todo, fn=fn, on_image=record, desc=desc)
        finally:
            store.close()
        return {"images": len(pairs), **counts, "skipped": len(pairs) - len(todo),
                "seconds": round(time.perf_counter() - t0, 3), "store": str(store.path)}

    # ---- codebook and database -----------------------------------------------------------------------------
    def train_codebook(self, store, trainset: str) -> Codebook:
        """A codebook trained with ``config.codebook`` on a sample of the store's (whole-image) descriptors;
        ValueError when there are fewer than K × :data:`MIN_DESCRIPTORS_PER_WORD` of them."""
        from d2r.train import sample_descriptors, train_codebook

        c = self.config.codebook
        x, _ = sample_descriptors(store, per_image=c.sample_per_image, max_total=c.max_samples, seed=c.seed,
                                  progress=self.progress)
        check_training_size(x.shape[0], c.size)
        book, _ = train_codebook(x, c.size, iterations=c.iterations, method=c.method, seed=c.seed,
                                 progress=self.progress, metadata=codebook_metadata(self.extractor, trainset))
        return book

    def create_database(self, path, codebook: Codebook):
        """A new database at ``path`` with ``config.index`` (the DatabaseConfig, passed whole)."""
        from d2r.index.database import Database

        return Database.create(path, codebook, **self.config.index.to_dict())

    def fill_database(self, db, store, ids, on_batch=None, save_every: int | None = None,
                      desc: str = "indexing") -> None:
        """Add ``ids`` (in order) from the store to ``db``, region by region, saving after every
        ``save_every`` images (default ``config.batch_size``); ``on_batch(ids)`` runs once a batch is
        saved."""
        bar = progress_bar(len(ids), desc, self.progress)
        every = max(1, int(save_every or self.batch_size))

        def items(batch):
            for image_id in batch:
                f = store.get(image_id)
                if isinstance(f, RegionFeatures):
                    yield image_id, f.features.descriptors, f.counts
                else:
                    yield image_id, f.descriptors, None

        try:
            for start in range(0, len(ids), every):
                batch = list(ids[start:start + every])
                db.add_batch(items(batch))
                db.save()
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(batch)
        finally:
            bar.close()


def crop(pixels: np.ndarray, bbox, name: str = "image") -> np.ndarray:
    """Crop (H, W, 3) pixels to ``bbox`` = (x1, y1, x2, y2), rounded to whole pixels and clipped to the image.
    A box that is malformed or does not overlap the image raises ValueError naming the image."""
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: bbox must be four numbers x1,y1,x2,y2, got {bbox!r}") from None
    h, w = pixels.shape[:2]
    if not all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        raise ValueError(f"{name}: bbox {bbox} is empty or not finite (need x1 < x2, y1 < y2)")
    c = [max(0, int(round(x1))), max(0, int(round(y1))), min(w, int(round(x2))), min(h, int(round(y2)))]
    if c[2] <= c[0] or c[3] <= c[1]:
        raise ValueError(f"{name}: bbox {bbox} lies outside the {w}x{h} image")
    return np.ascontiguousarray(pixels[c[1]:c[3], c[0]:c[2]])


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, progress: bool, unit: str = "img"):
    """A tqdm bar, or a do-nothing one when ``progress`` is off or there is nothing to do."""
    if not progress or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


__all__ = ["Pipeline", "check_setup", "build_extractor", "check_regions", "fit_codebook",
           "check_training_size",
           "codebook_metadata", "pca_fingerprint", "crop", "whole_image", "progress_bar",
           "MIN_DESCRIPTORS_PER_WORD"]
