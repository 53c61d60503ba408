"""Building an index: extraction into stores, and the pipeline shared by :class:`~d2r.engine.Engine`, the
benchmark runner (:mod:`d2r.bench`) and the demo.

Extraction, for every entry point (``d2r extract``, ``Engine.index``, ``d2r bench``, ``train-codebook
--images``, ``tools/build_codebook_recipe.py``, the Ray workers of :mod:`d2r.distributed`), is:

- :func:`d2r.features.image.listed_images` (and :func:`~d2r.features.image.list_images`, one image per id):
  the input (a folder, a list file, paths, ``(id, source)`` pairs) as ``(image_id, source)`` pairs;
- :func:`d2r.features.extract.extract_image`: the per-image worker (the whole image, plus its regions when a
  proposer is given);
- :func:`d2r.features.extract.extract_each`: the loop (threads or serial, results in input order, progress, a
  failure recorded per image, never fatal);
- here, :func:`extract_into`: the loop into a store, flushed every ``batch_size`` images (an interruption
  keeps every flushed batch), and :func:`extract_to_store`, the resumable ``d2r extract`` on top.

Everything that can be wrong with a configuration is checked here, before an image is read or a folder is
created: :func:`check_setup` builds the extractor (a wrong model path or a typo in ``features.options`` fails
here), checks the region source and loads the codebook, checking it against the features (dimension, feature
type, PCA); :func:`check_codebook_plan` refuses a codebook that the training sample cannot give.
"""

from __future__ import annotations

import inspect
import logging
import os
import time

from d2r._log import progress_bar
from d2r.codebook import Codebook, train_codebook
from d2r.codebook.codebook import MIN_DESCRIPTORS_PER_WORD, check_training_size, codebook_metadata
from d2r.codebook.codebook import fit_codebook
from d2r.codebook.kmeans import image_quota, sample_descriptors
from d2r.detect.config import check_regions
from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.features.config import build_extractor, extractor_info
from d2r.features.extract import extract_each, extract_image, failure_line
from d2r.features.image import crop, list_images, load_image
from d2r.features.store import DEFAULT_SHARD_BYTES, FeatureStore
from d2r.index.database import Database

log = logging.getLogger(__name__)


def check_setup(config, codebook=None):
    """Validate a whole ``EngineConfig`` (or ``BenchConfig``) before any image is touched or folder created.

    Returns ``(extractor, codebook or None)``; ``codebook`` (a Codebook or a path) overrides
    ``config.codebook.path``. Without a codebook, one must be trainable (:func:`check_codebook_plan`).
    Raises ValueError / FileNotFoundError naming the option or file."""
    config.check()
    extractor = build_extractor(config.features)
    check_regions(config.regions)
    book = codebook if codebook is not None else config.codebook.path
    if book is not None:
        book = fit_codebook(book, extractor, "--codebook" if codebook is not None else "codebook.path")
    else:
        check_codebook_plan(config.codebook, extractor)
    return extractor, book


