"""The feature store: many images' local features in a few large, immutable, checksummed shards (the layout
and format: :mod:`d2r.features.store.format`), on the generations of :mod:`d2r.storage`.

Writing: one writer per store (an OS lock on ``.lock``, taken by ``create`` / ``open(mode="a")`` before
anything else). Images are buffered and written as a shard once ``shard_bytes`` (default 256 MiB) are
buffered, or at an explicit ``flush``; every file is written atomically under a unique name, then a new
manifest generation is committed. Small shards are merged into large ones by a tiered compaction
(:data:`TIERS`) that runs after a commit when ``COMPACT_AT`` shards of similar size accumulate: the merged
shard is written and committed before the old ones are retired, and every file it reads is verified first.
Shards no kept generation needs are deleted by the garbage collection of :mod:`d2r.storage.generations` (a
reader of an older generation keeps working; one whose shards are gone moves to the newest generation, never
reading an image twice); shard files no manifest lists are deleted only once they are older than
``GC_GRACE_SECONDS`` (a distributed run's ShardWriter may still be writing or about to commit them).

Reading never locks: ``open`` reads one manifest generation, checks every file's size and every shard's ids,
and each shard is validated (dtypes, shapes, offsets) when first used, so a damaged file raises
:class:`~d2r.storage.DamagedError` naming it instead of reaching a kernel. ``check()`` verifies every BLAKE2
digest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from d2r._io import atomic_path
from d2r._lock import WriterLock
from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.features.store import format as fmt
from d2r.features.store.format import (DEFAULT_SHARD_BYTES, FORMAT, FORMAT_VERSION, MANIFEST, Shard,
                                       check_sizes, damaged, generations, id_list, keys, load_ids, load_shard,
                                       read_manifest, record_problem, remove_shard_files, shard_file, stamp,
                                       verify_shard)
from d2r.features.store.check import check_manifest
from d2r.features.store.writer import Buffer, ShardWriter, check_features
from d2r.storage import DamagedError, TierPolicy, file_record

log = logging.getLogger(__name__)

FLUSH_SECONDS = 60.0  # buffered features are committed at least this often (a killed run keeps the rest)
COMPACT_AT = 8  # this many small shards of one size tier are merged into one
CACHE_SHARDS = 256  # shards whose headers and small arrays are cached per store (no files held open)
# Tiers by log_8 of a shard's bytes; any small shards of one tier merge (their order in the store may change).
TIERS = TierPolicy(factor=COMPACT_AT, floor_bytes=1, max_segments=None, adjacent=False)


class _View:
    """One manifest generation as seen by this process: ``records`` (live shards, store order), ``by_name``
    (live shards and those retired by the previous generation, still readable) and ``index`` image id ->
    (shard name, row)."""
    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.manifest = manifest
        self.records = list(manifest["shards"])
        self.by_name = {r["name"]: r for r in self.records}
        self.index: dict[str, tuple[str, int]] = {}
        for rec in self.records:
            self._add(rec)

    def _add(self, rec: dict) -> None:
        check_sizes(self.folder, rec)
        skip = set(rec.get("skip", []))
        name = rec["name"]
        for row, image_id in enumerate(load_ids(self.folder, rec)):
            if row in skip:
                continue
            if image_id in self.index:
                raise damaged(shard_file(self.folder, name, "ids"), f"image {image_id!r} is already in shard "
                              f"{self.index[image_id][0]} (the manifest does not mask it)")
            self.index[image_id] = (name, row)

    def apply(self, manifest: dict, doomed: list[str]) -> None:
        """Writer side: move to the next generation in place, reading only the new shards' ids."""
        new = [r for r in manifest["shards"] if r["name"] not in self.by_name]
        self.records = list(manifest["shards"])
        for rec in new:
            self.by_name[rec["name"]] = rec
            skip = set(rec.get("skip", []))
            for row, image_id in enumerate(load_ids(self.folder, rec)):
                if row not in skip:
                    self.index[image_id] = (rec["name"], row)
        for name in doomed:
            self.by_name.pop(name, None)
        self.manifest = manifest

    def position(self) -> dict[str, int]:
        return {r["name"]: k for k, r in enumerate(self.records)}


