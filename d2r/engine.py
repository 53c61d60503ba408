"""The whole pipeline behind one object: index a folder of photos, search it with a photo.

    engine = d2r.Engine.create("my-index", d2r.EngineConfig())      # RootSIFT, R-ASMK*, GV re-ranking
    engine.index("photos/")                                           # resumable; bad files reported
    hits = engine.search("query.jpg", top_k=10)                       # [Hit(image_id, path, score, box, inliers)]

An engine folder holds ``engine.json`` (format version and the resolved :class:`EngineConfig`), ``features/`` (a
:class:`~d2r.features.FeatureStore` of every indexed image's local features, region by region, used for
re-ranking and boxes), ``index/`` (the :class:`~d2r.index.Database`, with its codebook), ``sources.json`` (image
id → file) and ``failures.json`` (file → reason). Indexing runs in batches: features are extracted and flushed to
the store, then added to the database, which is saved; only then are the batch's images reported done, so a
process killed at any point reopens with every image reported done. Without a codebook file, the first ``index``
extracts every image, trains a codebook on a sample of their descriptors, then builds the database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.codebook import Codebook
from d2r.config import Config
from d2r.detect.config import RegionsConfig
from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.index.database import Database, DatabaseConfig
from d2r.rerank import RerankConfig

log = logging.getLogger(__name__)

FORMAT = "d2r-engine"
FORMAT_VERSION = 1


@dataclass
class FeaturesConfig(Config):
    """Local features: ``name`` "rootsift" (weight-free default) or "delf" (``model`` = SavedModel folder, ``pca``
    = folder of the PCA files); ``options`` are the extractor's config fields (e.g. ``{"max_features": 1000}``)."""

    name: str = "rootsift"
    model: str | None = None
    pca: str | None = None
    options: dict = field(default_factory=dict)

    def build(self):
        from d2r.features import get_extractor

        return get_extractor(self.name, model=self.model, pca=self.pca, **self.options)


@dataclass
class CodebookConfig(Config):
    """The visual vocabulary: an existing codebook file (``path``), or one trained with k-means on the first
    images indexed (``size`` words, ``sample_per_image`` descriptors of each, at most ``max_samples``)."""

    path: str | None = None
    size: int = 1024
    iterations: int = 20
    method: str = "lloyd"  # or "minibatch": much faster for large K at ~0.5% higher inertia
    sample_per_image: int = 300
    max_samples: int = 1_000_000
    seed: int = 0


