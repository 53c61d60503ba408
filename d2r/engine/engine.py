"""The whole pipeline behind one object: index a folder of photos, search it with a photo.

    engine = d2r.Engine.create("my-index", d2r.EngineConfig())      # RootSIFT, ASMK*, verification + aQE
    engine.index("photos/")                                           # resumable; bad files reported
    hits = engine.search("query.jpg", top_k=10)                       # [Hit(image_id, path, score, ...)]

An engine folder holds ``engine.json`` (format version and the resolved :class:`EngineConfig`), ``features/`` (a
:class:`~d2r.features.FeatureStore` of every indexed image's local features, region by region, used for
re-ranking and boxes), ``index/`` (the :class:`~d2r.index.Database`, with its codebook), ``sources.json`` and
``sources.log`` (image id → file: a snapshot and the journal of changes since, see :mod:`d2r._sources`) and
``failures.json`` (file → reason). Indexing runs in batches: features are extracted and flushed to
the store, then added to the database, which is saved; only then are the batch's images reported done, so a
process killed at any point reopens with every image reported done. Without a codebook file, the first ``index``
extracts every image, trains a codebook on a sample of their descriptors, then builds the database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.engine.sources import SourcesTable, assign_ids, read_failures
from d2r._validate import as_top_k
from d2r.codebook import Codebook
from d2r.features.base import LocalFeatures, RegionFeatures, whole_image
from d2r.index.database import Database
from d2r.build import Pipeline, check_codebook_plan
from d2r.features.image import crop  # noqa: F401  (crop: part of this module's API)
from d2r.engine.check import check_engine, has_store, removed_with_features
from d2r.engine.global_stage import GlobalStage
from d2r.engine.config import FORMAT, FORMAT_VERSION, EngineConfig, absolute_paths, engine_config
from d2r._lock import WriterLock
from d2r.build import check_setup
from d2r.detect.config import check_regions
from d2r.features.config import extractor_difference, extractor_info
from d2r.features.image import listed_images, load_image
from d2r.features.store import FeatureStore, check_store, import_shards
from d2r.index.manifest import GENERATIONS as INDEX_GENERATIONS
from d2r._threads import current_threads, numba_threads, one_blas_thread, openmp_blas_one_thread
from d2r.aggregate import get_kernel
from d2r.query.config import QE_METHODS
from d2r.query.order import moved_by
from d2r.query.pipeline import QueryResult, Stage, search_query

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Hit:
    """One search result, at ``rank`` (1 = best) of the final stage of the query path.

    ``score``: the similarity of the search that found the image (the expanded query's when query expansion ran;
    the fused score under ``rerank.fusion_weight``). ``inliers``: its geometric-verification inlier count, -1
    when not verified. ``ranked_by``: what placed it: "inliers" when verification moved it up (usac: at least
    ``rerank.min_inliers`` inliers; official: every verified image), "fused" under ``rerank.fusion_weight``,
    "score" otherwise. Images moved up come first, by inliers; the rest keep score order behind them, so the
    score column is monotone within each group, not across them. ``box``: the [x1, y1, x2, y2] region that
    matched in regional-search mode (None in aggregation mode, where the image matches as a whole)."""
    image_id: str
    path: str | None
    score: float
    box: tuple | None
    inliers: int
    rank: int
    ranked_by: str = "score"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class IndexReport:
    """What an ``index`` call did (JSON-ready with ``to_dict``)."""
    indexed: list = field(default_factory=list)
    skipped: int = 0
    failed: dict = field(default_factory=dict)
    seconds: float = 0.0
    codebook_trained: bool = False
    codebook: dict | None = None  # when trained: {"k", "descriptors", "path"}
    featureless: list = field(default_factory=list)  # indexed without any local feature: they never match

    def to_dict(self) -> dict:
        return {"indexed": len(self.indexed), "skipped": self.skipped, "failed": self.failed,
                "seconds": round(self.seconds, 3), "codebook_trained": self.codebook_trained,
                "codebook": self.codebook, "featureless": len(self.featureless)}


class Engine:
    """Index and search photos. Use :meth:`create` or :meth:`open`."""
    def __init__(self, path: Path, config: EngineConfig):
        self.path = Path(path)
        self.config = config
        self.pipeline = Pipeline(config)
        self._db: Database | None = None
        self._store = None
        self._store_lock = threading.Lock()
        self._sources = SourcesTable(self.path)  # read on first access (a search needs only its hits' files)
        self._failures: dict[str, str] = read_failures(self.path)
        self.global_stage = GlobalStage(self.path, config.global_) if config.global_.enabled else None

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, config: EngineConfig | dict | None = None, codebook=None,
               images: int | None = None) -> "Engine":
        """A new engine in the folder ``path`` (must not hold one). ``codebook``: a :class:`Codebook` or a file;
        else ``config.codebook.path``; else one is trained on the images of the first ``index`` call (when
        their number ``images`` is given, the codebook is checked trainable from them, before the folder
        exists)."""
        path = Path(path)
        if isinstance(config, dict):
            config = EngineConfig.from_dict(config)
        config = absolute_paths(config or EngineConfig())
        if (path / "engine.json").exists():
            raise FileExistsError(f"{path}: an engine already exists here (open it instead)")
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a folder")
        extractor, book = check_setup(config, codebook)  # everything checked before the folder exists
        if book is None and images is not None:
            check_codebook_plan(config.codebook, extractor, images)
        stage = GlobalStage(path, config.global_) if config.global_.enabled else None
        if stage is not None:
            stage.extractor  # the global model loads (or its extra is missing) before the folder exists
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            engine = cls(path, config)
            engine.pipeline = Pipeline(config, extractor)
            engine.global_stage = stage
            if book is not None:
                engine._create_database(book)
            _io.write_json(path / "engine.json", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "config": config.to_dict()})
        except BaseException:
            if created:
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            raise
        return engine

    @classmethod
    def open(cls, path) -> "Engine":
        path = Path(path)
        engine = cls(path, engine_config(path))
        manifest = path / "index" / "manifest.json"
        INDEX_GENERATIONS.refuse_lost(path / "index")  # D1: a lost commit point is damage, not "no index yet"
        if manifest.exists():
            try:
                engine._db = Database.open(path / "index")
            except (KeyError, TypeError, IndexError) as exc:  # a manifest missing a key or with a wrong type
                raise ValueError(f"{manifest}: malformed ({type(exc).__name__}: {exc})") from None
        return engine

    def _create_database(self, codebook: Codebook) -> None:
        self._db = self.pipeline.create_database(self.path / "index", codebook)

    # ---- parts ---------------------------------------------------------------------------------------------------
    @property
    def database(self) -> Database | None:
        return self._db

    @property
    def extractor(self):
        return self.pipeline.extractor

    @property
    def proposer(self):
        return self.pipeline.proposer

    def _feature_store(self):
        """The feature store: the writer's while ``index`` runs, else a lock-free reader (opened once)."""
        with self._store_lock:
            if self._store is None:
                if not has_store(self.path):
                    raise KeyError(f"{self.path}: the engine has no stored features yet")
                self._store = FeatureStore.open(self.path / "features")  # a lost manifest.json: named there
            return self._store

    @contextlib.contextmanager
    def _writing(self, lock_timeout):
        """Be the one writer of this engine: lock it, its database (opened writable, so its lock is held from
        the start) and its feature store before any work, reload what another writer may have saved meanwhile,
        release all three at the end, also when the work raises (else this process would lock itself out)."""
        with WriterLock(self.path, timeout=lock_timeout, what="index"):
            try:
                INDEX_GENERATIONS.refuse_lost(self.path / "index")  # no new codebook and index over it (D1)
                if (self.path / "index" / "manifest.json").exists():
                    self._db = Database.open(self.path / "index", writable=True, lock_timeout=lock_timeout)
                self._sources.reload()
                self._sources.load()
                self._failures = read_failures(self.path)
                store = FeatureStore.create(self.path / "features", self.pipeline.store_info(),
                                            lock_timeout=lock_timeout)
                with self._store_lock:
                    self._store = store
                try:
                    yield store
                finally:
                    with self._store_lock:
                        self._store = None
                    store.close()
            finally:
                if self._db is not None:  # also a database created meanwhile (codebook trained here)
                    self._db.close()

    def __len__(self) -> int:
        return 0 if self._db is None else len(self._db)

    def __contains__(self, image_id) -> bool:
        return self._db is not None and image_id in self._db

    def lost_sources(self) -> list[tuple[str, str]]:
        """``(image_id, file)`` of the images the sources table lists but neither the index nor the feature
        store holds (their features were lost with a damaged shard) and whose file still exists: what ``d2r
        index repair --reindex`` extracts again."""
        store = self._feature_store() if has_store(self.path) else ()
        return [(i, f) for i in list(self._sources) if i not in self and i not in store
                for f in [self._sources.get(i)] if f and Path(f).is_file()]

    def image_folders(self) -> list[Path]:
        """The folders holding the indexed images' files, as the sources table records them (absolute paths,
        symbolic links resolved when indexed), a folder inside another left out: where ``d2r serve`` may read
        image files from."""
        folders = sorted({Path(p).parent for p in self._sources.values() if os.path.isabs(p)},
                         key=lambda f: f.parts)  # a folder's subfolders sort right after it
        kept: list[Path] = []
        for folder in folders:
            if not kept or not folder.is_relative_to(kept[-1]):
                kept.append(folder)
        return kept

    def info(self) -> dict:
        self._sources.load()  # a damaged sources table is an error here too
        out = {"path": str(self.path), "images": len(self), "failures": len(self._failures),
               "config": self.config.to_dict()}
        if self._db is not None:
            out["index"] = self._db.info()
        if self.global_stage is not None:
            out["global"] = self.global_stage.info()
        if has_store(self.path):
            try:
                out["store"] = self._feature_store().info()
            except (OSError, ValueError) as exc:
                out["store"] = {"path": str(self.path / "features"), "error": str(exc)}
            out["store"]["damaged"] = check_store(self.path / "features", digests=False)
        return out

    # ---- indexing ------------------------------------------------------------------------------------------------
    def extract(self, image) -> LocalFeatures | RegionFeatures:
        """Index-side features of one image: whole image plus regions when a proposer is configured."""
        return self.pipeline.extract(image)

    def index(self, images, progress: bool = True, on_done=None, retry_failed: bool = False,
              lock_timeout: float | None = 0.0, id_prefix: str = "") -> IndexReport:
        """Index images: a folder (searched recursively), a list file, or a list of image paths, folders, list
        files and ``(image_id, path)`` pairs.

        Image ids are the paths relative to the folder / list file's folder (absolute paths for single files
        among several, and for a list file's paths outside its folder), without extension
        (:func:`~d2r.features.image.listed_images`), preceded by ``id_prefix`` (for a second folder with the
        same names); :func:`~d2r.engine.sources.assign_ids` applies the engine's rules (one id, one file).
        A folder or list file without images is a ValueError, before anything is written.

        Images already indexed are skipped (so an interrupted call can simply be repeated); images that cannot be
        read or described are reported in ``report.failed`` with the reason, and skipped again next time unless
        ``retry_failed``. ``on_done(ids)`` is called after each saved batch. The engine's writer lock is taken
        first: another writer makes this call fail at once (or wait up to ``lock_timeout`` seconds).
        """
        t0 = time.perf_counter()
        listed = listed_images(_check_images(images))
        self.pipeline.extractor  # a model or region source gone since the engine was made: one error, up front
        check_regions(self.config.regions)
        self.pipeline.proposer
        report = IndexReport()
        with self._writing(lock_timeout) as store:
            pairs, report.skipped, report.failed = assign_ids(listed, self._sources, self._failures,
                                                              id_prefix)
            todo = [(i, p) for i, p in pairs if i not in self and (retry_failed or str(p) not in self._failures)]
            report.skipped += len(pairs) - len(todo)
            if self._db is None:  # a codebook will be trained on the store: can it be, with these images?
                check_codebook_plan(self.config.codebook, self.extractor,
                                    len(set(store.ids()) | {i for i, _ in todo}))
            # Phase 1: features into the store, batch by batch (flushed, so an interruption keeps them).
            self._extract_batches([t for t in todo if t[0] not in store], store, report, progress)
            extracted = [i for i, p in todo if str(p) not in report.failed]  # failures are reported by file
            self._index_stored(store, extracted, report, progress, on_done)
            self._index_global(progress)
        report.seconds = time.perf_counter() - t0
        return report

    def index_store(self, store, ids=None, progress: bool = True, on_done=None,
                    lock_timeout: float | None = 0.0) -> IndexReport:
        """Index features already extracted into a feature store (``d2r extract``), without re-extracting.

        store: a store folder or :class:`~d2r.features.FeatureStore`; its extractor fingerprint and D must
        match this engine's features config (else ValueError). ids: the images to index (default: all of the
        store). The store's shards are linked (or copied) into the engine's own store, verified by checksum,
        then indexed in saved batches like :meth:`index`; images already indexed are skipped.
        """
        t0 = time.perf_counter()
        report = IndexReport()
        src = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        want = extractor_info(self.extractor)
        have = {**src.extractor, "dim": src.dim}
        if have["fingerprint"] != want["fingerprint"] or src.dim != int(want["dim"]):
            raise ValueError(f"{src.path}: the store's features are not this engine's "
                             f"({extractor_difference(have, want, ('store', 'engine'))})")
        chosen = src.ids() if ids is None else [str(i) for i in ([ids] if isinstance(ids, str) else ids)]
        missing = [i for i in chosen if i not in src]
        if missing:
            raise KeyError(f"{missing[0]!r} is not in the feature store {src.path} ({len(missing)} missing)")
        regions = str(self.config.regions.proposer).lower() != "none"
        if chosen and isinstance(src.get(chosen[0]), RegionFeatures) != regions:
            kind = "region" if not regions else "whole-image"
            raise ValueError(f"{src.path}: the store holds {kind} features "
                             f"but this engine's regions.proposer is {self.config.regions.proposer!r}")
        if self._db is None:
            check_codebook_plan(self.config.codebook, self.extractor, len(chosen))
        with self._writing(lock_timeout) as own:
            import_shards(own, src, set(chosen))
            for image_id in chosen:  # the files the store says the features came from: hits get their paths
                source = src.source(image_id)
                if source is not None and image_id not in self._sources:
                    self._sources[image_id] = source
            todo = [i for i in chosen if i not in self]
            report.skipped = len(chosen) - len(todo)
            self._index_stored(own, todo, report, progress, on_done)
            self._index_global(progress)
        report.seconds = time.perf_counter() - t0
        return report

    def reindex_from_store(self, progress: bool = True, lock_timeout: float | None = 0.0) -> IndexReport:
        """Index again, from the engine's own feature store (no re-extraction), every stored image the
        database lacks: the images of segments that ``d2r index repair`` dropped as damaged. Takes the writer
        lock."""
        t0 = time.perf_counter()
        report = IndexReport()
        with self._writing(lock_timeout) as store:
            if self._db is not None:
                removed = set(removed_with_features(self._db, store))  # never brought back
                todo = [i for i in store.ids() if i not in self and i not in removed]
                self._index_stored(store, todo, report, progress, None)
        report.seconds = time.perf_counter() - t0
        return report

    def unindex_featureless(self, lock_timeout: float | None = 0.0) -> list[str]:
        """Take out of the index every image the feature store holds no features for, and return their ids.

        After ``d2r index repair`` dropped a damaged feature shard (D7), or reset a damaged removal table, which
        brings back images whose features ``remove`` had deleted (D5), the index held images that every search
        reaching them failed to verify ("not in the feature store"). Their sources are kept: ``d2r index repair
        --reindex`` extracts them again from their files. Takes the writer lock."""
        with self._writing(lock_timeout) as store:
            if self._db is None:
                return []
            gone = [i for i in self._db.ids().tolist() if str(i) not in store]
            for image_id in gone:
                self._db.remove(image_id)
            if gone:
                self._db.save()
        return [str(i) for i in gone]

    def delete_removed_features(self, lock_timeout: float | None = 0.0) -> list[str]:
        """Delete the stored features of images the index lists as removed (a ``remove`` killed after
        committing the index, before the store: ``reindex_from_store`` would have brought them back), and
        their sources; returns their ids. Takes the writer lock."""
        with self._writing(lock_timeout) as store:
            if self._db is None:
                return []
            gone = removed_with_features(self._db, store)
            if gone:
                store.remove(gone)
                for image_id in gone:
                    self._sources.pop(image_id, None)
                self._save_tables()
        return gone

    def _index_stored(self, store, todo: list, report: IndexReport, progress: bool, on_done) -> None:
        """Phases 2 and 3 of indexing: a codebook if needed, then the stored images ``todo`` by saved batch."""
        # Phase 2: a codebook, trained on the store when none was given.
        if self._db is None:
            book = self._train_codebook(store, progress)
            report.codebook_trained = True
            report.codebook = {"k": book.size, "descriptors": book.metadata.get("training_descriptors"),
                               "path": str(self.path / "codebook.npz")}
        # Phase 3: into the database, saved batch by batch; a batch is reported done once saved.
        ready = [i for i in todo if i in store and i not in self._db]
        for image_id in todo:
            if image_id not in store:  # never silently dropped
                report.failed[image_id] = f"not in the feature store {store.path}"

        def saved(batch):
            report.indexed.extend(batch)
            if on_done is not None:
                on_done(batch)

        self.pipeline.progress = progress
        report.featureless += self.pipeline.fill_database(self._db, store, ready, on_batch=saved)
        self._save_tables()

    def _index_global(self, progress: bool) -> None:
        """The global stage's vectors of every indexed image that has none yet, from its recorded file (so an
        interrupted or older engine catches up on the next ``index``)."""
        if self.global_stage is None or self._db is None:
            return
        pairs = [(i, self._sources.get(str(i))) for i in self._db.ids().tolist()]
        self.global_stage.add_images(pairs, progress=progress, batch_size=self.config.batch_size)

    def _extract_batches(self, todo, store, report: IndexReport, progress: bool) -> None:
        def record(image_id, p, error):
            if error is None:
                self._failures.pop(str(p), None)  # a retried image that now works
            else:
                report.failed[str(p)] = self._failures[str(p)] = error

        self.pipeline.progress = progress
        self.pipeline.extract_into(store, todo, on_image=record, on_batch=self._save_tables)

    def _train_codebook(self, store, progress: bool) -> Codebook:
        self.pipeline.progress = progress
        book = self.pipeline.train_codebook(store, trainset=str(self.path))
        book.save(self.path / "codebook.npz")
        self._create_database(book)
        return book

    def _save_tables(self) -> None:
        self._sources.save()
        _io.write_json(self.path / "failures.json", self._failures)

    def remove(self, ids, lock_timeout: float | None = 0.0) -> int:
        """Remove images by id (a single id or a list); returns how many were removed. Unknown ids: KeyError.
        Their features and sources go too (the id may come back with another file, never with stale features).
        Takes the engine's writer lock (waiting up to ``lock_timeout`` seconds)."""
        ids = [ids] if isinstance(ids, (str, int)) else list(dict.fromkeys(ids))
        with self._writing(lock_timeout) as store:
            if self._db is None:
                raise KeyError(f"{ids[0]!r}: the engine has no images yet")
            missing = [i for i in ids if i not in self._db]
            if missing:
                raise KeyError(f"{missing[0]!r} is not in the index ({len(missing)} unknown id(s))")
            for image_id in ids:
                self._db.remove(image_id)
            self._db.save()
            if self.global_stage is not None:
                self.global_stage.remove(ids)
            store.remove([str(i) for i in ids])
            for image_id in ids:
                self._sources.pop(str(image_id), None)
            self._save_tables()
        return len(ids)

    def check(self, digests: bool = True) -> list[dict]:
        """Damaged files of the engine, ``[{"file", "problem"}]`` (empty: healthy): the feature store and the
        index (``index/...``: sizes, structure and, unless ``digests=False``, every BLAKE2 checksum)."""
        return check_engine(self.path, digests)

    # ---- search --------------------------------------------------------------------------------------------------
    def search(self, image, bbox=None, top_k: int = 10, rerank: bool = True, query_num_assignments: int | None = None,
               query_expansion: str | None = None, exclude=()) -> list[Hit]:
        """Search with a photo (path, array or PIL image), optionally cropped to ``bbox`` = (x1, y1, x2, y2) in
        pixels: the final stage of :meth:`query`, its first ``top_k`` hits (ids in ``exclude`` left out).

        The order: with verification (``rerank.enabled``, the default), the images verified with at least
        ``rerank.min_inliers`` inliers come first, by inliers (``Hit.ranked_by`` "inliers"; every verified image
        under ``rerank.method: official``); the rest follow in the order of ``Hit.score``, the similarity of the
        search that found them (the expanded query's when ``qe.method`` expands it). So ``score`` is not
        monotone across the two groups. A query without local features (blank, tiny, featureless) logs a
        warning and returns no hits. Other arguments: as :meth:`query`."""
        top_k = as_top_k(top_k)  # -1 returned all hits but the last
        result = self.query(image, bbox, top_k, rerank, query_num_assignments, query_expansion, exclude)
        final = result.final
        skip = set(exclude) | set(result.info.get("removed_meanwhile", ()))
        by = moved_by(self.config.rerank)
        hits = []
        for image_id, score, region, inl, promoted in zip(final.ids.tolist(), final.scores.tolist(),
                                                          final.regions.tolist(), final.inliers.tolist(),
                                                          final.promoted.tolist()):
            if image_id in skip:
                continue
            if len(hits) == top_k:
                break
            hits.append(Hit(str(image_id), self._sources.get(str(image_id)), float(score),
                            self._box(image_id, int(region)), int(inl), len(hits) + 1,
                            by if promoted else "score"))
        return hits

    def query(self, image, bbox=None, top_k: int = 10, rerank: bool = True,
              query_num_assignments: int | None = None, query_expansion: str | None = None,
              exclude=()) -> QueryResult:
        """Every stage of a search (:class:`~d2r.query.pipeline.QueryResult`: initial, verified, expanded, as
        configured), each ranking ``max(top_k, rerank.num_to_rerank) + len(exclude)`` images deep.

        rerank: False skips verification for this query, and the expansion that relies on it unless
        ``query_expansion`` asks for one ("none", "aqe", "hqe"; default ``qe.method``).
        query_num_assignments: overrides ``index.query_num_assignments`` for this query. exclude: ids that are
        never verified nor used to expand the query (e.g. the query's own id when searching with an indexed
        image; :meth:`search` also leaves them out of the hits). A featureless query gives empty stages."""
        top_k = as_top_k(top_k)
        if self._db is None:
            raise ValueError(f"{self.path}: nothing indexed yet")
        rr, qe = self.config.rerank, self.config.qe
        if query_expansion is not None:
            if query_expansion not in QE_METHODS:
                raise ValueError(f"query_expansion must be one of {list(QE_METHODS)}, got {query_expansion!r}")
            qe = qe.replace(method=query_expansion)
        elif not rerank:
            qe = qe.replace(method="none")
        if not rerank:
            rr = rr.replace(enabled=False)
        if query_expansion == "hqe" and not get_kernel(self._db.kernel).per_word:
            raise ValueError(f"query_expansion 'hqe' needs an ASMK kernel, not {self._db.kernel!r}")
        ma = query_num_assignments
        if ma is not None and (isinstance(ma, bool) or not isinstance(ma, int) or
                               not 1 <= ma <= self._db.codebook.size):
            raise ValueError(f"query_num_assignments must be in [1, {self._db.codebook.size}], got {ma!r}")
        pixels = load_image(image)
        if bbox is not None:
            pixels = crop(pixels, bbox, name=str(image) if isinstance(image, (str, Path)) else "query")
        features = self.extractor.extract(pixels)
        if len(features) == 0:  # nothing to match: no hits rather than the database in arbitrary order
            log.warning("%s: the query has no local features (blank, tiny or featureless image): no results",
                        image if isinstance(image, (str, Path)) else "query")
            empty = Stage(np.zeros(0, object), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64),
                          np.zeros(0, bool))
            return QueryResult({"initial": empty})
        depth = max(top_k, rr.num_to_rerank if rr.enabled else 0) + len(set(exclude))
        gone: set = set()

        def stored(image_id) -> LocalFeatures:
            try:
                return self._whole_image_features(image_id)
            except KeyError:
                if not self._removed_meanwhile(image_id):  # D18: the message named neither file nor remedy
                    raise KeyError(f"{self.path}: the indexed image {image_id!r} has no stored features (a "
                                   f"damaged index or feature store: `d2r index check {self.path}` names the "
                                   f"file, `d2r index repair {self.path}` repairs it)") from None
                gone.add(image_id)  # no longer a match: verified as nothing, left out of the hits
                return LocalFeatures.empty(self.extractor.dim)

        shortlist, t0 = None, time.perf_counter()
        if self.global_stage is not None:
            shortlist = self.global_stage.shortlist(pixels, self._db)
        took = time.perf_counter() - t0
        result = search_query(features, self._db, stored, rr, qe, depth, junk=exclude, query_num_assignments=ma,
                              shortlist=shortlist, global_weight=self.config.global_.weight)
        if shortlist is not None:
            result.timings["global"] = took
        result.info["removed_meanwhile"] = sorted(gone, key=str)
        return result

    def _removed_meanwhile(self, image_id) -> bool:
        """Whether a writer removed ``image_id`` after this reader opened its index generation: the index has
        moved on and the newest feature store no longer holds the id. The index and the store commit one after
        the other, so a reader of an older index generation can rank an image whose features a concurrent
        ``remove`` has already deleted; that image is then gone, not damage (any other miss still raises)."""
        try:
            newest = int(INDEX_GENERATIONS.read(self.path / "index")["generation"])
        except (OSError, ValueError, KeyError):
            return False
        if newest == self._db.generation:
            return False
        with self._store_lock:
            self._store = FeatureStore.open(self.path / "features")  # the newest generation of the store
            return image_id not in self._store

    def warm_up(self) -> threading.Thread | None:
        """Start loading the query path's numba kernels from numba's cache in a daemon thread (a search with two
        codebook words), so that a fresh process does it while the caller decodes the query and extracts its
        features (OpenCV releases the GIL). Returns the started thread (join it before exiting), or None when
        nothing is indexed. Results are unaffected: the search only reads, and its caches are built here first."""
        if self._db is None or len(self._db) == 0:
            return None
        self._db.search_batch([], top_k=1)  # shared caches built once, before the thread
        probe = np.array(self._db.codebook.centroids[:2], np.float32)  # writable, like a real query

        def work():
            try:
                self._db.search(probe, top_k=1)
            except Exception:  # only a warm-up: the real search reports any problem itself
                log.debug("warm-up search failed", exc_info=True)

        thread = threading.Thread(target=work, name="d2r-warm-up", daemon=True)
        thread.start()
        return thread

    def search_batch(self, images, bbox=None, top_k: int = 10, rerank: bool = True,
                     workers: int | None = None, seconds: list | None = None, **options) -> list:
        """:meth:`search` for many query photos in threads (feature extraction, the index scan and RANSAC release
        the GIL). Returns one entry per image, in order: its list of :class:`Hit`, or the exception that query
        raised (one bad photo never stops the others). ``bbox`` applies to every image; ``workers`` defaults to
        the CPU count; ``options`` (query_num_assignments, query_expansion, exclude) go to :meth:`search`. One
        level of parallelism (:mod:`d2r._threads`): with several query threads each runs numba, BLAS and its
        verification on one thread; results equal :meth:`search`'s. ``seconds``, a list, receives each query's
        own search time, in order."""
        top_k = as_top_k(top_k)  # once, not one error per image
        images = list(images)
        workers = max(1, min(len(images), int(workers or os.cpu_count() or 1)))
        if self._db is not None:  # shared caches built once, before the threads
            self._db.search_batch([], top_k=1)

        took = [0.0] * len(images)

        def one(k):
            t0 = time.perf_counter()
            try:
                with numba_threads(1 if workers > 1 else current_threads()), \
                        (openmp_blas_one_thread() if workers > 1 else contextlib.nullcontext()):
                    return self.search(images[k], bbox=bbox, top_k=top_k, rerank=rerank, **options)
            except Exception as exc:  # reported per query; the batch goes on
                return exc
            finally:
                took[k] = time.perf_counter() - t0

        if workers == 1:
            results = [one(k) for k in range(len(images))]
        else:
            with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(one, range(len(images))))
        if seconds is not None:
            seconds[:] = took
        return results

    def _stored(self, image_id):
        return self._feature_store().get(image_id)

    def _whole_image_features(self, image_id) -> LocalFeatures:
        return whole_image(self._stored(image_id))

    def _box(self, image_id, region: int):
        if self._db.mode != "search":  # aggregation mode matches the image as a whole
            return None
        boxes = self.boxes(image_id, include_whole=True)
        return tuple(float(v) for v in boxes[region]) if region < len(boxes) else None

    def boxes(self, image_id, include_whole: bool = False) -> np.ndarray:
        """The region boxes stored for an indexed image, (R, 4) float32 [x1, y1, x2, y2] in pixels (the
        whole-image region first when ``include_whole``); empty without regions."""
        try:
            feats = self._stored(str(image_id))
        except KeyError:
            return np.zeros((0, 4), np.float32)
        if not isinstance(feats, RegionFeatures):
            return np.zeros((0, 4), np.float32)
        return feats.boxes if include_whole else feats.boxes[feats.box_ids >= 0]


def _check_images(images):
    """``images`` of :meth:`Engine.index` as given (a list for an iterable), or TypeError saying what is
    accepted: None, a dict (its keys would be read as paths) or an item neither a path nor an (id, path)
    pair."""
    accepted = "a folder, a list file, or a list of image paths and (image_id, path) pairs"
    if isinstance(images, (str, os.PathLike)):
        return Path(images)
    if images is None or isinstance(images, (dict, bytes)) or not isinstance(images, typing.Iterable):
        hint = " (for {id: path}, pass list(images.items()))" if isinstance(images, dict) else ""
        raise TypeError(f"images: expected {accepted}, got {type(images).__name__}{hint}")
    images = list(images)
    for item in images:
        pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (str, os.PathLike))
        if not pair and not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"images: expected {accepted}, got an item {item!r}")
    return images