# ---------------------------------------------------------------------------------------------- FeatureStore
class FeatureStore:
    """A feature store folder. ``create`` / ``open`` it; ``add`` buffers and writes a shard every
    ``shard_bytes``, or once ``flush_seconds`` passed since the last commit; ``flush`` writes and commits
    what is buffered; ``close`` (or leaving a ``with`` block) flushes, collects garbage and releases the
    writer lock.

    Reading (lock-free, any number of threads): ``len(store)``, ``store.ids()``, ``image_id in store``,
    ``store.get(image_id)``, ``store.get_many(ids)``, ``for image_id, feats in store`` (streams shard by
    shard), ``store.load_shard(i)``; ``store.check()`` verifies every checksum.
    """
    def __init__(
        self,
        path,
        manifest: dict,
        writable: bool,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        shard_size: int | None = None,
        lock: WriterLock | None = None,
    ):
        self.path = Path(path)
        if not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        if shard_size is not None and (not isinstance(shard_size, (int, np.integer)) or shard_size < 1):
            raise ValueError(f"shard_size must be a positive integer or None, got {shard_size!r}")
        self.writable = writable
        self.shard_bytes = int(shard_bytes)
        self.shard_size = None if shard_size is None else int(shard_size)
        self.flush_seconds = FLUSH_SECONDS
        self._flushed_at = time.monotonic()
        self._writer_lock = lock
        self._lock = threading.RLock()  # writers' state (buffer, manifest); readers never take it
        self._fill_lock = threading.Lock()  # only around loading a shard into the cache
        self._cache: OrderedDict[str, Shard] = OrderedDict()
        self._view = manifest if isinstance(manifest, _View) else _View(self.path, manifest)
        self._stamp = None
        self._writer = ShardWriter.__new__(ShardWriter)  # the same machinery as a distributed worker
        if writable:
            self._writer.__init__(self.path, manifest["dim"], self.shard_bytes)
            self._pending_failures: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ open/create
    @classmethod
    def create(
        cls,
        path,
        extractor_info: dict,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        exist_ok: bool = True,
        lock_timeout: float | None = 0.0,
        shard_size: int | None = None,
    ) -> "FeatureStore":
        """Create a store for features of the extractor described by ``extractor_info`` ({name, config,
        fingerprint, dim}) and open it for writing (taking the writer lock, waiting up to ``lock_timeout``
        seconds). An existing store is reopened for appending if ``exist_ok`` and its extractor fingerprint
        and dim match; otherwise ValueError (features of different extractors never mix)."""
        path = Path(path)
        for key in ("name", "fingerprint", "dim"):
            if key not in extractor_info:
                raise ValueError(f"extractor_info needs {key!r}, got keys {sorted(extractor_info)}")
        if (path / MANIFEST).exists() and not exist_ok:
            raise FileExistsError(f"{path}: a feature store already exists")
        if not (path / ".lock").exists():  # else a writer may be creating it: the lock decides (D18)
            cls._check_empty(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path, timeout=lock_timeout, what="feature store").acquire()
        try:
            if (path / MANIFEST).exists():  # also when another creator won the race for the lock
                store = cls._open_locked(path, lock, shard_bytes, shard_size)
                have = store.manifest["extractor"]
                same = have["fingerprint"] == extractor_info["fingerprint"]
                if not same or int(store.dim) != int(extractor_info["dim"]):
                    store.close()
                    raise ValueError(
                        f"{path}: store holds {have.get('name')} features "
                        f"(fingerprint {have['fingerprint']}, D={store.dim}), not {extractor_info['name']} "
                        f"(fingerprint {extractor_info['fingerprint']}, D={extractor_info['dim']})"
                    )
                return store
            cls._check_empty(path)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "generation": 0,
                "extractor": {
                    "name": extractor_info["name"],
                    "config": extractor_info.get("config", {}),
                    "fingerprint": extractor_info["fingerprint"],
                },
                "dim": int(extractor_info["dim"]),
                "num_images": 0,
                "num_features": 0,
                "shards": [],
                "failures": {},
            }
            generations().commit(path, manifest)
            return cls(
                path, manifest, writable=True, shard_bytes=shard_bytes, shard_size=shard_size, lock=lock
            )
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _check_empty(path: Path) -> None:
        """A new store goes into a new or empty folder only: never over the shards of a lost manifest (D1)."""
        if (path / MANIFEST).exists() or not path.exists():
            return
        generations().refuse_lost(path)
        if any(p.name != ".lock" for p in path.iterdir()):
            raise FileExistsError(f"{path}: folder exists, is not empty and holds no feature store")

    @classmethod
    def open(
        cls,
        path,
        mode: str = "r",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        lock_timeout: float | None = 0.0,
        shard_size: int | None = None,
    ) -> "FeatureStore":
        """Open an existing store for reading (``"r"``, no lock) or appending (``"a"``: takes the writer lock,
        waiting up to ``lock_timeout`` seconds, None = forever)."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not (path / MANIFEST).exists():
            read_manifest(path)  # DamagedError where the manifest is lost (D1), else FileNotFoundError
        if mode == "r":
            mark = stamp(path)  # taken before reading: a commit in between shows as a change later
            view = generations().open(path, lambda m: _View(path, m))
            store = cls(path, view, writable=False, shard_bytes=shard_bytes, shard_size=shard_size)
            store._stamp = mark
            return store
        lock = WriterLock(path, timeout=lock_timeout, what="feature store").acquire()
        try:
            return cls._open_locked(path, lock, shard_bytes, shard_size)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open_locked(cls, path, lock, shard_bytes, shard_size) -> "FeatureStore":
        manifest = read_manifest(path)
        store = cls(path, manifest, writable=True, shard_bytes=shard_bytes, shard_size=shard_size, lock=lock)
        if (manifest["format_version"] < FORMAT_VERSION or not generations().files(path)
                or any("files" not in r for r in manifest["shards"])):
            store._upgrade()
        store.gc()
        return store

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def manifest(self) -> dict:
        return self._view.manifest

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def extractor(self) -> dict:
        return dict(self.manifest["extractor"])

    @property
    def failures(self) -> dict:
        if self.writable:
            return {**self.manifest["failures"], **self._pending_failures}
        return dict(self.manifest["failures"])

    @property
    def num_shards(self) -> int:
        return len(self._view.records)

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    def __len__(self) -> int:
        return len(self._view.index) + (len(self._writer._buffer.items) if self.writable else 0)

    def __contains__(self, image_id) -> bool:
        return image_id in self._view.index or (self.writable and image_id in self._writer._buffer.items)

    def ids(self) -> list[str]:
        """All stored image ids in store order (committed shards, then the unflushed buffer)."""
        view = self._view
        pos = view.position()
        out = sorted(view.index, key=lambda i: (pos[view.index[i][0]], view.index[i][1]))
        return out + (list(self._writer._buffer.items) if self.writable else [])

    def info(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path),
            "images": len(self),
            "shards": self.num_shards,
            "features": int(m["num_features"]),
            "generation": self.generation,
            "bytes": int(sum(r.get("bytes", 0) for r in m["shards"])),
            "failures": len(m["failures"]),
            "extractor": self.extractor,
            "dim": self.dim,
        }

    # ------------------------------------------------------------------------------------------ writing
    def _need_writable(self):
        if not self.writable:
            raise ValueError(f"{self.path}: store opened read-only")
        if self._writer_lock is None or not self._writer_lock.held:
            raise ValueError(f"{self.path}: store was closed")

    def add(self, image_id: str, features: LocalFeatures | RegionFeatures, source=None) -> None:
        """Buffer one image's features (and the file they came from, kept in the store: ``source``); writes
        and commits a shard once ``shard_bytes`` are buffered."""
        self._need_writable()
        image_id = str(image_id)
        source = check_features(image_id, features, self.dim, source)
        with self._lock:
            if image_id in self:
                raise ValueError(f"{image_id}: already in the store {self.path}")
            self._writer._buffer.add(image_id, features, source)
            self._pending_failures.pop(image_id, None)
            buf = self._writer._buffer
            full = buf.bytes >= self.shard_bytes or (
                self.shard_size is not None and len(buf.items) >= self.shard_size
            ) or time.monotonic() - self._flushed_at >= self.flush_seconds  # a SIGKILL lost up to 256 MiB
        if full:
            self.flush()

    def add_failure(self, image_id: str, reason: str) -> None:
        """Record that ``image_id`` could not be extracted (committed at the next flush)."""
        self._need_writable()
        with self._lock:
            self._pending_failures[str(image_id)] = str(reason)

    def flush(self) -> None:
        """Write the buffered images as a new shard and commit it with the pending failures. A failed write
        leaves the buffer and the committed store as they were."""
        if not self.writable or self._writer_lock is None or not self._writer_lock.held:
            return
        with self._lock:
            items = self._writer._buffer.take()
            failures = dict(self._pending_failures)
            if not items and not failures:
                return
            rec = self._writer.write_items(items) if items else None
            try:
                self._commit([{"shards": [rec] if rec else [], "failures": failures}], verify=False)
            except BaseException:
                if rec is not None:
                    remove_shard_files(self.path, rec["name"])
                raise
            self._writer._buffer.drop(items)
            for k in failures:
                self._pending_failures.pop(k, None)
            self._flushed_at = time.monotonic()
        self._maybe_compact()

    def commit(self, results: list[dict]) -> dict:
        """Commit shards written by :class:`ShardWriter` s (their ``close()`` results) into this store,
        atomically.

        Each shard file's size and digest are verified and each shard is validated before the commit; a shard
        already committed (same name) is skipped, so a retried commit is harmless; an image id already in the
        store (or earlier in ``results``) keeps its first copy, later ones are masked. Failures of ids that
        are not stored are recorded. Returns ``{"shards", "images", "duplicates", "failures"}`` counts of
        what was added.
        """
        self._need_writable()
        if not isinstance(results, (list, tuple)) or not all(
            isinstance(r, dict)
            and isinstance(r.get("shards", []), list)
            and isinstance(r.get("failures", {}), dict)
            for r in results
        ):
            raise ValueError(
                "commit expects a list of ShardWriter.close() results ({'shards': [...], 'failures': {...}})"
            )
        with self._lock:
            out = self._commit(results, verify=True)
        self._maybe_compact()
        return out

    def remove(self, image_ids) -> int:
        """Drop images from the store: their rows are masked in a new manifest generation (readers of the
        previous one keep working) and compaction reclaims their bytes. Ids not stored are ignored; their
        failure records go too (also those not flushed yet). Returns how many stored images were removed,
        buffered ones included."""
        self._need_writable()
        wanted = list(dict.fromkeys(str(i) for i in image_ids))
        with self._lock:
            gone = set(wanted)
            buffered = [(i, f) for i, f in self._writer._buffer.take() if i in gone]
            self._writer._buffer.drop(buffered)
            for image_id in wanted:
                self._pending_failures.pop(image_id, None)
            index = self._view.index
            rows: dict[str, set] = {}
            for image_id in wanted:
                if image_id in index:
                    name, row = index[image_id]
                    rows.setdefault(name, set()).add(row)
            manifest = json.loads(json.dumps(self.manifest))
            dropped_failures = [i for i in wanted if i in manifest["failures"]]
            if not rows and not dropped_failures:
                return len(buffered)
            for rec in manifest["shards"]:
                if rec["name"] in rows:
                    rec["skip"] = sorted(set(rec.get("skip", [])) | rows[rec["name"]])
            for image_id in dropped_failures:
                del manifest["failures"][image_id]
            self._write_manifest(manifest)
            self._view.by_name.update({r["name"]: r for r in manifest["shards"]})
            removed = [i for i in wanted if i in index]
            for image_id in removed:
                del index[image_id]
        return len(removed) + len(buffered)

    def _commit(self, results, verify: bool) -> dict:
        manifest = json.loads(json.dumps(self.manifest))  # committed only once everything checks out
        have = {r["name"] for r in manifest["shards"]}
        index = self._view.index
        known: set[str] = set()  # ids added by this commit
        added = {"shards": 0, "images": 0, "duplicates": 0, "failures": 0}
        failures = {}
        for result in results:
            for rec in result.get("shards", []):
                found = record_problem(rec)
                if found:
                    raise ValueError(f"commit: bad shard record ({found})")
                if rec["name"] in have:
                    continue
                if "files" not in rec:
                    raise ValueError(f"commit: shard {rec['name']} has no file records")
                if verify:
                    verify_shard(self.path, rec)
                    shard = load_shard(self.path, rec, self.dim)
                    ids = id_list(shard.ids, shard_file(self.path, rec["name"], "ids"))
                    del shard
                else:
                    ids = load_ids(self.path, rec)
                rec = dict(rec)
                skip = set(rec.get("skip", []))
                for row, image_id in enumerate(ids):
                    if row not in skip and (image_id in known or image_id in index):
                        skip.add(row)
                        added["duplicates"] += 1
                    elif row not in skip:
                        known.add(image_id)
                rec["skip"] = sorted(skip)
                have.add(rec["name"])
                manifest["shards"].append(rec)
                kept = rec["num_images"] - len(skip)
                added["shards"] += 1
                added["images"] += kept
            for image_id, reason in result.get("failures", {}).items():
                failures[str(image_id)] = str(reason)
        for image_id in known:
            manifest["failures"].pop(image_id, None)
        for image_id, reason in failures.items():
            if image_id not in known and image_id not in index:
                manifest["failures"][image_id] = reason
                added["failures"] += 1
        self._write_manifest(manifest)
        return added

    def _write_manifest(self, manifest: dict) -> None:
        """Commit a new generation, then drop what the garbage collection deleted from the view and cache (the
        generations kept stay readable)."""
        deleted = fmt.commit(self.path, manifest)
        doomed = sorted({fmt.part_of(n) for n in deleted} - {None})
        self._view.apply(manifest, doomed)
        for name in doomed:
            self._cache.pop(name, None)

    def _upgrade(self) -> None:
        """A store of an older format, when first opened for writing: sizes and digests of version-1 shards
        are recorded, and the manifest is committed in today's format (with its generation file)."""
        manifest = json.loads(json.dumps(self.manifest))
        for rec in manifest["shards"]:
            if "files" not in rec:
                rec["files"] = {k: file_record(shard_file(self.path, rec["name"], k)) for k in keys(rec)}
                rec["bytes"] = int(sum(f["size"] for f in rec["files"].values()))
        self._write_manifest(manifest)

    # ------------------------------------------------------------------------------------------ compaction
    def _maybe_compact(self) -> None:
        try:
            self.compact(full=False)
        except (OSError, DamagedError) as exc:  # the data is committed; compaction can wait
            log.warning("%s: compaction skipped: %s", self.path, exc)

    def compact(self, full: bool = True) -> int:
        """Merge small shards (< shard_bytes / 2, or with removed images) into shards of up to
        ``shard_bytes``; returns how many merges were done. ``full=False`` (automatic, after a commit): only
        when ``COMPACT_AT`` small shards of one size tier (a factor of ``COMPACT_AT`` in bytes) accumulate
        (:data:`TIERS`), so each byte is rewritten O(log) times. Crash-safe: the merged shards are committed
        before the old ones are retired; every file merged is verified first (a damaged shard fails the
        compaction, naming the file)."""
        self._need_writable()
        merges = 0
        with self._lock:
            while True:
                records = self.manifest["shards"]
                small = [r.get("bytes", 0) < self.shard_bytes // 2 or len(r.get("skip", [])) > 0
                         for r in records]
                if full:
                    group = [i for i, ok in enumerate(small) if ok] if sum(small) >= 2 else []
                else:
                    group = TIERS.plan([max(r.get("bytes", 1), 1) for r in records], small)
                if not group:
                    return merges
                self._merge([records[i]["name"] for i in group])
                merges += 1
                if full:
                    return merges

    def _merge(self, names: list[str]) -> None:
        recs = {r["name"]: r for r in self.manifest["shards"]}
        written: list[dict] = []
        buf = Buffer()
        try:
            for name in names:
                verify_shard(self.path, recs[name])  # D4: never rewrite damaged data under fresh checksums
            for name in names:
                rec = recs[name]
                shard = load_shard(self.path, rec, self.dim)
                skip = set(rec.get("skip", []))
                for row in range(len(shard)):
                    if row in skip:
                        continue
                    buf.add(str(shard.ids[row]), shard[row], shard.source(row))
                    if buf.bytes >= self.shard_bytes:
                        items = buf.take()
                        written.append(self._writer.write_items(items, buf.sources))
                        buf.drop(items)
                del shard
            if buf.items:
                written.append(self._writer.write_items(buf.take(), buf.sources))
            manifest = json.loads(json.dumps(self.manifest))
            first = next(i for i, r in enumerate(manifest["shards"]) if r["name"] in names)
            rest = [r for r in manifest["shards"] if r["name"] not in names]
            before = [r for r in manifest["shards"][:first] if r["name"] not in names]
            manifest["shards"] = before + written + rest[len(before) :]
            self._write_manifest(manifest)
        except BaseException:
            for rec in written:
                if rec["name"] not in {r["name"] for r in self.manifest["shards"]}:
                    remove_shard_files(self.path, rec["name"])
            raise

    def gc(self, grace_seconds: float | None = None) -> list[str]:
        """Delete shard files no kept manifest generation needs, those no generation ever listed once older
        than ``grace_seconds`` (default ``GC_GRACE_SECONDS``: younger ones may be a ShardWriter's, about to be
        committed), and stale temporary files. Returns the deleted file names."""
        self._need_writable()
        with self._lock:
            deleted = generations(grace_seconds).collect_garbage(self.path, self.manifest)
            for name in {fmt.part_of(n) for n in deleted} - {None}:
                self._view.by_name.pop(name, None)
                self._cache.pop(name, None)
        return deleted

    def close(self) -> None:
        """Flush, collect garbage and release the writer lock (a read-only store: nothing)."""
        if not self.writable or self._writer_lock is None or not self._writer_lock.held:
            return
        try:
            self.flush()
            self.gc()
        finally:
            self._writer_lock.release()

    # ------------------------------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Read-only stores: move to the newest committed generation."""
        if not self.writable:
            mark = stamp(self.path)
            self._view = generations().open(self.path, lambda m: _View(self.path, m))
            self._stamp = mark

    def _shard(self, rec: dict) -> Shard:
        name = rec["name"]
        shard = self._cache.get(name)
        if shard is not None:
            try:
                self._cache.move_to_end(name)  # least recently used goes first
            except KeyError:  # evicted meanwhile by another thread: still a valid shard
                pass
            return shard
        with self._fill_lock:  # np.load header parsing is not thread-safe on CPython 3.11
            shard = self._cache.get(name)
            if shard is None:
                shard = load_shard(self.path, rec, self.dim)
                self._cache[name] = shard
                while len(self._cache) > CACHE_SHARDS:
                    self._cache.popitem(last=False)
        return shard

    def load_shard(self, i: int, mmap: bool = True) -> Shard:
        """Validated arrays of shard ``i`` in store order (per-feature arrays are read by rows on demand)."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range (store has {self.num_shards})")
        return self._shard(self._view.records[i])

    def _locate(self, image_id):
        """(view, record, row) of a committed image, or features still buffered, or KeyError."""
        view = self._view
        loc = view.index.get(image_id)
        if loc is None and self.writable:
            with self._lock:
                feats = self._writer._buffer.items.get(image_id)
                if feats is not None:
                    return feats
                view = self._view
                loc = view.index.get(image_id)
        if loc is None and not self.writable and self._stamp != stamp(self.path):
            self.refresh()  # committed by a writer since this reader opened the store
            view = self._view
            loc = view.index.get(image_id)
        if loc is None:
            raise KeyError(f"{image_id!r} is not in the feature store {self.path}")
        return view.by_name[loc[0]], loc[1]

    def get(self, image_id: str) -> LocalFeatures | RegionFeatures:
        """Features of one image (KeyError if it is not in the store; DamagedError naming a damaged file)."""
        for attempt in range(3):
            found = self._locate(image_id)
            if not isinstance(found, tuple):
                return found
            rec, row = found
            try:
                return self._shard(rec)[row]
            except DamagedError:
                if attempt == 2 or not self._moved_on(rec):
                    raise
                self.refresh()  # compacted away since this reader opened the store: read the newer generation
        raise AssertionError("unreachable")

    def _moved_on(self, rec) -> bool:
        """True when a read-only store's shard was retired by a newer generation (not damage)."""
        if self.writable:
            return False
        try:
            newer = read_manifest(self.path)
        except (OSError, ValueError):
            return False
        return newer["generation"] != self.generation and rec["name"] not in {
            r["name"] for r in newer["shards"]
        }

    def source(self, image_id: str) -> str | None:
        """The file an image's features were extracted from, as given to :meth:`add` (None when unknown: added
        without one, or by a store of an older format); KeyError if it is not in the store."""
        for attempt in range(3):
            found = self._locate(image_id)
            if not isinstance(found, tuple):
                with self._lock:
                    return self._writer._buffer.sources.get(image_id)
            rec, row = found
            try:
                return self._shard(rec).source(row)
            except DamagedError:
                if attempt == 2 or not self._moved_on(rec):
                    raise
                self.refresh()
        raise AssertionError("unreachable")

    def get_many(self, image_ids) -> list:
        """Features of many images, in the given order; each shard is opened once."""
        return [self.get(i) for i in image_ids]

    def __iter__(self):
        """Yield ``(image_id, features)`` of this generation image by image, one shard at a time, in store
        order. If a compaction retires shards meanwhile, the rest is read from the newer generation (no image
        twice)."""
        return self._iter(self._view, None)

    def _iter(self, view: _View, wanted: set | None, attempts: int = 10):
        records = list(view.records)
        for k, rec in enumerate(records):
            row = 0
            try:
                shard = self._shard(rec)
                ids = shard.ids.tolist()
                skip = set(rec.get("skip", []))
                for row, image_id in enumerate(ids):
                    if row in skip or (wanted is not None and image_id not in wanted):
                        continue
                    feats = shard[row]
                    yield image_id, feats
            except DamagedError:
                if attempts == 0 or not self._moved_on(rec):
                    raise
                later = {r["name"] for r in records[k + 1 :]}
                rest = {
                    i
                    for i, (name, r) in view.index.items()
                    if (name in later or (name == rec["name"] and r >= row))
                    and (wanted is None or i in wanted)
                }
                self.refresh()
                yield from self._iter(self._view, rest, attempts - 1)
                return

    def check(self, digests: bool = True) -> list[dict]:
        """Verify every committed file (size, BLAKE2 digest unless ``digests=False``, structure); returns the
        damaged files as ``[{"file", "problem"}]`` (empty: healthy)."""
        return check_manifest(self.path, self.manifest, digests)

    def __repr__(self) -> str:
        name = self.manifest["extractor"].get("name")
        return (
            f"FeatureStore({str(self.path)!r}, extractor={name}, D={self.dim}, "
            f"images={len(self)}, shards={self.num_shards})"
        )

    def __del__(self):
        lock = getattr(self, "_writer_lock", None)
        if lock is not None and lock.held:
            writer = getattr(self, "_writer", None)
            if getattr(writer, "_buffer", None) is not None and writer._buffer.items:
                log.warning(
                    "%s: feature store not closed; %d unflushed images are lost",
                    self.path,
                    len(writer._buffer.items),
                )
            lock.release()


