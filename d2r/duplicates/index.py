"""The signature index: one Goldberg signature per image id, near-duplicate search by signature words with
exact re-scoring, incremental add / remove, crash-safe saves.

Storage (on :mod:`d2r.storage`, as :class:`d2r.globaldesc.index.GlobalIndex`: hashed ``.npy`` files,
generations as the only commit point and garbage collection (:class:`~d2r.storage.Generations`), the tier policy
of merges (:class:`~d2r.storage.TierPolicy`), one writer under an OS lock, readers lock-free on the generation
they opened):

- ``seg-<uuid>/signatures.npy`` (n, L) int8, ``seg-<uuid>/ids.npy`` (n,) int64, and the word tables
  ``seg-<uuid>/sorted_words.npy`` (P, n) int64 (per word position, the segment's word keys ascending) and
  ``seg-<uuid>/sorted_rows.npy`` (P, n) int32 (their rows), immutable, written in a temporary folder renamed
  into place;
- ``removed-<uuid>.npy`` (rows,) bool over the rows of all segments in manifest order;
- ``manifest.json`` = the newest ``manifest-<gen>.json``: format, the signature parameters, segments and files
  with their size and BLAKE2b-128 digest.

Search (:meth:`SignatureIndex.search`): the candidates of a query are the rows sharing at least one word with it
at the same position (binary search in each position's sorted keys), re-scored by the exact normalised distance;
pairs with a distance below the threshold are returned (image-match's rule, its ``distance_cutoff`` 0.45).
Files on disk are untrusted: sizes, dtypes and shapes are checked on open (the one
:class:`~d2r.storage.DamagedError` names the file, one line); :meth:`SignatureIndex.check` also verifies every
digest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from d2r import _io
from d2r._lock import WriterLock
from d2r.duplicates.signature import DEFAULT, SignatureConfig, words
from d2r.kernels.signature import word_search
from d2r.storage import (MANIFEST, DamagedError, Generations, TierPolicy, check_file, save_array, verify_file)

FORMAT = "d2r-signature-index"
FORMAT_VERSION = 1
KEEP_GENERATIONS = 3
STORE = "signatures"  # the hint of its damage errors
FILES = ("signatures.npy", "ids.npy", "sorted_words.npy", "sorted_rows.npy")
_MIN_BUFFER = 1 << 16


def _damaged(file, problem: str) -> DamagedError:
    return DamagedError(file, problem, STORE)


class _Segment:
    """Signatures of a saved segment (memory maps) or of the pending rows (in memory), with their word
    tables."""

    def __init__(self, sigs, ids, sorted_words, sorted_rows, name=None, files=None):
        self.sigs, self.ids, self.name, self.files = sigs, ids, name, dict(files or {})
        self.sorted_words, self.sorted_rows = sorted_words, sorted_rows

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def record(self) -> dict:
        return {"name": self.name, "rows": self.rows, "files": self.files}


def word_tables(sigs: np.ndarray, config: SignatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """((P, n) int64 word keys ascending per position, (P, n) int32 their rows) of (n, L) int8 signatures; equal
    keys keep the row order."""
    w = words(sigs, config) if sigs.shape[0] else np.zeros((0, config.n_words), np.int64)
    order = np.argsort(w, axis=0, kind="stable").T
    return np.ascontiguousarray(np.take_along_axis(w.T, order, axis=1)), np.ascontiguousarray(order, np.int32)


class SignatureIndex:
    """Near-duplicate search over (N, L) int8 Goldberg signatures with int64 ids.

    ``SignatureIndex()`` lives in memory; :meth:`create` / :meth:`open` work on a folder (``writable=True``
    takes the writer lock; readers see the generation they opened until :meth:`refresh`). :meth:`add` and
    :meth:`remove` change the in-memory state; :meth:`save` commits it.
    """

    def __init__(self, config: SignatureConfig = DEFAULT, path=None, policy: TierPolicy | None = None):
        self.config = config
        self.path = None if path is None else Path(path)
        self.policy = policy or TierPolicy()
        self.metadata: dict = {}
        self.generation = 0
        self._segments: list[_Segment] = []
        self._removed = np.zeros(0, bool)  # over the saved rows
        self._removed_name: str | None = None
        self._pending_ids: list[np.ndarray] = []
        self._pending_sigs: list[np.ndarray] = []
        self._pending_live: dict[int, int] = {}  # id -> pending row
        self._pending_removed: set[int] = set()  # pending rows removed before a save
        self._pending_segment: _Segment | None = None  # the pending rows with word tables (cached)
        self._lock: WriterLock | None = None
        self._index_saved()

    # ---- folders -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, config: SignatureConfig = DEFAULT, metadata: dict | None = None,
               policy: TierPolicy | None = None) -> "SignatureIndex":
        """A new, empty index in folder ``path`` (created; refused if it already holds one), writable."""
        path = Path(path)
        GENERATIONS.refuse_lost(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path}: already holds an index (open it instead)")
        path.mkdir(parents=True, exist_ok=True)
        idx = cls(config, policy=policy)
        idx.path = path
        idx.metadata = dict(metadata or {})
        idx._lock = WriterLock(path, what="signature index").acquire()
        idx._commit()
        return idx

    @classmethod
    def open(cls, path, writable: bool = False, policy: TierPolicy | None = None) -> "SignatureIndex":
        path = Path(path)
        lock = WriterLock(path, what="signature index").acquire() if writable else None
        try:
            if writable:
                idx = cls(path=path, policy=policy)
                idx._lock = lock
                idx._load(read_manifest(path))
            else:  # a reader retries on a newer generation when a merge collected a file meanwhile
                def opener(m):
                    idx = cls(path=path, policy=policy)
                    idx._load(m)
                    return idx
                idx = GENERATIONS.open(path, opener)
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
        """A reader: move to the newest committed generation."""
        if self.path is None or self._lock is not None:
            return
        self._load(read_manifest(self.path))

    def _load(self, m: dict) -> None:
        self.config = _config_of(m)
        segs = [_open_segment(self.path, rec, self.config) for rec in m["segments"]]
        total = sum(s.rows for s in segs)
        removed = np.zeros(total, bool)
        if m.get("removed"):
            file = self.path / m["removed"]["name"]
            removed = np.array(_load_checked(file, m["removed"]["files"].get("removed.npy"), np.bool_, (total,)))
        self._segments, self._removed = segs, removed
        self._removed_name = m["removed"]["name"] if m.get("removed") else None
        self.generation, self.metadata = int(m["generation"]), dict(m.get("metadata") or {})
        self._index_saved()

    # ---- contents ------------------------------------------------------------------------------------------
    def _index_saved(self) -> None:
        ids = _concat([s.ids for s in self._segments], np.int64)
        self._saved_ids = ids
        rows = np.flatnonzero(~self._removed) if self._removed.shape[0] == ids.shape[0] else np.arange(ids.size)
        order = np.argsort(ids[rows], kind="stable")
        self._sorted_ids, self._sorted_rows = ids[rows][order], rows[order]
        if self._sorted_ids.size > 1 and np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
            dup = int(self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]][0])
            raise _damaged(self.path or "<memory>", f"id {dup} is live twice")

    def _saved_row(self, ids: np.ndarray) -> np.ndarray:
        """Saved live row of each id, −1 where none."""
        if not self._sorted_ids.size:
            return np.full(ids.shape, -1, np.int64)
        pos = np.minimum(np.searchsorted(self._sorted_ids, ids), self._sorted_ids.size - 1)
        return np.where(self._sorted_ids[pos] == ids, self._sorted_rows[pos], -1)

    def __len__(self) -> int:
        return int(self._sorted_ids.size) + len(self._pending_live)

    def __contains__(self, image_id) -> bool:
        i = int(image_id)
        return i in self._pending_live or bool(self._saved_row(np.array([i], np.int64))[0] >= 0)

    def ids(self) -> np.ndarray:
        """(N,) int64 live ids in insertion order."""
        saved = self._saved_ids[~self._removed] if self._saved_ids.size else self._saved_ids
        pend = np.array(sorted(self._pending_live, key=self._pending_live.get), np.int64)
        return np.concatenate([saved, pend])

    def add(self, ids, signatures) -> None:
        """Add (N,) int64 ``ids`` with (N, L) int8 ``signatures`` (values in −n_levels..n_levels). An id that is
        live already, or repeated, is refused (ValueError) and nothing is added; a removed id may come back."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids: expected an (N,) integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        sig = np.asarray(signatures)
        L, lv = self.config.length, self.config.n_levels
        if sig.shape != (ids.shape[0], L) or sig.dtype.kind not in "iu":
            raise ValueError(f"signatures: expected ({ids.shape[0]}, {L}) integers, got {sig.dtype} {sig.shape}")
        if sig.size and (sig.min() < -lv or sig.max() > lv):
            raise ValueError(f"signatures: values outside {-lv}..{lv}")
        if np.unique(ids).size != ids.size:
            raise ValueError("ids: repeated within the batch")
        live = [int(i) for i in ids[self._saved_row(ids) >= 0]] + [int(i) for i in ids.tolist()
                                                                   if i in self._pending_live]
        if live:
            raise ValueError(f"ids already in the index (remove them first): {live[:5]}")
        start = sum(a.shape[0] for a in self._pending_ids)
        self._pending_ids.append(ids.copy())
        self._pending_sigs.append(sig.astype(np.int8))
        self._pending_segment = None
        for j, i in enumerate(ids.tolist()):
            self._pending_live[i] = start + j

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

    def signatures(self, ids) -> np.ndarray:
        """(N, L) int8 stored signatures of live ``ids`` (KeyError for unknown ones)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.empty((ids.size, self.config.length), np.int8)
        rows = self._saved_row(ids)
        for s, base in zip(self._segments, _bases(self._segments)):  # gathered segment by segment
            sel = (rows >= base) & (rows < base + s.rows)
            if sel.any():
                out[sel] = s.sigs[rows[sel] - base]
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            pend = self._pending()
            for j in missing.tolist():
                i = int(ids[j])
                if i not in self._pending_live:
                    raise KeyError(f"id {i} not in the index")
                out[j] = pend.sigs[self._pending_live[i]]
        return out

    def _pending(self) -> _Segment:
        if self._pending_segment is None:
            if len(self._pending_ids) > 1:
                self._pending_ids = [np.concatenate(self._pending_ids)]
                self._pending_sigs = [np.concatenate(self._pending_sigs)]
            ids = self._pending_ids[0] if self._pending_ids else np.zeros(0, np.int64)
            sigs = self._pending_sigs[0] if self._pending_sigs else np.zeros((0, self.config.length), np.int8)
            self._pending_segment = _Segment(sigs, ids, *word_tables(sigs, self.config))
        return self._pending_segment

    # ---- search --------------------------------------------------------------------------------------------
    def search(self, signatures, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Near-duplicates of (Q, L) int8 query ``signatures``: every live image sharing a word with a query and
        within ``threshold`` (default: the config's, 0.45) by normalised distance. Returns (queries (M,) int64,
        ids (M,) int64, distances (M,) float64), by query, then distance, then insertion order."""
        q = np.asarray(signatures)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.config.length or q.dtype.kind not in "iu":
            raise ValueError(f"signatures: expected (Q, {self.config.length}) integers, got {q.dtype} {q.shape}")
        q = np.ascontiguousarray(q, np.int8)
        threshold = self.config.threshold if threshold is None else float(threshold)
        if not 0.0 < threshold <= 1.0:  # a distance lies in [0, 1]
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        qw = words(q, self.config) if q.shape[0] else np.zeros((0, self.config.n_words), np.int64)
        parts = ([], [], [])
        base = 0
        pend = self._pending()
        dead_pend = np.zeros(pend.rows, bool)
        dead_pend[list(self._pending_removed)] = True
        parts_of = [(s, self._removed[b:b + s.rows]) for s, b in zip(self._segments, _bases(self._segments))]
        for seg, dead in parts_of + [(pend, dead_pend)]:
            if seg.rows:
                qi, rows, dist = _search_segment(qw, q, seg, np.ascontiguousarray(dead), threshold)
                parts[0].append(qi)
                parts[1].append(rows + base)
                parts[2].append(dist)
            base += seg.rows
        qi, rows, dist = (_concat(p, t) for p, t in zip(parts, (np.int64, np.int64, np.float64)))
        order = np.lexsort((rows, dist, qi))
        allids = np.concatenate([self._saved_ids, pend.ids])
        return qi[order], allids[rows[order]], dist[order]

    def pairs(self, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair of live images within ``threshold``: (ids_a (M,), ids_b (M,) int64, distances (M,)
        float64), a inserted before b, ordered by distance then insertion order."""
        ids = self.ids()
        qi, found, dist = self.search(self.signatures(ids), threshold)
        by_id = np.argsort(ids)
        rank = by_id[np.searchsorted(ids[by_id], found)] if found.size else np.zeros(0, np.int64)
        keep = rank > qi  # each pair once, not an image with itself
        a, b, d = qi[keep], rank[keep], dist[keep]
        order = np.lexsort((b, a, d))
        return ids[a[order]], ids[b[order]], d[order]

    # ---- commit --------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Commit: pending rows become a segment, adjacent segments merge by the tiered policy, then the
        removal table and the manifest (the commit point) are written and garbage is collected."""
        if self.path is None:
            raise ValueError("an in-memory signature index has no folder to save to (SignatureIndex.create)")
        if self._lock is None:
            raise ValueError(f"{self.path}: opened read-only (SignatureIndex.open(path, writable=True))")
        pend = self._pending()
        if pend.rows:
            live = np.ones(pend.rows, bool)
            live[list(self._pending_removed)] = False
            if live.any():
                self._segments.append(self._write_segment(pend.sigs[live], pend.ids[live]))
                self._removed = np.concatenate([self._removed, np.zeros(int(live.sum()), bool)])
        self._pending_ids, self._pending_sigs, self._pending_live, self._pending_removed = [], [], {}, set()
        self._pending_segment = None
        while True:
            plan = self.policy.plan([s.rows * (self.config.length + 12 * self.config.n_words + 8)
                                     for s in self._segments])
            if not plan:
                break
            self._merge(plan[0], plan[-1] + 1)
        self._removed_name = f"removed-{uuid.uuid4().hex}.npy" if self._removed.any() else None
        self._commit()
        self._index_saved()

    def _write_segment(self, sigs: np.ndarray, ids: np.ndarray) -> _Segment:
        name = f"seg-{uuid.uuid4().hex}"
        tmp = self.path / f".{name}.tmp"
        tmp.mkdir()
        try:
            sorted_words, sorted_rows = word_tables(sigs, self.config)
            files = {}
            for fname, arr in zip(FILES, (sigs, ids, sorted_words, sorted_rows)):
                files[fname] = save_array(tmp / fname, np.ascontiguousarray(arr))
            _io.fsync_dir(tmp)
            os.replace(tmp, self.path / name)
            _io.fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _open_segment(self.path, {"name": name, "rows": int(ids.size), "files": files}, self.config)

    def _merge(self, start: int, stop: int) -> None:
        """Merge segments [start, stop) into one without their removed rows (inputs verified first: a merge
        never copies damage under a fresh checksum)."""
        first = sum(s.rows for s in self._segments[:start])
        base, sigs, ids = first, [], []
        for s in self._segments[start:stop]:
            for fname in ("signatures.npy", "ids.npy"):
                verify_file(self.path / s.name / fname, s.files[fname], STORE)
            keep = ~self._removed[base:base + s.rows]
            sigs.append(np.asarray(s.sigs)[keep])
            ids.append(np.asarray(s.ids)[keep])
            base += s.rows
        merged = self._write_segment(np.concatenate(sigs), np.concatenate(ids))
        self._removed = np.concatenate([self._removed[:first], np.zeros(merged.rows, bool), self._removed[base:]])
        self._segments[start:stop] = [merged]

    def _commit(self) -> None:
        self.generation += 1
        removed = None
        if self._removed_name:
            file = self.path / self._removed_name
            removed = {"name": self._removed_name, "files": {"removed.npy": save_array(file, self._removed)}}
        m = {"format": FORMAT, "format_version": FORMAT_VERSION, "generation": self.generation,
             "signature": _config_record(self.config), "segments": [s.record() for s in self._segments],
             "removed": removed, "metadata": self.metadata}
        GENERATIONS.commit(self.path, m)
        GENERATIONS.collect_garbage(self.path, m)

    def check(self) -> list[str]:
        """Verify every file of the current generation (sizes, digests, shapes): one line per problem."""
        if self.path is None:
            return []
        return check(self.path)


def check(path) -> list[str]:
    """Problems of the signature index at ``path`` (sizes, BLAKE2b digests, shapes, the manifest): one line
    each, naming the file; empty when intact."""
    path = Path(path)
    problems: list[str] = []

    def bad(file, problem):
        problems.append(f"{file}: {problem}")

    try:
        m = read_manifest(path)
    except (DamagedError, FileNotFoundError) as exc:
        return [str(exc)]
    for rec in m["segments"]:
        for fname in FILES:
            frec = rec.get("files", {}).get(fname)
            if frec is None:
                bad(path / rec["name"] / fname, "not listed in the manifest")
            else:
                check_file(path / rec["name"] / fname, frec, bad)
    if m.get("removed"):
        check_file(path / m["removed"]["name"], m["removed"]["files"]["removed.npy"], bad)
    try:
        SignatureIndex.open(path)
    except DamagedError as exc:
        problems.append(str(exc))
    return sorted(set(problems))


# ---- files -------------------------------------------------------------------------------------------------
def _bases(segments) -> list[int]:
    out, b = [], 0
    for s in segments:
        out.append(b)
        b += s.rows
    return out


def _search_segment(qw, q, seg: _Segment, dead, threshold):
    """(queries, rows, distances) of one segment, the kernel resumed until every query is done."""
    n = seg.rows
    cap = max(2 * n, _MIN_BUFFER)
    stamp = np.full(n, -1, np.int64)
    sigs = np.asarray(seg.sigs)  # a memory map read as an array (numba takes both; this is one view)
    parts = ([], [], [])
    start = 0
    while start < q.shape[0]:
        oq, orow, od = np.empty(cap, np.int64), np.empty(cap, np.int64), np.empty(cap, np.float64)
        start, m = word_search(qw, q, start, seg.sorted_words, seg.sorted_rows, sigs, dead, threshold, stamp,
                               oq, orow, od)
        for p, a in zip(parts, (oq, orow, od)):
            p.append(a[:m].copy())
    return tuple(_concat(p, t) for p, t in zip(parts, (np.int64, np.int64, np.float64)))


def _config_record(config: SignatureConfig) -> dict:
    rec = dataclasses.asdict(config)
    rec["crop_percentiles"] = list(config.crop_percentiles)
    return rec


def _config_of(m: dict) -> SignatureConfig:
    rec = dict(m["signature"])
    rec["crop_percentiles"] = tuple(rec["crop_percentiles"])
    return SignatureConfig(**rec)


def _load_checked(file: Path, rec: dict | None, dtype, shape) -> np.ndarray:
    if not file.is_file():
        raise _damaged(file, "missing")
    if rec is not None and file.stat().st_size != rec.get("size"):
        raise _damaged(file, f"{file.stat().st_size} bytes, the manifest says {rec.get('size')}")
    try:
        a = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # unreadable header, short file, pickled content
        raise _damaged(file, f"unreadable ({str(exc).splitlines()[0][:120]})") from None
    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape) or not a.flags.c_contiguous:
        raise _damaged(file, f"expected {np.dtype(dtype)} {tuple(shape)}, got {a.dtype} {a.shape}")
    return a