def check_codebook_plan(codebook, extractor=None, images: int | None = None, option: str = "codebook.size",
                        samples_option: str = "codebook.max_samples") -> None:
    """Refuse, before any image is read, a codebook (the ``codebook`` section, ``size`` K) that its training
    sample cannot give: K × :data:`MIN_DESCRIPTORS_PER_WORD` descriptors are needed, and at most
    ``max_samples`` are drawn, at most ``sample_per_image`` (and the extractor's ``max_features``) of each of
    ``images`` images when their number is known. ValueError naming ``option`` (the size), or
    ``samples_option`` when the cap on samples is what is too small, and the bound."""
    k, need = int(codebook.size), int(codebook.size) * MIN_DESCRIPTORS_PER_WORD
    bound = int(codebook.max_samples)
    why, fix = f"{samples_option} is {codebook.max_samples}", f"a larger {samples_option}"
    if images is not None:
        per = image_quota(codebook.sample_per_image, codebook.max_samples, images)
        cap = getattr(getattr(extractor, "config", None), "max_features", None)
        per = min(per, int(cap)) if isinstance(cap, int) else per
        if images * per < bound:
            bound, fix = images * per, "more images"
            why = f"{images} image(s) give at most {per} descriptors each"
    if bound < need:
        most = max(1, bound // MIN_DESCRIPTORS_PER_WORD)
        raise ValueError(f"{option} {k}: training K={k} words needs at least {need} descriptors "
                         f"({MIN_DESCRIPTORS_PER_WORD} per word), but {why} (at most {bound}); pass a "
                         f"smaller {option} (at most {most}) or {fix}")


# ---- the loop into a store -------------------------------------------------------------------------------
def extract_into(store, todo, fn, *, workers: int = 1, batch_size: int | None = None, on_image=None,
                 on_batch=None, progress: bool = True, desc: str = "extracting") -> dict:
    """:func:`extract_each` into ``store`` (anything with ``add(image_id, features)``, and ``flush()`` when
    ``batch_size`` is given): each image's features are added with ``source=`` its path when the store's
    ``add`` takes one; the store is flushed every ``batch_size`` images and at the end, then ``on_batch()``
    runs (an interruption keeps every flushed batch). ``on_image(image_id, source, error)`` runs after each
    image (``error`` None when extracted); without it a failure is logged as a warning.
    Returns ``{"extracted": n, "failed": n}``."""
    add = _adder(store)
    counts = {"extracted": 0, "failed": 0}
    n = 0
    for image_id, source, features, error in extract_each(todo, fn, workers, progress, desc):
        if error is None:
            add(image_id, features, source)
            counts["extracted"] += 1
        else:
            counts["failed"] += 1
        if on_image is not None:
            on_image(image_id, source, error)
        elif error is not None:
            log.warning("%s", failure_line(source if _is_path(source) else image_id, error))
        n += 1
        if batch_size and (n % batch_size == 0 or n == len(todo)):
            store.flush()
            if on_batch is not None:
                on_batch()
    return counts


def _is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))


def _adder(store):
    """``add(image_id, features, source)`` for ``store``: passes ``source=`` (the absolute path, None for
    pixels) when the store's ``add`` takes it."""
    try:
        takes_source = "source" in inspect.signature(store.add).parameters
    except (TypeError, ValueError):
        takes_source = False
    if not takes_source:
        return lambda image_id, features, source: store.add(image_id, features)
    return lambda image_id, features, source: store.add(
        image_id, features, source=os.path.abspath(source) if _is_path(source) else None)