@dataclass
class EngineConfig(Config):
    """Everything an engine does, in one place; saved with the index. Defaults: RootSIFT, whole image + no boxes
    (set ``regions.proposer`` to a detector path, "grid" or "density"), ASMK* aggregation, GV re-ranking."""

    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    index: DatabaseConfig = field(default_factory=DatabaseConfig)
    # 0.4: the RootSIFT descriptor distance that separates true matches best (benchmarks/results/dev_results.md);
    # the official DELF value is 0.9 (set rerank.descriptor_distance with DELF features).
    rerank: RerankConfig = field(default_factory=lambda: RerankConfig(descriptor_distance=0.4))
    batch_size: int = 64
    workers: int = 2

    def check(self) -> "EngineConfig":
        """Refuse a bad config before anything is extracted or written (ValueError naming the option)."""
        from d2r.aggregate import KERNELS
        from d2r.features import EXTRACTORS
        from d2r.index.database import MODES

        c = self.index
        if self.features.name not in EXTRACTORS:
            raise ValueError(f"features.name must be one of {list(EXTRACTORS)}, got {self.features.name!r}")
        if c.kernel not in KERNELS:
            raise ValueError(f"index.kernel must be one of {list(KERNELS)}, got {c.kernel!r}")
        if c.mode not in MODES:
            raise ValueError(f"index.mode must be one of {list(MODES)}, got {c.mode!r}")
        if c.idf and c.kernel == "vlad":
            raise ValueError("index.idf applies to the ASMK kernels, not to VLAD")
        for name, value in [("index.num_assignments", c.num_assignments),
                            ("index.query_num_assignments", c.query_num_assignments), ("batch_size", self.batch_size),
                            ("workers", self.workers), ("codebook.size", self.codebook.size)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.codebook.method not in ("lloyd", "minibatch"):
            raise ValueError(f"codebook.method must be 'lloyd' or 'minibatch', got {self.codebook.method!r}")
        self.rerank.validate()
        return self


@dataclass(frozen=True)
class Hit:
    """One search result. ``box`` is the [x1, y1, x2, y2] region that matched in regional-search mode (None in
    aggregation mode, where the image matches as a whole); ``inliers`` is the geometric-verification inlier count, -1 when not verified."""

    image_id: str
    path: str | None
    score: float
    box: tuple | None
    inliers: int
    rank: int

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

    def to_dict(self) -> dict:
        return {"indexed": len(self.indexed), "skipped": self.skipped, "failed": self.failed,
                "seconds": round(self.seconds, 3), "codebook_trained": self.codebook_trained}


class Engine:
    """Index and search photos. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, config: EngineConfig):
        self.path = Path(path)
        self.config = config
        self._extractor = None
        self._proposer = None
        self._db: Database | None = None
        self._store = None
        self._store_lock = threading.Lock()
        self._sources: dict[str, str] = _read_json(self.path / "sources.json", {})
        self._failures: dict[str, str] = _read_json(self.path / "failures.json", {})

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, config: EngineConfig | dict | None = None, codebook=None) -> "Engine":
        """A new engine in the folder ``path`` (must not hold one). ``codebook``: a :class:`Codebook` or a file;
        else ``config.codebook.path``; else one is trained on the images of the first ``index`` call."""
        path = Path(path)
        if isinstance(config, dict):
            config = EngineConfig.from_dict(config)
        config = config or EngineConfig()
        if (path / "engine.json").exists():
            raise FileExistsError(f"{path}: an engine already exists here (open it instead)")
        config.check()
        path.mkdir(parents=True, exist_ok=True)
        engine = cls(path, config)
        book = codebook if codebook is not None else config.codebook.path
        if book is not None:
            engine._create_database(book if isinstance(book, Codebook) else Codebook.load(book))
        _io.write_json(path / "engine.json", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                              "config": config.to_dict()})
        return engine

    @classmethod
    def open(cls, path) -> "Engine":
        path = Path(path)
        meta_path = path / "engine.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path}: no d2r engine here (engine.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a d2r engine")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format version {meta['format_version']} is newer than this d2r")
        engine = cls(path, EngineConfig.from_dict(meta["config"]))
        if (path / "index" / "manifest.json").exists():
            engine._db = Database.open(path / "index")
        return engine

    def _create_database(self, codebook: Codebook) -> None:
        c = self.config.index
        self._db = Database.create(self.path / "index", codebook, kernel=c.kernel, mode=c.mode, alpha=c.alpha,
                                   tau=c.tau, tau_inclusive=c.tau_inclusive, normalize=c.normalize,
                                   num_assignments=c.num_assignments,
                                   query_num_assignments=c.query_num_assignments, idf=c.idf)

    # ---- parts ---------------------------------------------------------------------------------------------------
    @property
    def database(self) -> Database | None:
        return self._db

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = self.config.features.build()
        return self._extractor

    @property
    def proposer(self):
        if self._proposer is None and str(self.config.regions.proposer).lower() != "none":
            self._proposer = self.config.regions.build_proposer()
        return self._proposer

    def _feature_store(self):
        """The feature store: the writer's while ``index`` runs, else a lock-free reader (opened once)."""
        from d2r.features.store import FeatureStore

        with self._store_lock:
            if self._store is None:
                if not (self.path / "features" / "manifest.json").exists():
                    raise KeyError(f"{self.path}: the engine has no stored features yet")
                self._store = FeatureStore.open(self.path / "features")
            return self._store

    @contextlib.contextmanager
    def _writing(self, lock_timeout):
        """Be the one writer of this engine: lock it (the index) and its feature store before any work, reload
        what another writer may have saved meanwhile, release both at the end."""
        from d2r._lock import WriterLock
        from d2r.features.store import FeatureStore, _extractor_info

        with WriterLock(self.path, timeout=lock_timeout, what="index"):
            if (self.path / "index" / "manifest.json").exists():
                self._db = Database.open(self.path / "index")
            self._sources = _read_json(self.path / "sources.json", {})
            self._failures = _read_json(self.path / "failures.json", {})
            store = FeatureStore.create(self.path / "features", _extractor_info(self.extractor),
                                        lock_timeout=lock_timeout)
            with self._store_lock:
                self._store = store
            try:
                yield store
            finally:
                with self._store_lock:
                    self._store = None
                store.close()

    def __len__(self) -> int:
        return 0 if self._db is None else len(self._db)

    def __contains__(self, image_id) -> bool:
        return self._db is not None and image_id in self._db

    def info(self) -> dict:
        out = {"path": str(self.path), "images": len(self), "failures": len(self._failures),
               "config": self.config.to_dict()}
        if self._db is not None:
            out["index"] = self._db.info()
        if (self.path / "features" / "manifest.json").exists():
            from d2r.features.store import check_store

            try:
                out["store"] = self._feature_store().info()
            except (OSError, ValueError) as exc:
                out["store"] = {"path": str(self.path / "features"), "error": str(exc)}
            out["store"]["damaged"] = check_store(self.path / "features", digests=False)
        return out

    # ---- indexing ------------------------------------------------------------------------------------------------
    def extract(self, image) -> LocalFeatures | RegionFeatures:
        """Index-side features of one image: whole image plus regions when a proposer is configured."""
        from d2r.features.image import load_image

        pixels = load_image(image)
        if self.proposer is None:
            return self.extractor.extract(pixels)
        from d2r.detect.regions import extract_regions

        return extract_regions(pixels, self.extractor, self.proposer, reextract=self.config.regions.reextract,
                               name=str(image))

    def index(self, images, progress: bool = True, on_done=None, retry_failed: bool = False,
              lock_timeout: float | None = 0.0) -> IndexReport:
        """Index images: a folder (searched recursively), a list file, or paths / ``(image_id, path)`` pairs.

        Images already indexed are skipped (so an interrupted call can simply be repeated); images that cannot be
        read or described are reported in ``report.failed`` with the reason, and skipped again next time unless
        ``retry_failed``. ``on_done(ids)`` is called after each saved batch. The engine's writer lock is taken
        first: another writer makes this call fail at once (or wait up to ``lock_timeout`` seconds).
        """
        t0 = time.perf_counter()
        report = IndexReport()
        with self._writing(lock_timeout) as store:
            pairs = self._resolve(images, report)
            todo = [(i, p) for i, p in pairs
                    if i not in self and (retry_failed or str(p) not in self._failures)]
            report.skipped = len(pairs) - len(todo)
            # Phase 1: features into the store, batch by batch (flushed, so an interruption keeps them).
            self._extract_batches([t for t in todo if t[0] not in store], store, report, progress)
            self._index_stored(store, [i for i, _ in todo], report, progress, on_done)
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
        from d2r.features.store import FeatureStore, _extractor_info, import_shards

        t0 = time.perf_counter()
        report = IndexReport()
        src = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        want = _extractor_info(self.extractor)
        have = src.extractor
        if have["fingerprint"] != want["fingerprint"] or src.dim != int(want["dim"]):
            raise ValueError(f"{src.path}: the store holds {have.get('name')} features (fingerprint "
                             f"{have['fingerprint']}, D={src.dim}); this engine's features config gives "
                             f"{want['name']} (fingerprint {want['fingerprint']}, D={want['dim']})")
        chosen = src.ids() if ids is None else [str(i) for i in ([ids] if isinstance(ids, str) else ids)]
        missing = [i for i in chosen if i not in src]
        if missing:
            raise KeyError(f"{missing[0]!r} is not in the feature store {src.path} ({len(missing)} missing)")
        regions = str(self.config.regions.proposer).lower() != "none"
        if chosen and isinstance(src.get(chosen[0]), RegionFeatures) != regions:
            kind = "region" if not regions else "whole-image"
            raise ValueError(f"{src.path}: the store holds {kind} features "
                             f"but this engine's regions.proposer is {self.config.regions.proposer!r}")
        with self._writing(lock_timeout) as own:
            import_shards(own, src, set(chosen))
            todo = [i for i in chosen if i not in self]
            report.skipped = len(chosen) - len(todo)
            self._index_stored(own, todo, report, progress, on_done)
        report.seconds = time.perf_counter() - t0
        return report

    def _index_stored(self, store, todo: list, report: IndexReport, progress: bool, on_done) -> None:
        """Phases 2 and 3 of indexing: a codebook if needed, then the stored images ``todo`` by saved batch."""
        # Phase 2: a codebook, trained on the store when none was given.
        if self._db is None:
            self._train_codebook(store, progress)
            report.codebook_trained = True
        # Phase 3: into the database, saved batch by batch; a batch is reported done once saved.
        ready = [i for i in todo if i in store and i not in self._db]
        bar = _bar(len(ready), "indexing", progress)
        for start in range(0, len(ready), self.config.batch_size):
            batch = ready[start:start + self.config.batch_size]
            for image_id in batch:
                feats = store.get(image_id)
                if isinstance(feats, RegionFeatures):
                    self._db.add(image_id, feats.features.descriptors, regions=feats.counts)
                else:
                    self._db.add(image_id, feats.descriptors)
            self._db.save()
            report.indexed.extend(batch)
            bar.update(len(batch))
            if on_done is not None:
                on_done(batch)
        bar.close()
        self._save_tables()

    def _resolve(self, images, report: IndexReport) -> list[tuple[str, Path]]:
        from d2r.features.image import IMAGE_EXTENSIONS, list_images

        if isinstance(images, (str, Path)):
            pairs = list_images(images)
            if Path(images).is_dir():  # folders named like images are not silently passed over
                for p in Path(images).rglob("*"):
                    if p.is_dir() and p.suffix.lower() in IMAGE_EXTENSIONS:
                        report.failed[str(p)] = self._failures[str(p)] = "is a directory, not an image file"
        else:
            pairs = []
            for item in images:
                image_id, p = (str(item[0]), Path(item[1])) if isinstance(item, tuple) else (None, Path(item))
                if not p.is_file():
                    reason = "is a directory, not an image file" if p.is_dir() else "file not found"
                    report.failed[str(p)] = reason
                    self._failures[str(p)] = reason
                    continue
                pairs.extend([(image_id, p)] if image_id else list_images([p]))
        kept, seen = [], {}
        for image_id, p in pairs:
            source = str(Path(p).resolve())
            known = self._sources.get(image_id, seen.get(image_id))
            if known is not None and known != source:  # same id, another file: never skip or mix them up
                reason = f"image id {image_id!r} is already used by {known}"
                report.failed[str(p)] = self._failures[str(p)] = reason
                continue
            seen[image_id] = source
            kept.append((image_id, p))
        for image_id, source in seen.items():
            self._sources.setdefault(image_id, source)
        return kept

    def _extract_batches(self, todo, store, report: IndexReport, progress: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def work(item):
            image_id, p = item
            try:
                return image_id, p, self.extract(p), None
            except Exception as exc:  # one bad image never kills the batch: record why and go on
                return image_id, p, None, f"{type(exc).__name__}: {exc}"

        bar = _bar(len(todo), "extracting", progress)
        workers = max(1, int(self.config.workers))
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(todo), self.config.batch_size):
                for image_id, p, feats, error in pool.map(work, todo[start:start + self.config.batch_size]):
                    if error is None:
                        store.add(image_id, feats)
                        self._failures.pop(str(p), None)  # a retried image that now works
                    else:
                        log.warning("%s: %s", p, error)
                        report.failed[str(p)] = error
                        self._failures[str(p)] = error
                    bar.update(1)
                store.flush()
                self._save_tables()
        bar.close()

    def _train_codebook(self, store, progress: bool) -> None:
        from d2r.train import sample_descriptors, train_codebook

        c = self.config.codebook
        x, _ = sample_descriptors(store, per_image=c.sample_per_image, max_total=c.max_samples, seed=c.seed,
                                  progress=progress)
        k = min(c.size, x.shape[0])
        if k < c.size:
            log.warning("only %d descriptors: training %d words instead of %d", x.shape[0], k, c.size)
        book, _ = train_codebook(x, k, iterations=c.iterations, method=c.method, seed=c.seed, progress=progress,
                                 metadata={"feature": self.extractor.name, "trainset": str(self.path),
                                           "feature_fingerprint": self.extractor.fingerprint()})
        book.save(self.path / "codebook.npz")
        self._create_database(book)

    def _save_tables(self) -> None:
        _io.write_json(self.path / "sources.json", self._sources)
        _io.write_json(self.path / "failures.json", self._failures)

    def remove(self, ids, lock_timeout: float | None = 0.0) -> int:
        """Remove images by id (a single id or a list); returns how many were removed. Unknown ids: KeyError.
        Takes the engine's writer lock (waiting up to ``lock_timeout`` seconds)."""
        from d2r._lock import WriterLock

        ids = [ids] if isinstance(ids, (str, int)) else list(dict.fromkeys(ids))
        with WriterLock(self.path, timeout=lock_timeout, what="index"):
            if (self.path / "index" / "manifest.json").exists():
                self._db = Database.open(self.path / "index")
            if self._db is None:
                raise KeyError(f"{ids[0]!r}: the engine has no images yet")
            for image_id in ids:
                self._db.remove(image_id)
            self._db.save()
        return len(ids)

    def check(self, digests: bool = True) -> list[dict]:
        """Damaged files of the engine, ``[{"file", "problem"}]`` (empty: healthy): the feature store and the
        index (``index/...``: sizes, structure and, unless ``digests=False``, every BLAKE2 checksum)."""
        from d2r.features.store import check_store
        from d2r.index.database import check

        damaged = []
        if (self.path / "features").exists():
            damaged += check_store(self.path / "features", digests=digests)
        if (self.path / "index").is_dir():
            damaged += [dict(d, file=f"index/{d['file']}") for d in check(self.path / "index", digests=digests)]
        return damaged

    # ---- search --------------------------------------------------------------------------------------------------
    def search(self, image, bbox=None, top_k: int = 10, rerank: bool = True) -> list[Hit]:
        """Search with a photo (path, array or PIL image), optionally cropped to ``bbox`` = (x1, y1, x2, y2) in
        pixels. Re-ranks the top ``config.rerank.num_to_rerank`` by geometric verification when ``rerank``.
        A query without features returns the database in insertion order with score -1 (ASMK kinds)."""
        from d2r.features.image import load_image

        if self._db is None:
            raise ValueError(f"{self.path}: nothing indexed yet")
        pixels = load_image(image)
        if bbox is not None:
            pixels = crop(pixels, bbox, name=str(image) if isinstance(image, (str, Path)) else "query")
        query = self.extractor.extract(pixels)
        verify = rerank and self.config.rerank.num_to_rerank > 0 and len(query) > 0
        depth = max(int(top_k), self.config.rerank.num_to_rerank if verify else 0)
        ranking = self._db.search(query.descriptors, top_k=depth)
        ids, scores, regions = np.asarray(ranking.ids), ranking.scores, ranking.regions
        inliers = np.full(len(ids), -1, np.int64)
        if verify and len(ids):
            from d2r.rerank import rerank as verify_ranking

            position = {i: k for k, i in enumerate(ids.tolist())}
            ids, scores, inliers = verify_ranking(query, ids, scores, self._whole_image_features,
                                                  self.config.rerank)
            regions = regions[[position[i] for i in ids.tolist()]]
        hits = []
        for rank, (image_id, score, region, inl) in enumerate(zip(ids[:top_k], scores, regions, inliers)):
            hits.append(Hit(str(image_id), self._sources.get(str(image_id)), float(score),
                            self._box(image_id, int(region)), int(inl), rank + 1))
        return hits

    def _stored(self, image_id):
        return self._feature_store().get(image_id)

    def _whole_image_features(self, image_id) -> LocalFeatures:
        feats = self._stored(image_id)
        return feats.region(0) if isinstance(feats, RegionFeatures) else feats

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


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, progress: bool):
    if not progress or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")
