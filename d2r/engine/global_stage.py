"""The engine's global stage (two-stage search): one global vector per indexed image, kept in ``<engine>/global/``.

With the ``global`` section enabled (:class:`~d2r.query.config.GlobalStageConfig`), indexing gives every image a
global vector (:class:`~d2r.globaldesc.GlobalExtractor`, the ``[learned]`` extra) in a
:class:`~d2r.globaldesc.GlobalIndex` (the storage layer: hashed files, generations, one writer), and a search
starts from the ``global.shortlist`` images of largest inner product (:func:`d2r.query.pipeline.global_shortlist`).

The global index keys images by a 64-bit hash of the engine's image id (:func:`image_key`; it holds int64 ids);
a hash shared by two ids is refused when the second is added. The index records the extractor's fingerprint: an
engine whose ``global`` options changed refuses its old vectors (one line naming the folder) instead of mixing
two kinds of vectors.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import numpy as np

from d2r.build import extract_into
from d2r.globaldesc.extractor import GlobalExtractor
from d2r.globaldesc.index import GlobalIndex
from d2r.query.pipeline import global_shortlist
from d2r.storage import MANIFEST

log = logging.getLogger(__name__)

FOLDER = "global"


def image_key(image_id) -> int:
    """The global index's int64 key of an engine image id: the first 8 bytes of its BLAKE2b digest."""
    digest = hashlib.blake2b(str(image_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class GlobalStage:
    """The global vectors of one engine folder: extraction at index time, the shortlist at query time."""

    def __init__(self, engine_path: Path, config):
        self.path = Path(engine_path) / FOLDER
        self.config = config  # GlobalStageConfig, enabled
        self._extractor = None
        self._index: GlobalIndex | None = None
        self._keys: tuple | None = None  # ((database generation, size), {key: image id})
        self._fingerprint: str | None = None
        self._lock = threading.RLock()

    @property
    def extractor(self):
        """The :class:`~d2r.globaldesc.GlobalExtractor` (model loaded on first use; ImportError naming the
        ``[learned]`` extra when torch is missing)."""
        with self._lock:
            if self._extractor is None:
                self._extractor = GlobalExtractor(self.config.extractor_config())
            return self._extractor

    def exists(self) -> bool:
        return (self.path / MANIFEST).exists()

    def reader(self) -> GlobalIndex | None:
        """The global index, opened on first use and kept, as the engine keeps its local index (no file read
        per query); this process's own add / remove reopen it. None when there is none."""
        with self._lock:
            if self._index is None:
                if not self.exists():
                    return None
                self._index = GlobalIndex.open(self.path)
                self._check_fingerprint(self._index)
            return self._index

    def _reopen(self) -> None:
        with self._lock:
            self._index = None

    def _check_fingerprint(self, index: GlobalIndex) -> None:
        have = index.metadata.get("fingerprint")
        want = self._fingerprint = self._fingerprint or self.extractor.fingerprint()
        if have != want:
            raise ValueError(f"{self.path}: global vectors of another extractor (fingerprint {have}, the engine's "
                             f"global options give {want}); set the options back or remove the folder and "
                             f"index again")

    def writer(self) -> GlobalIndex:
        """The global index opened writable (created on first use); the caller closes it."""
        if self.exists():
            index = GlobalIndex.open(self.path, writable=True)
            try:
                self._check_fingerprint(index)
            except BaseException:
                index.close()
                raise
            return index
        ex = self.extractor
        return GlobalIndex.create(self.path, ex.dim, metadata={"fingerprint": ex.fingerprint(),
                                                               "config": self.config.extractor_config().to_dict()})

    def add_images(self, pairs, progress: bool = True, batch_size: int = 64) -> dict:
        """Extract and add the global vector of each ``(image_id, file)`` not in the global index yet, saved
        every ``batch_size`` images (an interruption keeps the saved batches). An image whose file cannot be
        read is counted in ``failed`` (its local features are indexed; it just never enters a shortlist).
        Returns ``{"extracted": n, "failed": n}``."""
        pairs = list(pairs)
        index = self.writer()
        try:
            held = index.contains(np.fromiter((image_key(i) for i, _ in pairs), np.int64, len(pairs)))
            todo = [(i, f) for (i, f), h in zip(pairs, held.tolist()) if not h and f is not None]
            sink = _Sink(index)
            ex = self.extractor
            counts = extract_into(sink, todo, lambda image_id, source: ex.extract(source), workers=1,
                                  batch_size=batch_size, progress=progress, desc="global vectors",
                                  on_image=sink.failed)
        finally:
            index.close()
            self._reopen()
        return counts

    def remove(self, ids) -> int:
        """Remove the global vectors of ``ids`` (those it holds); returns how many."""
        if not self.exists():
            return 0
        index = GlobalIndex.open(self.path, writable=True)
        try:
            keys = np.fromiter((image_key(i) for i in ids), np.int64)
            keys = keys[index.contains(keys)]
            if keys.size:
                index.remove(keys)
                index.save()
            return int(keys.size)
        finally:
            index.close()
            self._reopen()

    def shortlist(self, pixels, db) -> tuple[np.ndarray, np.ndarray]:
        """The global stage of one query image (pixels as loaded, cropped to its box): ``(ids, scores)`` of the
        ``shortlist`` database images of largest inner product, best first; image ids as ``db`` holds them."""
        index = self.reader()
        if index is None:
            return np.zeros(0, object), np.zeros(0)
        keys, scores = global_shortlist(index, self.extractor.extract(pixels), self.config.shortlist)
        of = self._ids_by_key(db, index)
        found = [(of[k], s) for k, s in zip(keys.tolist(), scores.tolist()) if k in of]
        return (np.array([i for i, _ in found], object), np.array([s for _, s in found], np.float64))

    def _ids_by_key(self, db, index: GlobalIndex) -> dict:
        """key -> image id of every image of ``db`` (cached per database generation and size)."""
        stamp = (db.generation, len(db))  # the map depends on the database only
        cached = self._keys
        if cached is None or cached[0] != stamp:
            cached = (stamp, {image_key(i): i for i in db.ids().tolist()})
            self._keys = cached
        return cached[1]

    def info(self) -> dict:
        """Sizes and settings, without loading the model (the fingerprint is checked by a search)."""
        with self._lock:
            index = self._index
        if index is None and self.exists():
            with GlobalIndex.open(self.path) as index:
                vectors = len(index)
        else:
            vectors = 0 if index is None else len(index)
        return {"path": str(self.path), "vectors": vectors,
                "shortlist": self.config.shortlist, "weight": self.config.weight}


class _Sink:
    """The feature-store side of :func:`d2r.build.extract_into` for global vectors: add, then save per batch."""

    def __init__(self, index: GlobalIndex):
        self.index = index

    def add(self, image_id, vector) -> None:
        key = image_key(image_id)
        if key in self.index:
            raise ValueError(f"{self.index.path}: image ids collide in the global index: {image_id!r}")
        self.index.add(np.array([key], np.int64), np.asarray(vector, np.float32)[None])

    def flush(self) -> None:
        self.index.save()

    def failed(self, image_id, source, error) -> None:
        if error is not None:
            log.warning("%s: no global vector: %s", source, error)
