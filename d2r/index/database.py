"""The d2r database: an inverted file over visual words with the paper's two modes, persistent and memory-mapped.

- ``mode="aggregation"``: one item per image. Given regions, the image is aggregated with R-ASMK*/R-ASMK/R-VLAD,
  so the database costs no more than plain ASMK* (the paper's regional aggregation).
- ``mode="search"``: every region of an image is its own item (the whole image when no regions are given); an
  image's score is the maximum over its items (the paper's regional search; memory grows with the regions).

Search (:mod:`d2r.index.search`) scans only the posting lists of the query's words (numba), so its cost follows
posting-list length, not database size; VLAD kinds use exact dense dot products. Scores equal :func:`d2r.similarity`
against every image.

On disk (a directory on :mod:`d2r.storage`, see :mod:`d2r.index.manifest`): ``manifest.json`` (+
``manifest-<gen>.json`` of recent generations) is the commit point, with per-file sizes and BLAKE2 digests;
``codebook.npz``; immutable segment directories (:mod:`d2r.index.segment`); ``removed-<gen>.npy`` (bool per
image). One writer at a time holds the folder's writer lock (:class:`d2r._lock.WriterLock`) from its first change
until the save that commits it, or from ``open(..., writable=True)`` / :meth:`Database.lock` until
:meth:`Database.close`; readers never lock. Pending images spill into segments past a memory budget; ``save``
merges segments by size tier (:class:`~d2r.index.merge.MergePolicy`, verifying every file it reads), dropping
removed images, and commits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2r._lock import WriterLock
from d2r._validate import as_descriptors, as_top_k
from d2r.aggregate import Aggregated, Aggregator, idf_weights
from d2r.codebook import Codebook
from d2r.index import search as _search
from d2r.index.config import DatabaseConfig
from d2r.index.manifest import (FORMAT, FORMAT_VERSION, GENERATIONS, MANIFEST, check_database, load_codebook,
                                read_manifest, write_removed)
from d2r.index.merge import MergePolicy, merge
from d2r.index.search import EMPTY_SCORE, Ranking
from d2r.index.segment import Segment
from d2r.kernels.ivf import item_entries
from d2r.storage import DamagedError, file_record, verify_file
from d2r.aggregate import get_kernel

log = logging.getLogger(__name__)

__all__ = ["Database", "DatabaseConfig", "DamagedError", "MergePolicy", "Ranking", "EMPTY_SCORE", "FORMAT",
           "FORMAT_VERSION"]


class Database:
    """Inverted-file image database. Use :meth:`create` or :meth:`open`, never the constructor."""
    def __init__(self, path, codebook: Codebook, config: DatabaseConfig, segments, removed, generation: int,
                 id_type: str | None, writable: bool | None = None, lock_timeout: float | None = 0.0):
        self.path = None if path is None else Path(path)
        self.codebook = codebook
        self.config = config
        self.merge_policy = MergePolicy()
        self.merge_stats: dict = {}
        self._segments: list[Segment] = list(segments)
        self._set_removed(np.asarray(removed, bool))
        self._generation = generation
        self._id_type = id_type
        self._agg = Aggregator(codebook, config.kernel, config.num_assignments)
        self._query_agg = Aggregator(codebook, config.kernel, config.query_num_assignments)
        self._pending_ids: list[str] = []
        self._pending_items: list[tuple[int, int, Aggregated]] = []  # (local image, region, record)
        self._pending_bytes = 0
        self._index: dict[str, int] | None = None
        self._cache: dict = {}
        self._writable = writable  # None: lock on the first change; False: read-only
        self._hold = bool(writable)  # keep the lock after save (else released once the changes are committed)
        self._lock = None if path is None else WriterLock(self.path, lock_timeout, what="index")
        self._codebook_file: dict | None = None  # codebook.npz's record, carried from generation to generation
        self._removed_from: tuple | None = None  # (file, record) of the removal table read at open, unverified

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, codebook, kernel: str = "asmk_star", mode: str = "aggregation", alpha: float = 3.0,
               tau: float = 0.0, tau_inclusive: bool = False, normalize: bool = True, num_assignments: int = 1,
               query_num_assignments: int = 1, idf: bool = False, *, lock_timeout: float | None = 0.0) -> "Database":
        """A new, empty database at ``path`` (a directory that must not hold a database yet), or in memory when
        ``path`` is None. ``codebook`` is a :class:`Codebook` or a path to one; it is copied into the database.
        The new database holds its folder's writer lock (waiting up to ``lock_timeout`` s; None: forever)."""
        book = codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)
        given = dict(kernel=kernel, mode=mode, alpha=alpha, tau=tau, tau_inclusive=tau_inclusive,
                     normalize=normalize, num_assignments=num_assignments,
                     query_num_assignments=query_num_assignments, idf=idf)
        config = DatabaseConfig.from_dict(given)  # wrong types are errors (bool("no") was True)
        config.check(book)
        if path is None:
            return cls(None, book, config, [], np.zeros(0, bool), 0, None)
        path = Path(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path}: a database already exists here (open it, or remove the folder)")
        GENERATIONS.refuse_lost(path)  # D1: never a new index over the segments of a lost commit point
        path.mkdir(parents=True, exist_ok=True)
        db = cls(path, book, config, [], np.zeros(0, bool), 0, None, lock_timeout=lock_timeout)
        db._lock.acquire()
        try:
            if (path / MANIFEST).exists():
                raise FileExistsError(f"{path}: a database already exists here (open it, or remove the folder)")
            GENERATIONS.refuse_lost(path)
            book.save(path / "codebook.npz")
            db._codebook_file = file_record(path / "codebook.npz")
            db.save()
        except BaseException:
            db.close()
            raise
        return db

    @classmethod
    def open(cls, path, codebook=None, mmap: bool = True, *, writable: bool | None = None,
             lock_timeout: float | None = 0.0) -> "Database":
        """Open a saved database; arrays are memory-mapped and validated (cheap structural checks), so this is fast
        at any size and a damaged file raises :class:`DamagedError` naming it. A ``codebook`` given here must be
        the one the database was built with (same fingerprint).

        writable: True takes the writer lock now (before any work; a second writer fails after ``lock_timeout``
        seconds with a clear message), False opens read-only, None (default) takes the lock at the first change."""
        path = Path(path)
        lock = None
        if writable:
            if not (path / MANIFEST).is_file():
                read_manifest(path)  # DamagedError where the commit point is lost (D1), or FileNotFoundError
            lock = WriterLock(path, lock_timeout, what="index").acquire()
        try:
            db = GENERATIONS.open(path, lambda m: cls._from_manifest(path, m, codebook, mmap, writable,
                                                                     lock_timeout))
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            db._lock = lock
            db._hold = True
        return db

    @classmethod
    def _from_manifest(cls, path, manifest, codebook, mmap, writable, lock_timeout) -> "Database":
        stored = manifest["codebook"]["fingerprint"]
        if codebook is None:
            book = load_codebook(path, manifest)
        else:
            book = codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)
        if book.fingerprint != stored:
            raise ValueError(f"{path}: the database was indexed with codebook {stored} (K={manifest['codebook']['k']},"
                             f" D={manifest['codebook']['dim']}), but codebook {book.fingerprint} (K={book.size}, "
                             f"D={book.dim}) was given; use the same codebook or re-index")
        try:
            config = DatabaseConfig.from_dict(manifest["config"])
            config.check(book)
        except (ValueError, TypeError) as exc:
            raise DamagedError(path / MANIFEST, f"bad config ({exc})") from None
        segments = [Segment.read(path, rec, config.kernel, config.mode, book.size, book.dim, mmap)
                    for rec in manifest["segments"]]
        total = sum(s.num_images for s in segments)
        removed = np.zeros(total, bool)
        rec = manifest.get("removed")
        if rec:
            file = path / rec["name"]
            try:
                if rec.get("size") is not None and file.stat().st_size != rec["size"]:
                    raise ValueError(f"{file.stat().st_size} bytes, the manifest says {rec['size']}")
                removed = np.load(file, allow_pickle=False)
            except Exception as exc:
                raise DamagedError(file, f"unreadable removal table ({str(exc).splitlines()[0][:120]})") from None
            if removed.dtype != np.bool_ or removed.shape != (total,):
                raise DamagedError(file, f"removal table is {removed.dtype} {removed.shape}, expected bool "
                                   f"({total},)")
        db = cls(path, book, config, segments, removed, int(manifest["generation"]), manifest.get("id_type"),
                 writable=writable, lock_timeout=lock_timeout)
        db._codebook_file = manifest["codebook"].get("file")
        if rec and rec.get("blake2b"):
            db._removed_from = (path / rec["name"], rec)
        return db

    # ---- writer lock --------------------------------------------------------------------------------------------
    def lock(self, timeout: float | None = None) -> "Database":
        """Take the writer lock now, before any expensive work, and hold it until :meth:`close` (a no-op in memory).
        Fails with :class:`d2r._lock.LockedError` when another writer holds it past ``timeout`` seconds (default:
        the ``lock_timeout`` of open/create)."""
        self._acquire(timeout)
        self._hold = True
        return self

    def _acquire(self, timeout: float | None = None) -> None:
        if self._lock is None or self._lock.held:
            return
        if self._writable is False:
            raise ValueError(f"{self.path}: opened read-only (writable=False)")
        if timeout is not None:
            self._lock.timeout = timeout
        self._lock.acquire()
        try:
            on_disk = read_manifest(self.path)["generation"] if self._generation else 0
        except BaseException:
            self._lock.release()
            raise
        if on_disk != self._generation:
            self._lock.release()
            raise ValueError(f"{self.path}: the database was saved by another writer since it was opened "
                             f"(generation {self._generation}, now {on_disk}); reopen it and add the images again")

    def close(self) -> None:
        """Release the writer lock (changes not saved are lost to other processes; this object keeps them)."""
        self._hold = False
        if self._lock is not None:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _writing(self) -> None:
        """Called before every change: takes the writer lock (released again after the next save unless held
        by :meth:`lock` / ``open(writable=True)``)."""
        if self._lock is not None and not self._lock.held:
            self._acquire()

    # ---- contents ----------------------------------------------------------------------------------------------
    @property
    def kernel(self) -> str:
        return self.config.kernel

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def generation(self) -> int:
        return self._generation

    def _num_images_total(self) -> int:
        return sum(s.num_images for s in self._segments) + len(self._pending_ids)

    def __len__(self) -> int:
        return self._num_images_total() - int(self._removed.sum())

    def _all_ids(self) -> np.ndarray:
        if "ids" not in self._cache:
            parts = [s.image_ids for s in self._segments] + [np.asarray(self._pending_ids, dtype=str)]
            self._cache["ids"] = np.concatenate(parts) if parts else np.zeros(0, str)
        return self._cache["ids"]

    def _id_index(self) -> dict[str, int]:
        if self._index is None:
            ids = self._all_ids()
            live = np.flatnonzero(~self._removed)
            self._index = dict(zip(ids[live].tolist(), live.tolist()))
        return self._index

    def _key(self, image_id) -> str:
        if isinstance(image_id, (bool, np.bool_)):
            raise ValueError(f"image id must be a str or an int, got {image_id!r}")
        kind = "int" if isinstance(image_id, (int, np.integer)) else "str" if isinstance(image_id, str) else None
        if kind is None:
            raise ValueError(f"image id must be a str or an int, got {type(image_id).__name__}")
        if self._id_type is not None and kind != self._id_type:
            raise ValueError(f"this database uses {self._id_type} image ids, got {image_id!r}")
        return str(int(image_id)) if kind == "int" else image_id

    def _out_ids(self, keys: np.ndarray) -> np.ndarray:
        return keys.astype(np.int64) if self._id_type == "int" else keys.astype(object)

    def __contains__(self, image_id) -> bool:
        try:
            return self._key(image_id) in self._id_index()
        except ValueError:
            return False

    def __iter__(self):
        ids = self._all_ids()
        return iter(self._out_ids(ids[~self._removed]).tolist())

    def ids(self) -> np.ndarray:
        """Live image ids in insertion order."""
        return self._out_ids(self._all_ids()[~self._removed])

    def removed_ids(self) -> np.ndarray:
        """Ids of removed images whose records are still on disk (until their segments merge); an id removed
        and added again is listed too."""
        return self._out_ids(self._all_ids()[self._removed])

    # ---- adding and removing ------------------------------------------------------------------------------------
    def add(self, image_id, descriptors, regions=None, *, assignments=None) -> None:
        """Index one image. ``descriptors`` (N, D) float32 (or an object with ``.descriptors``), concatenated
        region by region when ``regions`` (per-region counts, whole image first) is given."""
        key = self._key(image_id)
        if key in self._id_index():
            raise ValueError(f"image {image_id!r} is already in the database (remove it first)")
        self._writing()
        x = getattr(descriptors, "descriptors", descriptors)
        if self.mode == "aggregation":
            records = [self._agg(x, regions, assignments=assignments)]
        elif regions is None:
            records = [self._agg(x, assignments=assignments)]
        else:
            records = self._agg.per_region(x, regions, assignments=assignments)
        self._append(image_id, key, records)

    def add_aggregated(self, image_id, records) -> None:
        """Index one image from records aggregated elsewhere (e.g. in parallel workers): one
        :class:`Aggregated` in aggregation mode, or a list of them (one per region) in search mode."""
        key = self._key(image_id)
        if key in self._id_index():
            raise ValueError(f"image {image_id!r} is already in the database (remove it first)")
        records = [records] if isinstance(records, Aggregated) else list(records)
        if self.mode == "aggregation" and len(records) != 1:
            raise ValueError(f"aggregation mode takes one record per image, got {len(records)}")
        for r in records:
            self._as_query(r)  # same kernel, K and D
        self._writing()
        self._append(image_id, key, records)

    def _append(self, image_id, key, records) -> None:
        local = len(self._pending_ids)
        self._pending_ids.append(key)
        self._pending_items.extend((local, r, rec) for r, rec in enumerate(records))
        self._pending_bytes += sum(_record_bytes(rec) for rec in records) + 100 * len(records)
        if self._num_removed_slots == self._removed_buf.shape[0]:  # grow by doubling: O(1) amortised per add
            self._removed_buf = np.concatenate([self._removed_buf, np.zeros(max(16, self._num_removed_slots), bool)])
        self._removed_buf[self._num_removed_slots] = False
        self._num_removed_slots += 1
        self._id_index()[key] = self._num_images_total() - 1
        if self._id_type is None:
            self._id_type = "int" if isinstance(image_id, (int, np.integer)) else "str"
        self._changed()
        if self._pending_bytes > self.merge_policy.spill_bytes:
            self._spill()
            self._merge_tiers()

    def add_batch(self, images, progress: bool = False, chunk_descriptors: int = 200_000) -> int:
        """Index many images: ``images`` yields ``(image_id, descriptors, regions_or_None)``. Descriptors of
        consecutive images are assigned to words in one GEMM (``chunk_descriptors`` at a time); pending records
        spill into segments (on disk for a saved database) past ``merge_policy.spill_bytes``. Returns the count."""
        from tqdm.auto import tqdm

        added = 0
        batch: list = []
        size = 0

        def flush():
            nonlocal added, size
            if not batch:
                return
            xs = [as_descriptors(getattr(b[1], "descriptors", b[1]), self.codebook.dim) for b in batch]
            words = self.codebook.assign(np.concatenate(xs), self.config.num_assignments)
            start = 0
            for (image_id, _, regions), x in zip(batch, xs):
                self.add(image_id, x, regions, assignments=words[start:start + len(x)])
                start += len(x)
                added += 1
            batch.clear()
            size = 0

        for item in tqdm(images, disable=not progress, desc="indexing", unit="img"):
            image_id, x, regions = item if len(item) == 3 else (*item, None)
            batch.append((image_id, x, regions))
            size += len(getattr(x, "descriptors", x))
            if size >= chunk_descriptors:
                flush()
        flush()
        return added

    def remove(self, image_id) -> None:
        """Remove an image; searches exclude it at once, ``save`` persists it, merges reclaim its space."""
        key = self._key(image_id)
        index = self._id_index().get(key)
        if index is None:
            raise KeyError(f"image {image_id!r} is not in the database")
        self._writing()
        del self._id_index()[key]
        self._removed_buf[index] = True
        self._changed()

    def _changed(self) -> None:
        for k in ("item_image", "ids", "idf", "item_weight", "stats", "item_words"):
            self._cache.pop(k, None)

    @property
    def _removed(self) -> np.ndarray:
        """(images,) bool: removed flag of every image, by global index (a view of a growable buffer)."""
        return self._removed_buf[: self._num_removed_slots]

    def _set_removed(self, removed: np.ndarray) -> None:
        self._removed_buf = np.array(removed, bool)
        self._num_removed_slots = self._removed_buf.shape[0]

    # ---- segments: spilling and merging ----------------------------------------------------------------------
    def _spill(self) -> None:
        """Turn the pending images into a segment: written to disk (memory-mapped back) for a saved database."""
        if not self._pending_ids:
            return
        local, region, records = zip(*self._pending_items) if self._pending_items else ((), (), ())
        seg = Segment.build(self.kernel, self.codebook.size, self.codebook.dim, self._pending_ids, local, region,
                            records)
        self._pending_ids, self._pending_items, self._pending_bytes = [], [], 0
        if self.path is not None:
            seg = self._persist(seg)
        self._segments.append(seg)
        self._cache.pop("ids", None)

    def _persist(self, seg: Segment) -> Segment:
        self._writing()
        name = self._new_name()
        seg.write(self.path, name, self.kernel)
        self.merge_stats["bytes_written"] = self.merge_stats.get("bytes_written", 0) + seg.nbytes()
        return Segment.read(self.path, seg.record(), self.kernel, self.mode, self.codebook.size, self.codebook.dim)

    def _new_name(self) -> str:
        return f"seg-{self._generation + 1:08d}-{uuid.uuid4().hex[:12]}"

    def _sizes(self) -> list[int]:
        return [s.nbytes() for s in self._segments]

    def _merge_tiers(self) -> None:
        while True:
            window = self.merge_policy.plan(self._sizes())
            if not window:
                return
            self._merge(window[0], window[-1] + 1)

    def _merge(self, start: int, stop: int) -> None:
        """Merge ``segments[start:stop]`` into one segment without their removed images; images before keep their
        global indices."""
        segments = self._segments[start:stop]
        if not segments:
            return
        self._writing()
        first = sum(s.num_images for s in self._segments[:start])
        removed, pos = [], first
        for s in segments:
            removed.append(self._removed[pos:pos + s.num_images])
            pos += s.num_images
        root = self.path
        merged = merge(segments, removed, self.kernel, self.codebook.size, self.codebook.dim, self.mode,
                              self.merge_policy.chunk_entries, root=root,
                              name=None if root is None else self._new_name(), stats=self.merge_stats)
        self.merge_stats["merges"] = self.merge_stats.get("merges", 0) + 1
        self.merge_stats["bytes_written"] = self.merge_stats.get("bytes_written", 0) + merged.nbytes()
        self._segments = self._segments[:start] + [merged] + self._segments[stop:]
        self._set_removed(np.concatenate([self._removed[:first], np.zeros(merged.num_images, bool),
                                          self._removed[pos:]]))
        self._index = None
        self._changed()

    def _searchable(self) -> list[Segment]:
        """All segments, after turning images added since the last call into a new segment."""
        if self._pending_ids:
            self._spill()
            self._merge_tiers()
        return self._segments

    # ---- search ------------------------------------------------------------------------------------------------
    def _item_image(self) -> np.ndarray:
        """Global image index of every item, over all segments."""
        if "item_image" not in self._cache:
            parts, start = [], 0
            for s in self._searchable():
                parts.append(np.asarray(s.item_image, np.int64) + start)
                start += s.num_images
            self._cache["item_image"] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._cache["item_image"]

    def _item_words(self) -> np.ndarray:
        if "item_words" not in self._cache:
            parts = [np.asarray(s.item_words) for s in self._searchable()]
            self._cache["item_words"] = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
        return self._cache["item_words"]

    def statistics(self) -> dict:
        """Corpus statistics over live items, for combining shards: ``df`` (K,) int64 document frequencies,
        ``items`` live item count, ``images`` live image count."""
        if "stats" not in self._cache:
            item_live = ~self._removed[self._item_image()]
            df = _search.document_frequencies(self._searchable(), item_live, self.codebook.size)
            self._cache["stats"] = {"df": df, "items": int(item_live.sum()), "images": len(self)}
        s = self._cache["stats"]
        return {"df": s["df"].copy(), "items": s["items"], "images": s["images"]}

    def idf(self) -> np.ndarray:
        """(K,) float64 idf_c = log(N / max(df_c, 1)) over live items (N items, df_c of them hold word c)."""
        if "idf" not in self._cache:
            s = self.statistics()
            self._cache["idf"] = np.log(max(s["items"], 1) / np.maximum(s["df"], 1))
        return self._cache["idf"]

    def _weights(self, idf=None) -> np.ndarray:
        if idf is not None:
            if not self.config.idf:
                raise ValueError("idf given, but this database does not weight words by idf (config idf=false)")
            idf = np.asarray(idf, np.float64)
            if idf.shape != (self.codebook.size,) or not np.all(np.isfinite(idf)):
                raise ValueError(f"idf: expected ({self.codebook.size},) finite float64, got {idf.shape}")
            return idf_weights(idf, self.codebook.size)
        return idf_weights(self.idf(), self.codebook.size) if self.config.idf else np.zeros(0)

    def _item_weight_sums(self, weights) -> np.ndarray:
        key = hashlib.blake2b(weights.tobytes(), digest_size=16).digest()
        cached = self._cache.get("item_weight")
        if cached is None or cached[0] != key:
            cached = (key, _search.weight_sums(self._searchable(), weights))
            self._cache["item_weight"] = cached
        return cached[1]

    def _as_query(self, query) -> Aggregated:
        if isinstance(query, Aggregated):
            if (query.kernel, query.num_words, query.dim) != (self.kernel, self.codebook.size, self.codebook.dim):
                raise ValueError(f"query is {query.kernel} with K={query.num_words}, D={query.dim}; the database "
                                 f"is {self.kernel} with K={self.codebook.size}, D={self.codebook.dim}")
            return query
        return self._query_agg(getattr(query, "descriptors", query))

    def item_scores(self, query, *, idf=None, _threads=None) -> np.ndarray:
        """Score of every item (over all segments, removed ones included): exactly ``similarity(q, item)``.
        ``idf`` (K,) float64 replaces the database's own idf (e.g. statistics combined over shards)."""
        q = self._as_query(query)
        segments = self._searchable()
        weights = self._weights(idf) if self.kernel != "vlad" else np.zeros(0)
        return _search.item_scores(segments, q, self.kernel, self.config, weights, self._item_words(),
                                   lambda: self._item_weight_sums(weights), threads=_threads)

    def image_scores(self, query, *, idf=None, _threads=None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, best item) per image (global index); removed images score -inf."""
        items = self.item_scores(query, idf=idf, _threads=_threads)
        return _search.image_scores(items, self._item_image(), self._num_images_total(), self.mode, self._removed)

    def search(self, query, top_k: int = 100, *, within=None, idf=None, _threads=None) -> Ranking:
        """Rank the database for a query: (N, D) descriptors (aggregated with ``query_num_assignments``, no
        regions), an object with ``.descriptors``, or an :class:`Aggregated` record. Top-k by partial selection;
        equal scores are ordered by insertion. ``within``: image ids (a two-stage search's shortlist): only
        these are ranked, with the scores the whole search gives them (ids not in the database are left out).
        ``idf``: as in :meth:`item_scores`. ``top_k``: a positive integer (ValueError otherwise)."""
        top_k = as_top_k(top_k)  # checked before the scan
        rows = None if within is None else self._rows_of(within)
        scores, best = self.image_scores(query, idf=idf, _threads=_threads)
        k = min(top_k, len(self) if rows is None else len(rows))
        if k <= 0:
            return Ranking(self._out_ids(np.zeros(0, str)), np.zeros(0), np.zeros(0, np.int64))
        # rows ascending: the sub-array keeps insertion order, so ties break as in the whole search
        top = _search.top_k(scores, k) if rows is None else rows[_search.top_k(scores[rows], k)]
        regions = np.zeros(k, np.int64)
        if self.mode == "search":
            region_of = self._item_regions()
            valid = best[top] >= 0
            regions[valid] = region_of[best[top][valid]]
        return Ranking(self._out_ids(self._all_ids()[top]), scores[top], regions)

    def _rows_of(self, ids) -> np.ndarray:
        """Ascending rows (insertion positions) of the live images among ``ids``, int64."""
        index = self._id_index()
        rows = []
        for image_id in np.asarray(ids, object).reshape(-1).tolist():
            try:
                row = index.get(self._key(image_id))
            except ValueError:
                row = None
            if row is not None:
                rows.append(row)
        return np.unique(np.asarray(rows, np.int64))

    def record(self, image_id) -> Aggregated:
        """The aggregated record the index holds for an image, read back from its segment: its one item in
        aggregation mode (the regional aggregation when it was indexed with regions), its whole-image item
        (region 0) in regional-search mode. Query expansion averages these instead of re-aggregating the
        neighbours' features. KeyError for an id not in the database."""
        key = self._key(image_id)
        segments = self._searchable()  # images added since the last search become a segment first
        index = self._id_index().get(key)
        if index is None:
            raise KeyError(f"image {image_id!r} is not in the database")
        for seg in segments:
            if index < seg.num_images:
                break
            index -= seg.num_images
        item_image = np.asarray(seg.item_image)
        lo, hi = np.searchsorted(item_image, index, "left"), np.searchsorted(item_image, index, "right")
        whole = np.flatnonzero(np.asarray(seg.item_region[lo:hi]) == 0)
        item = int(lo + (whole[0] if whole.size else 0))
        kernel = get_kernel(self.kernel)
        if not kernel.per_word:
            return kernel.record(self.codebook.dim, self.codebook.size, np.array(seg.payload[item]))
        words, entries = item_entries(seg.offsets, seg.items, seg.blocks, item)
        return kernel.record(self.codebook.dim, self.codebook.size, np.array(seg.payload[entries]), words)

    def search_batch(self, queries, top_k: int = 100, workers: int | None = None, *, idf=None) -> list[Ranking]:
        """Search several queries; the numba scans release the GIL, so threads run them in parallel."""
        top_k = as_top_k(top_k)
        queries = list(queries)
        self._searchable(), self._item_image(), self._item_words()  # build shared caches once, before the threads
        if self.config.idf:
            self._item_weight_sums(self._weights(idf))
        workers = workers or min(len(queries), os.cpu_count() or 1)
        if workers <= 1:
            return [self.search(q, top_k, idf=idf) for q in queries]
        with ThreadPoolExecutor(workers) as pool:
            # one scan thread per query: the queries already fill the cores
            return list(pool.map(lambda q: self.search(q, top_k, idf=idf, _threads=1), queries))

    def _item_regions(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.item_region, np.int64) for s in self._searchable()])

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Persist added and removed images: new segments, tiered merges, then the manifest (the commit point).
        Crash-safe; readers see the previous generation until the commit. Takes the writer lock if not held."""
        if self.path is None:
            raise ValueError("this database lives in memory (created with path=None); nothing to save to")
        self._writing()
        self._spill()
        for i, seg in enumerate(self._segments):
            if seg.name is None:  # built in memory (e.g. before the database had a path)
                self._segments[i] = self._persist(seg)
        self._merge_tiers()
        generation = self._generation + 1
        if self._removed_from is not None:  # the removal table read at open is carried on only if intact (D4)
            verify_file(*self._removed_from)
            self._removed_from = None
        if self._codebook_file is None:  # a database of an older format: its codebook gets a record now
            self._codebook_file = file_record(self.path / "codebook.npz")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "generation": generation,
            "config": self.config.to_dict(),
            "codebook": {"fingerprint": self.codebook.fingerprint, "k": self.codebook.size, "dim": self.codebook.dim,
                         "file": self._codebook_file},
            "segments": [s.record() for s in self._segments],
            "removed": write_removed(self.path, generation, self._removed), "id_type": self._id_type,
            "counts": self.info(files=False)["counts"],
        }
        if (self.path / MANIFEST).exists():
            on_disk = read_manifest(self.path)["generation"]
            if on_disk != self._generation:
                raise ValueError(f"{self.path}: the database was saved by another writer since it was opened "
                                 f"(generation {self._generation} expected); reopen it and add the images again")
        GENERATIONS.commit(self.path, manifest)
        self._generation = generation
        GENERATIONS.collect_garbage(self.path, manifest)
        if not self._hold:
            self._lock.release()

    def compact(self) -> None:
        """Merge every segment (and pending images) into one, dropping removed images. Committed at next ``save``."""
        self._searchable()
        if len(self._segments) > 1 or self._removed.any():
            self._merge(0, len(self._segments))

    # ---- damage ------------------------------------------------------------------------------------------------
    def check(self) -> list[dict]:
        """Verify every file of the committed generation on disk (sizes, BLAKE2 digests, structure). Returns the
        damaged files, ``[{"file": relative path, "problem": text}]`` (empty when healthy)."""
        if self.path is None:
            return []
        return check_database(self.path)

    def info(self, files: bool = True) -> dict:
        """Counts and sizes (JSON-ready)."""
        segments = self._searchable()
        entries = sum(s.num_entries for s in segments)
        nbytes = sum(s.nbytes() for s in segments)
        posting = sum((s.items.nbytes + s.payload.nbytes) for s in segments if s.items is not None)
        out = {
            "path": None if self.path is None else str(self.path),
            "config": self.config.to_dict(),
            "codebook": {"fingerprint": self.codebook.fingerprint, "k": self.codebook.size, "dim": self.codebook.dim},
            "counts": {"images": len(self), "images_total": self._num_images_total(),
                       "items": sum(s.num_items for s in segments), "entries": entries},
            "segments": len(self._segments),
            "generation": self._generation,
            "bytes": nbytes,
            "bytes_per_entry": (posting / entries) if entries else None,
        }
        if files and self.path is not None:
            out["bytes_on_disk"] = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return out

    def __repr__(self) -> str:
        return (f"Database({self.kernel}, mode={self.mode}, images={len(self)}, "
                f"path={None if self.path is None else str(self.path)!r})")


def _record_bytes(rec: Aggregated) -> int:
    return sum(a.nbytes for a in (rec.vector, rec.words, rec.descriptors, rec.bits) if a is not None)
