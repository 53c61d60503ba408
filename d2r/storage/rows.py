"""Rows keyed by unique int64 ids in immutable segments: the mechanics the global index and the signature index
share (their payloads differ: :mod:`d2r.globaldesc.index`, :mod:`d2r.duplicates.index`).

A folder holds ``seg-<uuid>/`` segments (each with ``ids.npy`` (n,) int64 beside its payload arrays), a
``removed-<uuid>.npy`` (rows,) bool table over the rows of all segments in manifest order, optional extra parts,
and manifest generations (:class:`~d2r.storage.Generations`); segments merge by a :class:`~d2r.storage.TierPolicy`;
one writer holds the OS lock. :class:`RowsFormat` is a format's manifest and file rules; :class:`IdRows` the id
bookkeeping, pending rows, loading and the commit a store subclasses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from d2r import _io
from d2r._lock import WriterLock
from d2r.storage.files import DamagedError, save_array
from d2r.storage.generations import MANIFEST, Generations
from d2r.storage.tiers import TierPolicy

_HEX = "[0-9a-f]{32}"


class RowsFormat:
    """A rows store's manifest rules: format name and version, damage hint (``store``), the payload's manifest
    parameters (``params(m)`` raises ValueError / KeyError / TypeError when malformed) and its extra parts
    (``(key, prefix, suffix)`` each, beside ``removed``)."""

    def __init__(self, name: str, version: int, store: str, what: str, params, extra_parts=(), keep: int = 3):
        self.name, self.version, self.store, self.what, self.params = name, version, store, what, params
        self.parts = (("removed", "removed-", ".npy"),) + tuple(extra_parts)
        names = [f"seg-{_HEX}"] + [re.escape(p) + _HEX + re.escape(s) for _, p, s in self.parts]
        self._part = re.compile("(" + "|".join(names) + ")")
        # Only the writer-lock holder writes parts: parts no generation lists are garbage at once.
        self.generations = Generations(store=store, what=f"d2r {what}", read_file=self.read_file,
                                       parts=self.referenced, part_of=self.part_of, keep=keep)

    def damaged(self, file, problem: str) -> DamagedError:
        return DamagedError(file, problem, self.store)

    def read_file(self, file: Path) -> dict:
        """Parse and check one manifest file (the commit point or a generation); DamagedError naming it."""
        try:
            m = json.loads(file.read_text())
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise self.damaged(file, f"unreadable manifest ({exc})") from None
        if m.get("format") != self.name:
            raise self.damaged(file, f"not a d2r {self.what} manifest (format {m.get('format')!r})")
        if int(m.get("format_version", 0)) > self.version:
            raise ValueError(f"{file}: format version {m['format_version']} is newer than this d2r supports "
                             f"({self.version})")
        try:
            int(m["generation"])
            self.params(m)
            for s in m["segments"]:
                if not str(s["name"]).startswith("seg-") or "/" in s["name"] or int(s["rows"]) < 0:
                    raise ValueError(f"bad segment record {s!r}")
            for key, prefix, _ in self.parts:
                rec = m.get(key)
                if rec is not None and (not str(rec.get("name")).startswith(prefix) or "/" in rec["name"]):
                    raise ValueError(f"bad {key} record")
        except (KeyError, TypeError, ValueError) as exc:
            raise self.damaged(file, f"malformed manifest ({exc})") from None
        return m

    def referenced(self, m: dict) -> set[str]:
        names = {s["name"] for s in m["segments"]}
        for key, _, _ in self.parts:
            if m.get(key):
                names.add(m[key]["name"])
        return names

    def part_of(self, name: str) -> str | None:
        return name if self._part.fullmatch(name) else None

    def check_size(self, file: Path, rec: dict | None) -> None:
        if not file.is_file():
            raise self.damaged(file, "missing")
        if rec is not None and file.stat().st_size != rec.get("size"):
            raise self.damaged(file, f"{file.stat().st_size} bytes, the manifest says {rec.get('size')}")

    def load_checked(self, file: Path, rec: dict | None, dtype, shape) -> np.ndarray:
        """Memory map of a ``.npy`` checked against its record's size, ``dtype`` and ``shape``."""
        self.check_size(file, rec)
        try:
            a = np.load(file, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # unreadable header, short file, pickled content
            raise self.damaged(file, f"unreadable ({str(exc).splitlines()[0][:120]})") from None
        if a.dtype != np.dtype(dtype) or a.shape != tuple(shape) or not a.flags.c_contiguous:
            raise self.damaged(file, f"expected {np.dtype(dtype)} {tuple(shape)}, got {a.dtype} {a.shape}")
        return a


class Segment:
    """A saved segment's ids (and payload, in a subclass) or the pending rows."""

    def __init__(self, ids, name=None, files=None):
        self.ids, self.name, self.files = ids, name, dict(files or {})

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def record(self) -> dict:
        return {"name": self.name, "rows": self.rows, "files": self.files}


class IdRows:
    """Rows with unique int64 ids: saved segments, a removal table, pending adds / removes, and the commit.

    A subclass sets ``_ROWS`` (:class:`RowsFormat`: its ``what`` names the lock and messages) and provides
    ``_open_segment(rec)``, ``_write_segment(data, ids)``, ``_merge(start, stop)``, ``_empty_data()``,
    ``_row_bytes()`` and ``_params()`` (its manifest keys)."""

    _ROWS: RowsFormat
    _REFUSE_LOST = False  # create refuses a folder whose manifest is lost while generations remain
    _RETRY_OPEN = False  # a reader retries on a newer generation when a merge collected a file meanwhile

    def __init__(self, path=None, policy: TierPolicy | None = None):
        self.path = None if path is None else Path(path)
        self.policy = policy or TierPolicy()
        self.metadata: dict = {}
        self.generation = 0
        self._segments: list = []
        self._removed = np.zeros(0, bool)  # over the saved rows
        self._removed_name: str | None = None
        self._pending_ids: list[np.ndarray] = []
        self._pending_data: list[np.ndarray] = []
        self._pending_live: dict[int, int] = {}  # id -> pending row
        self._pending_removed: set[int] = set()  # pending rows removed before a save
        self._lock: WriterLock | None = None
        self._index_saved()

    # ---- folders -------------------------------------------------------------------------------------------
    @classmethod
    def _create(cls, path, make, metadata):
        path = Path(path)
        if cls._REFUSE_LOST:
            cls._ROWS.generations.refuse_lost(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path}: already holds an index (open it instead)")
        idx = make()  # validates the parameters before the folder is made
        path.mkdir(parents=True, exist_ok=True)
        idx.path = path
        idx.metadata = dict(metadata or {})
        idx._lock = WriterLock(path, what=cls._ROWS.what).acquire()
        idx._commit()
        return idx

    @classmethod
    def _open(cls, path, writable: bool, make):
        """``make(m)``: an empty instance for manifest ``m``."""
        path = Path(path)
        lock = WriterLock(path, what=cls._ROWS.what).acquire() if writable else None

        def opener(m):
            idx = make(m)
            idx._lock = lock
            idx._load(m)
            return idx
        try:
            if writable or not cls._RETRY_OPEN:
                idx = opener(cls._ROWS.generations.read(path))
            else:
                idx = cls._ROWS.generations.open(path, opener)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return idx

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def refresh(self) -> None:
        """A reader: move to the newest committed generation (a manifest read; segments are opened again only
        when a writer committed since)."""
        if self.path is None or self._lock is not None:
            return
        m = self._ROWS.generations.read(self.path)
        if int(m["generation"]) != self.generation:
            self._load(m)

    def _load(self, m: dict) -> None:
        segs = [self._open_segment(rec) for rec in m["segments"]]
        total = sum(s.rows for s in segs)
        removed = np.zeros(total, bool)
        if m.get("removed"):
            file = self.path / m["removed"]["name"]
            rec = m["removed"].get("files", {}).get("removed.npy")
            removed = np.array(self._ROWS.load_checked(file, rec, np.bool_, (total,)))
        self._segments, self._removed = segs, removed
        self._removed_name = m["removed"]["name"] if m.get("removed") else None
        self.generation, self.metadata = int(m["generation"]), dict(m.get("metadata") or {})
        self._index_saved()

    # ---- ids -----------------------------------------------------------------------------------------------
    def _index_saved(self) -> None:
        ids = concat([s.ids for s in self._segments], np.int64)
        self._saved_ids = ids
        rows = np.flatnonzero(~self._removed) if self._removed.shape[0] == ids.shape[0] else np.arange(ids.size)
        order = np.argsort(ids[rows], kind="stable")
        self._sorted_ids, self._sorted_rows = ids[rows][order], rows[order]
        if self._sorted_ids.size > 1 and np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
            dup = int(self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]][0])
            raise self._ROWS.damaged(self.path or "<memory>", f"id {dup} is live twice")

    def _saved_row(self, ids: np.ndarray) -> np.ndarray:
        """Saved live row of each id, −1 where none."""
        if not self._sorted_ids.size:
            return np.full(ids.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), self._sorted_ids.size - 1)
        return np.where(self._sorted_ids[pos] == ids, self._sorted_rows[pos], -1)

    def __len__(self) -> int:
        return int(self._sorted_ids.size) + len(self._pending_live)

    def __contains__(self, image_id) -> bool:
        return bool(self.contains(np.array([int(image_id)], np.int64))[0])

    def contains(self, ids) -> np.ndarray:
        """(N,) bool: which of the (N,) int64 ``ids`` are live (saved or pending), in one search."""
        ids = np.asarray(ids, np.int64)
        live = self._saved_row(ids) >= 0
        if self._pending_live:
            live |= np.isin(ids, np.fromiter(self._pending_live, np.int64, len(self._pending_live)))
        return live

    def ids(self) -> np.ndarray:
        """(N,) int64 live ids in insertion order."""
        saved = self._saved_ids[~self._removed] if self._saved_ids.size else self._saved_ids
        pend = np.array(sorted(self._pending_live, key=self._pending_live.get), np.int64)
        return np.concatenate([saved, pend])

    @staticmethod
    def _new_ids(ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids: expected an (N,) integer array, got {ids.dtype} {ids.shape}")
        return ids.astype(np.int64)

    def _append(self, ids: np.ndarray, data: np.ndarray) -> None:
        """Pend rows ``data`` (validated, stored dtype) under int64 ``ids``, refused when repeated or live."""
        if np.unique(ids).size != ids.size:
            raise ValueError("ids: repeated within the batch")
        live = [int(i) for i in ids[self._saved_row(ids) >= 0]] + [i for i in ids.tolist()
                                                                   if i in self._pending_live]
        if live:
            raise ValueError(f"ids already in the index (remove them first): {live[:5]}")
        start = sum(a.shape[0] for a in self._pending_ids)
        self._pending_ids.append(ids.copy())
        self._pending_data.append(data)
        self._pending_changed()
        for j, i in enumerate(ids.tolist()):
            self._pending_live[i] = start + j

    def _pending_changed(self) -> None:
        """Hook: the pending rows changed (drop what was cached of them)."""

    def remove(self, ids) -> int:
        """Remove live ids (KeyError listing unknown ones; then nothing is removed). Returns the number
        removed."""
        ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
        rows = self._saved_row(ids)
        unknown = [int(i) for i, r in zip(ids.tolist(), rows.tolist()) if r < 0 and i not in self._pending_live]
        if unknown:
            raise KeyError(f"ids not in the index: {unknown[:5]}")
        hit = rows >= 0
        if hit.any():
            self._removed = self._removed.copy()
            self._removed[rows[hit]] = True
            self._index_saved()
        for i in ids[~hit].tolist():
            self._pending_removed.add(self._pending_live.pop(i))
        return int(ids.size)

    def _pending_block(self) -> tuple[np.ndarray, np.ndarray]:
        """(pending rows, (n,) int64 their ids), in one block each."""
        if not self._pending_ids:
            return self._empty_data(), np.zeros(0, np.int64)
        if len(self._pending_ids) > 1:
            self._pending_ids = [np.concatenate(self._pending_ids)]
            self._pending_data = [np.concatenate(self._pending_data)]
        return self._pending_data[0], self._pending_ids[0]

    # ---- commit --------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Commit: pending rows become a segment, adjacent segments merge by the tiered policy, then the
        removal table and the manifest (the commit point) are written and garbage is collected."""
        name = type(self).__name__
        if self.path is None:
            raise ValueError(f"an in-memory {self._ROWS.what} has no folder to save to ({name}.create)")
        if self._lock is None:
            raise ValueError(f"{self.path}: opened read-only ({name}.open(path, writable=True))")
        data, ids = self._pending_block()
        if ids.shape[0]:
            live = np.ones(ids.shape[0], bool)
            live[list(self._pending_removed)] = False
            if live.any():
                self._segments.append(self._write_segment(data[live], ids[live]))
                self._removed = np.concatenate([self._removed, np.zeros(int(live.sum()), bool)])
        self._pending_ids, self._pending_data, self._pending_live, self._pending_removed = [], [], {}, set()
        self._pending_changed()
        while True:
            plan = self.policy.plan([s.rows * self._row_bytes() for s in self._segments])
            if not plan:
                break
            self._merge(plan[0], plan[-1] + 1)
        self._before_commit()
        self._removed_name = f"removed-{uuid.uuid4().hex}.npy" if self._removed.any() else None
        self._commit()
        self._index_saved()

    def _write_folder(self, write, rows: int) -> dict:
        """A new ``seg-<uuid>`` folder's record: ``write(tmp)`` fills a temporary folder and returns its file
        records; it is renamed into place (durably) or removed."""
        name = f"seg-{uuid.uuid4().hex}"
        tmp = self.path / f".{name}.tmp"
        tmp.mkdir()
        try:
            files = write(tmp)
            _io.fsync_dir(tmp)
            os.replace(tmp, self.path / name)
            _io.fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return {"name": name, "rows": int(rows), "files": files}

    def _before_commit(self) -> None:
        """Hook: write extra parts the manifest will name."""

    def _splice(self, start: int, stop: int, merged) -> None:
        """Segments [start, stop) replaced by ``merged`` (their live rows, in order) in the removal table too."""
        first = sum(s.rows for s in self._segments[:start])
        end = first + sum(s.rows for s in self._segments[start:stop])
        self._removed = np.concatenate([self._removed[:first], np.zeros(merged.rows, bool), self._removed[end:]])
        self._segments[start:stop] = [merged]

    def _commit(self) -> None:
        self.generation += 1
        removed = None
        if self._removed_name:
            file = self.path / self._removed_name
            removed = {"name": self._removed_name, "files": {"removed.npy": save_array(file, self._removed)}}
        m = {"format": self._ROWS.name, "format_version": self._ROWS.version, "generation": self.generation,
             **self._params(), "segments": [s.record() for s in self._segments], "removed": removed,
             **self._extra_parts(), "metadata": self.metadata}
        self._ROWS.generations.commit(self.path, m)
        self._ROWS.generations.collect_garbage(self.path, m)

    def _extra_parts(self) -> dict:
        return {}

    @classmethod
    def _check_folder(cls, path: Path, m: dict, verify, files=None) -> list[str]:
        """Problems of the folder's files (``verify(file, rec)`` -> lines; ``files``: the names every segment
        must list, None: those it lists) and of opening it: sorted, one line each."""
        problems: list[str] = []
        for rec in m["segments"]:
            listed = rec.get("files", {})
            for fname in listed if files is None else files:
                if fname not in listed:
                    problems.append(f"{path / rec['name'] / fname}: not listed in the manifest")
                else:
                    problems += verify(path / rec["name"] / fname, listed[fname])
        if m.get("removed"):
            problems += verify(path / m["removed"]["name"], m["removed"]["files"]["removed.npy"])
        for key, _, _ in cls._ROWS.parts[1:]:
            if m.get(key):
                problems += verify(path / m[key]["name"], m[key]["files"][m[key]["name"]])
        try:
            cls.open(path)
        except DamagedError as exc:
            problems.append(str(exc))
        return sorted(set(problems))


def concat(parts, dtype) -> np.ndarray:
    """The non-empty ``parts`` end to end as ``dtype`` (an empty array when none)."""
    parts = [np.asarray(p) for p in parts if p.shape[0]]
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
