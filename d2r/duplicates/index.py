"""The signature index: one Goldberg signature per image id, near-duplicate search by signature words with
exact re-scoring, incremental add / remove, crash-safe saves.

Storage (on :mod:`d2r.storage` and its rows base :class:`~d2r.storage.rows.IdRows`, as
:class:`d2r.globaldesc.index.GlobalIndex`: hashed ``.npy`` files, generations as the only commit point and garbage
collection (:class:`~d2r.storage.Generations`), the tier policy of merges (:class:`~d2r.storage.TierPolicy`), one
writer under an OS lock, readers lock-free on the generation they opened):

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
from pathlib import Path

import numpy as np

from d2r.duplicates.signature import DEFAULT, SignatureConfig, words
from d2r.kernels.signature import word_search
from d2r.storage import DamagedError, TierPolicy, check_file, save_array, verify_file
from d2r.storage.rows import IdRows, RowsFormat, Segment, concat

FORMAT = "d2r-signature-index"
FORMAT_VERSION = 1
KEEP_GENERATIONS = 3
STORE = "signatures"  # the hint of its damage errors
FILES = ("signatures.npy", "ids.npy", "sorted_words.npy", "sorted_rows.npy")
_MIN_BUFFER = 1 << 16



class _Segment(Segment):
    """Signatures of a saved segment (memory maps) or of the pending rows (in memory), with their word
    tables."""

    def __init__(self, sigs, ids, sorted_words, sorted_rows, name=None, files=None):
        self.sigs, self.sorted_words, self.sorted_rows = sigs, sorted_words, sorted_rows
        super().__init__(ids, name, files)


def word_tables(sigs: np.ndarray, config: SignatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """((P, n) int64 word keys ascending per position, (P, n) int32 their rows) of (n, L) int8 signatures; equal
    keys keep the row order."""
    w = words(sigs, config) if sigs.shape[0] else np.zeros((0, config.n_words), np.int64)
    order = np.argsort(w, axis=0, kind="stable").T
    return np.ascontiguousarray(np.take_along_axis(w.T, order, axis=1)), np.ascontiguousarray(order, np.int32)


class SignatureIndex(IdRows):
    """Near-duplicate search over (N, L) int8 Goldberg signatures with int64 ids.

    ``SignatureIndex()`` lives in memory; :meth:`create` / :meth:`open` work on a folder (``writable=True``
    takes the writer lock; readers see the generation they opened until :meth:`refresh`). :meth:`add` and
    :meth:`remove` change the in-memory state; :meth:`save` commits it.
    """

    def __init__(self, config: SignatureConfig = DEFAULT, path=None, policy: TierPolicy | None = None):
        self.config = config
        self._pending_segment: _Segment | None = None  # the pending rows with word tables (cached)
        super().__init__(path, policy)

    _REFUSE_LOST = _RETRY_OPEN = True

    # ---- folders -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, config: SignatureConfig = DEFAULT, metadata: dict | None = None,
               policy: TierPolicy | None = None) -> "SignatureIndex":
        """A new, empty index in folder ``path`` (created; refused if it already holds one), writable."""
        return cls._create(path, lambda: cls(config, policy=policy), metadata)

    @classmethod
    def open(cls, path, writable: bool = False, policy: TierPolicy | None = None) -> "SignatureIndex":
        return cls._open(path, writable, lambda m: cls(path=path, policy=policy))

    def _load(self, m: dict) -> None:
        self.config = _config_of(m)
        super()._load(m)

    def _open_segment(self, rec: dict) -> _Segment:
        return _open_segment(self.path, rec, self.config)

    def _empty_data(self) -> np.ndarray:
        return np.zeros((0, self.config.length), np.int8)

    def _row_bytes(self) -> int:
        return self.config.length + 12 * self.config.n_words + 8

    def _params(self) -> dict:
        return {"signature": _config_record(self.config)}

    def _pending_changed(self) -> None:
        self._pending_segment = None

    # ---- contents ------------------------------------------------------------------------------------------
    def add(self, ids, signatures) -> None:
        """Add (N,) int64 ``ids`` with (N, L) int8 ``signatures`` (values in −n_levels..n_levels). An id that is
        live already, or repeated, is refused (ValueError) and nothing is added; a removed id may come back."""
        ids = self._new_ids(ids)
        sig = np.asarray(signatures)
        L, lv = self.config.length, self.config.n_levels
        if sig.shape != (ids.shape[0], L) or sig.dtype.kind not in "iu":
            raise ValueError(f"signatures: expected ({ids.shape[0]}, {L}) integers, got {sig.dtype} {sig.shape}")
        if sig.size and (sig.min() < -lv or sig.max() > lv):
            raise ValueError(f"signatures: values outside {-lv}..{lv}")
        self._append(ids, sig.astype(np.int8))

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
            sigs, ids = self._pending_block()
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
        qi, rows, dist = (concat(p, t) for p, t in zip(parts, (np.int64, np.int64, np.float64)))
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
    def _write_segment(self, sigs: np.ndarray, ids: np.ndarray) -> _Segment:
        def write(tmp):
            arrays = (sigs, ids, *word_tables(sigs, self.config))
            return {fname: save_array(tmp / fname, np.ascontiguousarray(a)) for fname, a in zip(FILES, arrays)}
        return _open_segment(self.path, self._write_folder(write, ids.size), self.config)

    def _merge(self, start: int, stop: int) -> None:
        """Merge segments [start, stop) into one without their removed rows (inputs verified first: a merge
        never copies damage under a fresh checksum)."""
        base, sigs, ids = sum(s.rows for s in self._segments[:start]), [], []
        for s in self._segments[start:stop]:
            for fname in ("signatures.npy", "ids.npy"):
                verify_file(self.path / s.name / fname, s.files[fname], STORE)
            keep = ~self._removed[base:base + s.rows]
            sigs.append(np.asarray(s.sigs)[keep])
            ids.append(np.asarray(s.ids)[keep])
            base += s.rows
        self._splice(start, stop, self._write_segment(np.concatenate(sigs), np.concatenate(ids)))

    def check(self) -> list[str]:
        """Verify every file of the current generation (sizes, digests, shapes): one line per problem."""
        if self.path is None:
            return []
        return check(self.path)


def check(path) -> list[str]:
    """Problems of the signature index at ``path`` (sizes, BLAKE2b digests, shapes, the manifest): one line
    each, naming the file; empty when intact."""
    path = Path(path)
    try:
        m = read_manifest(path)
    except (DamagedError, FileNotFoundError) as exc:
        return [str(exc)]

    def verify(file, rec):
        problems = []
        check_file(file, rec, lambda f, problem: problems.append(f"{f}: {problem}"))
        return problems
    return SignatureIndex._check_folder(path, m, verify, FILES)


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
    return tuple(concat(p, t) for p, t in zip(parts, (np.int64, np.int64, np.float64)))


def _config_record(config: SignatureConfig) -> dict:
    rec = dataclasses.asdict(config)
    rec["crop_percentiles"] = list(config.crop_percentiles)
    return rec


def _config_of(m: dict) -> SignatureConfig:
    rec = dict(m["signature"])
    rec["crop_percentiles"] = tuple(rec["crop_percentiles"])
    return SignatureConfig(**rec)


def _open_segment(root: Path, rec: dict, config: SignatureConfig) -> _Segment:
    d = Path(root) / rec["name"]
    n, files = int(rec["rows"]), rec.get("files") or {}
    shapes = {"signatures.npy": (np.int8, (n, config.length)), "ids.npy": (np.int64, (n,)),
              "sorted_words.npy": (np.int64, (config.n_words, n)),
              "sorted_rows.npy": (np.int32, (config.n_words, n))}
    arrays = {f: _load_checked(d / f, files.get(f), *shapes[f]) for f in FILES}
    rows = np.array(arrays["sorted_rows.npy"])
    if rows.size and (rows.min() < 0 or rows.max() >= n):  # the kernel trusts row numbers: check them once
        raise ROWS.damaged(d / "sorted_rows.npy", f"row numbers outside 0..{n - 1}")
    return _Segment(arrays["signatures.npy"], np.array(arrays["ids.npy"]), np.array(arrays["sorted_words.npy"]),
                    rows, rec["name"], files)


def read_manifest(path) -> dict:
    """The current manifest of the signature index at ``path``; FileNotFoundError when there is none,
    DamagedError when it is unreadable (or gone while generations or parts remain)."""
    return GENERATIONS.read(Path(path))


ROWS = RowsFormat(FORMAT, FORMAT_VERSION, STORE, "signature index", _config_of, keep=KEEP_GENERATIONS)
SignatureIndex._ROWS = ROWS
GENERATIONS = ROWS.generations
_load_checked = ROWS.load_checked