def extract_to_store(images, extractor, store_path, fn=None, progress: bool = True,
                     workers: int | None = None, batch_size: int | None = None,
                     shard_size: int | None = None, retry_failed: bool = False,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, lock_timeout: float | None = 0.0,
                     desc: str | None = None) -> dict:
    """Extract features of ``images`` into the store at ``store_path`` (created or resumed): ``d2r extract``.

    Args:
        images: a folder, list file, or iterable of paths and ``(image_id, path_or_pixels)`` pairs (see
            :func:`d2r.features.image.list_images`: one image per id).
        extractor: has ``extract(image) -> LocalFeatures``, ``name``, ``dim``, ``fingerprint()``.
        fn: ``fn(image_id, source) -> features`` instead of the whole-image features (e.g. regions, or a
            query crop).
        workers: threads over images (default ``extractor.default_workers`` or 1).
        batch_size: also flush (commit) the store every this many images (default: by size only).
        shard_bytes: a shard is written (and committed) every ``shard_bytes`` of features; ``shard_size``
            optionally also caps the images per shard.
        retry_failed: re-attempt images listed in failures.json (default: skip them).
        lock_timeout: seconds to wait for another writer of the store (0: fail at once; None: forever).

    The input is listed and the writer lock taken before any image is read. Images already in the store are
    skipped; an image that fails (corrupt file, ...) is recorded in the store's failures and the run goes on.
    Returns ``{"images", "extracted", "skipped", "failed", "seconds", "store"}``.
    """
    t0 = time.perf_counter()
    workers = int(workers or getattr(extractor, "default_workers", 1) or 1)
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    pairs = list_images(images)
    if fn is None:
        def fn(image_id, source):
            return extract_image(extractor, source)

    store = FeatureStore.create(store_path, extractor_info(extractor), shard_bytes=shard_bytes,
                                shard_size=shard_size, lock_timeout=lock_timeout)
    try:
        failures = store.failures
        todo = [(i, p) for i, p in pairs if i not in store and (retry_failed or i not in failures)]

        def record(image_id, source, error):
            if error is not None:
                log.warning("%s", failure_line(image_id, error))
                store.add_failure(image_id, error)

        counts = extract_into(store, todo, fn, workers=workers, batch_size=batch_size, on_image=record,
                              progress=progress, desc=desc or f"extract {getattr(extractor, 'name', '')}")
    finally:
        store.close()
    return {"images": len(pairs), **counts, "skipped": len(pairs) - len(todo),
            "seconds": round(time.perf_counter() - t0, 3), "store": str(store.path)}


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
        return extractor_info(self.extractor)

    # ---- extraction ----------------------------------------------------------------------------------------
    def extract(self, image, name: str | None = None) -> LocalFeatures | RegionFeatures:
        """Index-side features of one image (path, array or PIL image): :func:`extract_image` with this
        config's extractor and region proposer."""
        return extract_image(self.extractor, image, self.proposer, self.config.regions.reextract, name)

    def image_worker(self, image_id, source) -> LocalFeatures | RegionFeatures:
        """:meth:`extract` as the loop's ``fn(image_id, source)``."""
        return self.extract(source, name=str(image_id))

    def extract_query(self, image, bbox=None, name: str = "query") -> LocalFeatures:
        """Query-side features: the whole image or its crop to ``bbox`` = (x1, y1, x2, y2); never regions."""
        pixels = load_image(image)
        if bbox is not None:
            pixels = crop(pixels, bbox, name=name)
        return self.extractor.extract(pixels)

    def extract_into(self, store, todo, on_image=None, on_batch=None, desc: str = "extracting") -> dict:
        """:func:`extract_into` with this config: its per-image worker, ``workers`` threads, a flush every
        ``batch_size`` images."""
        return extract_into(store, todo, self.image_worker, workers=self.workers, batch_size=self.batch_size,
                            on_image=on_image, on_batch=on_batch, progress=self.progress, desc=desc)

    # ---- codebook and database -----------------------------------------------------------------------------
    def train_codebook(self, store, trainset: str) -> Codebook:
        """A codebook trained with ``config.codebook`` on a sample of the store's (whole-image) descriptors;
        ValueError when there are fewer than K × :data:`MIN_DESCRIPTORS_PER_WORD` of them."""
        c = self.config.codebook
        x, _ = sample_descriptors(store, per_image=c.sample_per_image, max_total=c.max_samples, seed=c.seed,
                                  progress=self.progress)
        check_training_size(x.shape[0], c.size)
        book, _ = train_codebook(x, c.size, iterations=c.iterations, method=c.method, seed=c.seed,
                                 progress=self.progress, metadata=codebook_metadata(self.extractor, trainset))
        return book

    def create_database(self, path, codebook: Codebook):
        """A new database at ``path`` with ``config.index`` (the DatabaseConfig, passed whole)."""
        return Database.create(path, codebook, **self.config.index.to_dict())

    def fill_database(self, db, store, ids, on_batch=None, save_every: int | None = None,
                      desc: str = "indexing") -> list:
        """Add ``ids`` (in order) from the store to ``db``, region by region, saving after every
        ``save_every`` images (default ``config.batch_size``); ``on_batch(ids)`` runs once a batch is
        saved. Returns the ids of the images without any local feature (blank, tiny: they never match)."""
        bar = progress_bar(len(ids), desc, self.progress)
        every = max(1, int(save_every or self.batch_size))
        empty = []

        def items(batch):
            for image_id in batch:
                f = store.get(image_id)
                if isinstance(f, RegionFeatures):
                    descriptors, counts = f.features.descriptors, f.counts
                else:
                    descriptors, counts = f.descriptors, None
                if len(descriptors) == 0:
                    empty.append(image_id)
                yield image_id, descriptors, counts

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
        return empty


__all__ = ["Pipeline", "check_setup", "check_codebook_plan", "extract_into", "extract_to_store"]
