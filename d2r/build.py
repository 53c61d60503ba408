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


from d2r.codebook import Codebook
from d2r.features.base import LocalFeatures, RegionFeatures
from d2r._log import progress_bar
from d2r.codebook.codebook import check_training_size, codebook_metadata, fit_codebook
from d2r.detect.config import check_regions
from d2r.features.config import build_extractor
from d2r.features.image import crop
from d2r.codebook import train_codebook
from d2r.codebook.kmeans import sample_descriptors
from d2r.detect.regions import extract_regions
from d2r.features.config import extractor_info
from d2r.features.image import load_image
from d2r.features.store import FeatureStore
from d2r.index.database import Database

log = logging.getLogger(__name__)


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
        """Index-side features of one image (path, array or PIL image): the whole image, plus its regions
        (re-extracted per ``config.regions``) when a proposer is configured."""
        pixels = load_image(image)
        if self.proposer is None:
            return self.extractor.extract(pixels)

        return extract_regions(pixels, self.extractor, self.proposer, reextract=self.config.regions.reextract,
                               name=name or str(image))

    def extract_query(self, image, bbox=None, name: str = "query") -> LocalFeatures:
        """Query-side features: the whole image or its crop to ``bbox`` = (x1, y1, x2, y2); never regions."""
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


__all__ = ["Pipeline"]