def import_shards(dest: FeatureStore, src: FeatureStore, wanted: set | None = None) -> dict:
    """Bring ``src``'s shards that hold images of ``wanted`` (default: all) not yet in ``dest`` into ``dest``
    (a store open for writing, same extractor): files are hard-linked (copied across file systems), then
    committed with their checksums verified; images ``dest`` already holds are masked. A shard ``dest``
    already has under the same name (imported before, then some of its images removed) cannot be linked
    again: its wanted images are copied into a new shard instead. Returns :meth:`FeatureStore.commit`'s
    counts."""
    dest._need_writable()
    if dest.extractor["fingerprint"] != src.extractor["fingerprint"] or dest.dim != src.dim:
        raise ValueError(f"{src.path}: features of another extractor than {dest.path}'s")
    recs = []
    view = src._view
    need = {
        name
        for image_id, (name, _) in view.index.items()
        if (wanted is None or image_id in wanted) and image_id not in dest
    }
    copied = 0
    for rec in view.records:
        if rec["name"] not in need:
            continue
        if rec["name"] in dest._view.by_name:  # linked before: copy the images by id
            copied += _copy_images(dest, src, rec, wanted)
            continue
        rec = json.loads(json.dumps(rec))
        if "files" not in rec:  # a version-1 store: nothing to verify against
            rec["files"] = {k: file_record(shard_file(src.path, rec["name"], k)) for k in keys(rec)}
            rec["bytes"] = int(sum(f["size"] for f in rec["files"].values()))
        verify_shard(src.path, rec)  # untrusted input: checked where it lies, before anything is linked
        load_shard(src.path, rec, src.dim)
        for key in keys(rec):
            a, b = shard_file(src.path, rec["name"], key), shard_file(dest.path, rec["name"], key)
            b.unlink(missing_ok=True)
            try:
                os.link(a, b)
            except OSError:
                with atomic_path(b) as tmp:
                    shutil.copyfile(a, tmp)
        recs.append(rec)
    if copied:
        dest.flush()
    with dest._lock:
        out = dest._commit([{"shards": recs, "failures": {}}], verify=False)
    out["images"] += copied
    dest._maybe_compact()
    return out


def _copy_images(dest: FeatureStore, src: FeatureStore, rec: dict, wanted: set | None) -> int:
    """Add the images of ``src``'s shard ``rec`` that are wanted and not in ``dest`` to ``dest`` (buffered,
    with their sources); the shard is verified first. Returns how many were added."""
    if "files" in rec:
        verify_shard(src.path, rec)
    shard = load_shard(src.path, rec, src.dim)
    skip = set(rec.get("skip", []))
    added = 0
    for row, image_id in enumerate(shard.ids.tolist()):
        if row in skip or (wanted is not None and image_id not in wanted) or image_id in dest:
            continue
        dest.add(image_id, shard[row], source=shard.source(row))
        added += 1
    return added