def _open_segment(root: Path, rec: dict, config: SignatureConfig) -> _Segment:
    d = Path(root) / rec["name"]
    n, files = int(rec["rows"]), rec.get("files") or {}
    shapes = {"signatures.npy": (np.int8, (n, config.length)), "ids.npy": (np.int64, (n,)),
              "sorted_words.npy": (np.int64, (config.n_words, n)),
              "sorted_rows.npy": (np.int32, (config.n_words, n))}
    arrays = {f: _load_checked(d / f, files.get(f), *shapes[f]) for f in FILES}
    rows = np.array(arrays["sorted_rows.npy"])
    if rows.size and (rows.min() < 0 or rows.max() >= n):  # the kernel trusts row numbers: check them once
        raise _damaged(d / "sorted_rows.npy", f"row numbers outside 0..{n - 1}")
    return _Segment(arrays["signatures.npy"], np.array(arrays["ids.npy"]), np.array(arrays["sorted_words.npy"]),
                    rows, rec["name"], files)


def read_manifest(path) -> dict:
    """The current manifest of the signature index at ``path``; FileNotFoundError when there is none,
    DamagedError when it is unreadable (or gone while generations or parts remain)."""
    return GENERATIONS.read(Path(path))


def _read_file(file: Path) -> dict:
    """Parse and check one manifest file (the commit point or a generation); DamagedError naming it."""
    try:
        m = json.loads(file.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _damaged(file, f"unreadable manifest ({exc})") from None
    if m.get("format") != FORMAT:
        raise _damaged(file, f"not a d2r signature index manifest (format {m.get('format')!r})")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{file}: format version {m['format_version']} is newer than this d2r supports "
                         f"({FORMAT_VERSION})")
    try:
        int(m["generation"])
        _config_of(m)
        for s in m["segments"]:
            if not str(s["name"]).startswith("seg-") or "/" in s["name"] or int(s["rows"]) < 0:
                raise ValueError(f"bad segment record {s!r}")
        rec = m.get("removed")
        if rec is not None and (not str(rec.get("name")).startswith("removed-") or "/" in rec["name"]):
            raise ValueError("bad removed record")
    except (KeyError, TypeError, ValueError) as exc:
        raise _damaged(file, f"malformed manifest ({exc})") from None
    return m


def _referenced(m: dict) -> set[str]:
    names = {s["name"] for s in m["segments"]}
    if m.get("removed"):
        names.add(m["removed"]["name"])
    return names


_PART = re.compile(r"(seg-[0-9a-f]{32}|removed-[0-9a-f]{32}\.npy)")


def _part_of(name: str) -> str | None:
    return name if _PART.fullmatch(name) else None


# Only the writer-lock holder writes parts: parts no generation lists are garbage at once.
GENERATIONS = Generations(store=STORE, what="d2r signature index", read_file=_read_file, parts=_referenced,
                          part_of=_part_of, keep=KEEP_GENERATIONS)


def _concat(parts, dtype) -> np.ndarray:
    parts = [np.asarray(p) for p in parts if p.shape[0]]
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
