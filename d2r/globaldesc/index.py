"""The global index: one float32 (or float16) vector per image id, exact inner-product search over memory
maps, incremental add / remove, crash-safe saves; an optional faiss IVF-PQ index past what an exact scan
serves.

Storage (the project's log-structured conventions, on the primitives of :mod:`d2r.index.segment` and
:mod:`d2r.index.store`: hashed ``.npy`` files, a manifest as the only commit point, kept generations, a tiered
merge policy, one writer under an OS lock, readers lock-free on the generation they opened):

- ``seg-<uuid>/vectors.npy`` (n, D) float32|float16 and ``seg-<uuid>/ids.npy`` (n,) int64, immutable, written
  in a temporary folder renamed into place;
- ``removed-<uuid>.npy`` (rows,) bool over the rows of all segments in manifest order (rows removed since);
- ``ann-<uuid>.faiss``: an IVF-PQ index of the rows that existed when it was built (dropped by a merge);
- ``manifest.json`` = the newest ``manifest-<gen>.json``: format, D, dtype, segments and files with their
  size and BLAKE2b-128 digest. Garbage collection keeps every file the last :data:`KEEP_GENERATIONS`
  generations name.

Order of results: score descending, ties by insertion order (merges keep the order of rows). Files on disk are
untrusted: sizes, dtypes and shapes are checked against the manifest on open (:class:`GlobalDamagedError`
names the file, one line); :meth:`GlobalIndex.check` also verifies every digest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from d2r import _io
from d2r._lock import WriterLock
from d2r.globaldesc.search import exact_top_k, merge_top_k
from d2r.storage import DamagedError, NpyWriter, RowReader, save_array
from d2r.index.store import KEEP_GENERATIONS, MANIFEST, MergePolicy, commit

FORMAT = "d2r-global-index"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
_CHUNK_ROWS = 1 << 16


class GlobalDamagedError(DamagedError):
    """A global-index file is missing, truncated or does not hold what the manifest says (``file``: its
    path)."""

    def __init__(self, file, problem: str):
        self.file, self.problem = str(file), problem
        ValueError.__init__(self, f"{file}: {problem} (global index damaged; GlobalIndex.check() lists the "
                                  f"damaged files)")


class _Segment:
    """A saved segment opened as memory maps (or the pending rows, in memory)."""

    def __init__(self, vectors, ids, name=None, files=None):
        self.vectors, self.ids, self.name, self.files = vectors, ids, name, dict(files or {})

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def record(self) -> dict:
        return {"name": self.name, "rows": self.rows, "files": self.files}


class GlobalIndex:
    """Exact inner-product search over (N, D) vectors with int64 ids.

    ``GlobalIndex(dim)`` lives in memory; :meth:`create` / :meth:`open` work on a folder (``writable=True``
    takes the writer lock; readers see the generation they opened until :meth:`refresh`). :meth:`add` and
    :meth:`remove` change the in-memory state; :meth:`save` commits it.
    """

    def __init__(self, dim: int, dtype: str = "float32", path=None, policy: MergePolicy | None = None):
        if isinstance(dim, bool) or int(dim) < 1:
            raise ValueError(f"global index: dim must be a positive integer, got {dim!r}")
        if dtype not in DTYPES:
            raise ValueError(f"global index: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.dim, self.dtype = int(dim), dtype
        self.path = None if path is None else Path(path)
        self.policy = policy or MergePolicy()
        self.metadata: dict = {}
        self.generation = 0
        self._segments: list[_Segment] = []
        self._removed = np.zeros(0, bool)  # over the saved rows
        self._removed_name: str | None = None
        self._ann: dict | None = None  # manifest record of the faiss index
        self._faiss = None
        self._pending_ids: list[np.ndarray] = []
        self._pending_vecs: list[np.ndarray] = []
        self._pending_live: dict[int, int] = {}  # id -> pending row
        self._pending_removed: set[int] = set()  # pending rows removed before a save
        self._lock: WriterLock | None = None
        self._index_saved()

    # ---- folders -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, dim: int, dtype: str = "float32", metadata: dict | None = None,
               policy: MergePolicy | None = None) -> "GlobalIndex":
        """A new, empty index in folder ``path`` (created; refused if it already holds an index), writable."""
        path = Path(path)
        if (path / MANIFEST).exists():
            raise FileExistsError(f"{path}: already holds an index (open it instead)")
        idx = cls(dim, dtype, policy=policy)  # validates dim / dtype before the folder is made
        path.mkdir(parents=True, exist_ok=True)
        idx.path = path
        idx.metadata = dict(metadata or {})
        idx._lock = WriterLock(path, what="global index").acquire()
        idx._commit()
        return idx

    @classmethod
    def open(cls, path, writable: bool = False, policy: MergePolicy | None = None) -> "GlobalIndex":
        path = Path(path)
        lock = WriterLock(path, what="global index").acquire() if writable else None
        try:
            m = read_manifest(path)
            idx = cls(m["dim"], m["dtype"], path, policy)
            idx._lock = lock
            idx._load(m)
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
        segs = []
        for rec in m["segments"]:
            segs.append(_open_segment(self.path, rec, self.dim, self.dtype))
        total = sum(s.rows for s in segs)
        removed = np.zeros(total, bool)
        if m.get("removed"):
            file = self.path / m["removed"]["name"]
            rec = m["removed"].get("files", {}).get("removed.npy")
            removed = _load_checked(file, rec, np.bool_, (total,))
            removed = np.array(removed)
        self._segments, self._removed = segs, removed
        self._removed_name = m["removed"]["name"] if m.get("removed") else None
        self.generation, self.metadata = int(m["generation"]), dict(m.get("metadata") or {})
        self._ann, self._faiss = m.get("ann"), None
        self._index_saved()

    # ---- contents ------------------------------------------------------------------------------------------
    def _index_saved(self) -> None:
        ids = _concat([s.ids for s in self._segments], np.int64)
        self._saved_ids = ids
        live = ~self._removed if self._removed.shape[0] == ids.shape[0] else np.ones(ids.shape[0], bool)
        rows = np.flatnonzero(live)
        order = np.argsort(ids[rows], kind="stable")
        self._sorted_ids, self._sorted_rows = ids[rows][order], rows[order]
        if self._sorted_ids.size > 1 and np.any(self._sorted_ids[1:] == self._sorted_ids[:-1]):
            dup = int(self._sorted_ids[1:][self._sorted_ids[1:] == self._sorted_ids[:-1]][0])
            raise GlobalDamagedError(self.path or "<memory>", f"id {dup} is live twice")

    def _saved_row(self, ids: np.ndarray) -> np.ndarray:
        """Saved live row of each id, −1 where none."""
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, max(self._sorted_ids.size - 1, 0))
        hit = self._sorted_ids.size > 0
        found = (self._sorted_ids[pos] == ids) if hit else np.zeros(ids.shape, bool)
        return np.where(found, self._sorted_rows[pos] if hit else -1, -1)

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

    def add(self, ids, vectors) -> None:
        """Add (N,) int64 ``ids`` with (N, D) real ``vectors`` (stored as the index dtype; search scores are
        those of the stored values). An id that is live already, or repeated, is refused (ValueError) and
        nothing is added; a removed id may come back."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids: expected an (N,) integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64)
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape != (ids.shape[0], self.dim) or v.dtype.kind not in "fiu":
            raise ValueError(f"vectors: expected ({ids.shape[0]}, {self.dim}) real, got {v.dtype} {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("vectors: NaN or infinite values")
        if np.unique(ids).size != ids.size:
            raise ValueError("ids: repeated within the batch")
        live = [int(i) for i in ids[self._saved_row(ids) >= 0]] + [int(i) for i in ids if int(i) in
                                                                   self._pending_live]
        if live:
            raise ValueError(f"ids already in the index (remove them first): {live[:5]}")
        start = sum(a.shape[0] for a in self._pending_ids)
        self._pending_ids.append(ids.copy())
        self._pending_vecs.append(v.astype(self.dtype))
        for j, i in enumerate(ids.tolist()):
            self._pending_live[i] = start + j

    def remove(self, ids) -> int:
        """Remove live ids (KeyError listing unknown ones; then nothing is removed). Returns the number
        removed."""
        ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
        rows = self._saved_row(ids)
        unknown = [int(i) for i, r in zip(ids, rows) if r < 0 and int(i) not in self._pending_live]
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

    def vectors(self, ids) -> np.ndarray:
        """(N, D) float32 stored vectors of live ``ids`` (KeyError for unknown ones)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.empty((ids.size, self.dim), np.float32)
        rows = self._saved_row(ids)
        pend = self._pending_block()[0]
        for j, (i, r) in enumerate(zip(ids.tolist(), rows.tolist())):
            if r >= 0:
                out[j] = self._row(r)
            elif i in self._pending_live:
                out[j] = pend[self._pending_live[i]]
            else:
                raise KeyError(f"id {i} not in the index")
        return out

    def _row(self, r: int) -> np.ndarray:
        for s in self._segments:
            if r < s.rows:
                return s.vectors[r]
            r -= s.rows
        raise IndexError(r)

    def _pending_block(self):
        if not self._pending_ids:
            return np.zeros((0, self.dim), self.dtype), np.zeros(0, np.int64)
        if len(self._pending_ids) > 1:
            self._pending_ids = [np.concatenate(self._pending_ids)]
            self._pending_vecs = [np.concatenate(self._pending_vecs)]
        return self._pending_vecs[0], self._pending_ids[0]

    # ---- search --------------------------------------------------------------------------------------------
    def search(self, queries, top_k: int = 100, exact: bool | None = None, nprobe: int | None = None,
               refine: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """Top ``top_k`` live ids by inner product: ((Q, k) int64 ids, (Q, k) float32 scores), padded with −1
        / −inf past the live count; a (D,) query gives (k,) arrays. ``exact`` None: the faiss index when one
        is built (its rows; rows added later are scanned exactly), else the exact scan; the faiss shortlist of
        ``refine`` × k is re-scored exactly from the stored vectors."""
        single = np.ndim(queries) == 1
        q = np.atleast_2d(np.asarray(queries, np.float32))
        if q.shape[1] != self.dim or not np.isfinite(q).all():
            raise ValueError(f"queries: expected (Q, {self.dim}) finite values, got {q.shape}")
        k = int(top_k)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        use_ann = self._ann is not None and exact is not True
        if exact is False and self._ann is None:
            raise ValueError("search(exact=False): no faiss index built (build_ann)")
        best_i = np.full((q.shape[0], 0), -1, np.int64)
        best_s = np.zeros((q.shape[0], 0), np.float32)
        base = 0
        covered = int(self._ann["rows"]) if use_ann else 0
        if use_ann:
            best_i, best_s = self._ann_search(q, k, nprobe, refine)
        for s in self._segments:
            if base + s.rows > covered:
                lo = max(covered - base, 0)
                best_i, best_s = exact_top_k(q, s.vectors[lo:], k, self._removed[base + lo:base + s.rows],
                                             ids_a=best_i, scores_a=best_s, base=base + lo)
            base += s.rows
        pv, _ = self._pending_block()
        if pv.shape[0]:
            dead = np.zeros(pv.shape[0], bool)
            dead[list(self._pending_removed)] = True
            best_i, best_s = exact_top_k(q, pv, k, dead, ids_a=best_i, scores_a=best_s, base=base)
        best_i, best_s = exact_top_k(q, np.zeros((0, self.dim), np.float32), k, ids_a=best_i, scores_a=best_s)
        ids = self._ids_of_rows(best_i)
        return (ids[0], best_s[0]) if single else (ids, best_s)

    def _ids_of_rows(self, rows: np.ndarray) -> np.ndarray:
        pend = self._pending_block()[1]
        allids = np.concatenate([self._saved_ids, pend, np.array([-1], np.int64)])
        return allids[np.where(rows < 0, allids.size - 1, rows)]

    # ---- faiss IVF-PQ --------------------------------------------------------------------------------------
    def build_ann(self, nlist: int = 1024, m: int = 32, nbits: int = 8, train_size: int = 100_000,
                  nprobe: int = 32, seed: int = 0, threads: int | None = None) -> None:
        """Build a faiss IVF-PQ index (inner product) of the saved rows (``save`` first); committed with the
        next :meth:`save`. ``threads``: faiss's OpenMP threads while building (None: numba's count). Needs
        ``faiss-cpu`` (``pip install -e ".[faiss]"``)."""
        with _faiss_threads(threads):
            self._build_ann(nlist, m, nbits, train_size, nprobe, seed)

    def _build_ann(self, nlist, m, nbits, train_size, nprobe, seed) -> None:
        faiss = _faiss()
        if self._pending_ids:
            raise ValueError("build_ann: save() the pending rows first")
        n = int(self._saved_ids.size)
        if n < nlist:
            raise ValueError(f"build_ann: {n} rows is fewer than nlist={nlist} lists")
        if self.dim % m:
            raise ValueError(f"build_ann: D={self.dim} is not divisible by m={m} sub-quantisers")
        quant = faiss.IndexFlatIP(self.dim)
        ann = faiss.IndexIVFPQ(quant, self.dim, int(nlist), int(m), int(nbits), faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(train_size, n), replace=False))
        ann.train(self._gather(sample))
        for a in range(0, n, _CHUNK_ROWS):
            b = min(a + _CHUNK_ROWS, n)
            ann.add_with_ids(self._gather(np.arange(a, b)), np.arange(a, b, dtype=np.int64))
        ann.nprobe = int(nprobe)
        self._faiss = ann
        self._ann = {"name": None, "rows": n, "nlist": int(nlist), "m": int(m), "nbits": int(nbits),
                     "nprobe": int(nprobe)}

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((rows.size, self.dim), np.float32)
        base = 0
        for s in self._segments:
            sel = (rows >= base) & (rows < base + s.rows)
            if sel.any():
                out[sel] = s.vectors[rows[sel] - base]
            base += s.rows
        return out

    def _ann_search(self, q, k, nprobe, refine):
        if self._faiss is None:
            faiss = _faiss()
            file = self.path / self._ann["name"]
            _check_size(file, self._ann["files"][self._ann["name"]])
            try:
                self._faiss = faiss.read_index(str(file))
            except RuntimeError as exc:
                raise GlobalDamagedError(file, f"unreadable faiss index ({str(exc).splitlines()[0][:120]})")
        self._faiss.nprobe = int(nprobe or self._ann["nprobe"])
        want = max(k * max(int(refine), 1), k)
        with _faiss_threads(1 if q.shape[0] < 16 else None):  # a few queries: serial (no OpenMP start-up)
            _, rows = self._faiss.search(q, want)
        rows = np.asarray(rows, np.int64)
        live = rows >= 0
        live[live] = ~self._removed[rows[live]]
        rows = np.where(live, rows, -1)
        flat = np.unique(rows[rows >= 0])
        vec = self._gather(flat) if flat.size else np.zeros((0, self.dim), np.float32)
        pos = np.searchsorted(flat, np.maximum(rows, 0))
        scores = np.where(rows >= 0, np.einsum("qkd,qd->qk", vec[np.minimum(pos, max(flat.size - 1, 0))], q)
                          if flat.size else -np.inf, -np.inf).astype(np.float32)
        none_i = np.full((q.shape[0], 0), -1, np.int64)
        return merge_top_k(none_i, np.zeros((q.shape[0], 0), np.float32), rows, scores, k)

    # ---- commit --------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Commit: pending rows become a segment, the removal table and the faiss index are written, adjacent
        segments merge by the tiered policy, then the manifest (the commit point) and garbage collection."""
        if self.path is None:
            raise ValueError("an in-memory global index has no folder to save to (GlobalIndex.create)")
        if self._lock is None:
            raise ValueError(f"{self.path}: opened read-only (GlobalIndex.open(path, writable=True))")
        pv, pi = self._pending_block()
        if pv.shape[0]:
            live = np.ones(pv.shape[0], bool)
            live[list(self._pending_removed)] = False
            if live.any():
                self._segments.append(self._write_segment([(pv[live], pi[live])], int(live.sum())))
                self._removed = np.concatenate([self._removed, np.zeros(int(live.sum()), bool)])
        self._pending_ids, self._pending_vecs, self._pending_live, self._pending_removed = [], [], {}, set()
        while True:
            row_bytes = self.dim * np.dtype(self.dtype).itemsize
            plan = self.policy.plan([s.rows * row_bytes for s in self._segments])
            if plan is None:
                break
            self._merge(*plan)
        if self._ann is not None and self._ann["name"] is None:
            name = f"ann-{uuid.uuid4().hex}.faiss"
            with _io.atomic_path(self.path / name) as tmp:
                _faiss().write_index(self._faiss, str(tmp))
            self._ann = dict(self._ann, name=name, files={name: _file_record(self.path / name)})
        self._removed_name = None
        if self._removed.any():
            self._removed_name = f"removed-{uuid.uuid4().hex}.npy"
        self._commit()
        self._index_saved()

    def _write_segment(self, parts, rows: int) -> _Segment:
        name = f"seg-{uuid.uuid4().hex}"
        tmp = self.path / f".{name}.tmp"
        tmp.mkdir()
        try:
            vw = NpyWriter(tmp / "vectors.npy", (rows, self.dim), self.dtype)
            iw = NpyWriter(tmp / "ids.npy", (rows,), np.int64)
            for vec, ids in parts:
                for a in range(0, ids.shape[0], _CHUNK_ROWS):
                    vw.write(vec[a:a + _CHUNK_ROWS])
                    iw.write(ids[a:a + _CHUNK_ROWS])
            files = {"vectors.npy": vw.close(), "ids.npy": iw.close()}
            _io.fsync_dir(tmp)
            os.replace(tmp, self.path / name)
            _io.fsync_dir(self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _open_segment(self.path, {"name": name, "rows": rows, "files": files}, self.dim, self.dtype)

    def _merge(self, start: int, stop: int) -> None:
        """Merge segments [start, stop) into one without their removed rows, streamed in row chunks."""
        base = sum(s.rows for s in self._segments[:start])
        parts, keep_total = [], 0
        for s in self._segments[start:stop]:
            dead = self._removed[base:base + s.rows]
            parts.append((s, base, dead))
            keep_total += int((~dead).sum())
            base += s.rows

        def chunks():
            for s, _, dead in parts:
                reader = RowReader(self.path / s.name / "vectors.npy")
                try:
                    for a in range(0, s.rows, _CHUNK_ROWS):
                        b = min(a + _CHUNK_ROWS, s.rows)
                        keep = ~dead[a:b]
                        yield reader.read(a, b)[keep], np.asarray(s.ids[a:b])[keep]
                finally:
                    reader.close()

        merged = self._write_segment(chunks(), keep_total)
        first = sum(s.rows for s in self._segments[:start])
        self._removed = np.concatenate([self._removed[:first], np.zeros(keep_total, bool),
                                        self._removed[base:]])
        self._segments[start:stop] = [merged]
        self._ann, self._faiss = None, None  # its row numbers no longer hold

    def _commit(self) -> None:
        self.generation += 1
        removed = None
        if self._removed_name:
            file = self.path / self._removed_name
            removed = {"name": self._removed_name, "files": {"removed.npy": save_array(file, self._removed)}}
        m = {"format": FORMAT, "format_version": FORMAT_VERSION, "generation": self.generation,
             "dim": self.dim, "dtype": self.dtype, "segments": [s.record() for s in self._segments],
             "removed": removed, "ann": self._ann, "metadata": self.metadata}
        commit(self.path, m)
        _collect_garbage(self.path, m)

    def check(self) -> list[str]:
        """Verify every file of the current generation (sizes, digests, shapes): one line per problem."""
        problems = []
        m = read_manifest(self.path)
        for rec in m["segments"]:
            for fname, frec in rec.get("files", {}).items():
                file = self.path / rec["name"] / fname
                problems += _verify(file, frec)
        if m.get("removed"):
            problems += _verify(self.path / m["removed"]["name"], m["removed"]["files"]["removed.npy"])
        if m.get("ann"):
            problems += _verify(self.path / m["ann"]["name"], m["ann"]["files"][m["ann"]["name"]])
        try:
            GlobalIndex.open(self.path)
        except DamagedError as exc:
            problems.append(str(exc))
        return sorted(set(problems))


# ---- files -------------------------------------------------------------------------------------------------
def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError('the IVF-PQ option needs faiss, which is not installed: '
                          'pip install -e ".[faiss]"') from None
    return faiss


@contextlib.contextmanager
def _faiss_threads(n: int | None):
    """faiss's OpenMP thread count for a block (None: numba's), restored after: one thread policy for numba,
    BLAS and faiss, which never run at once here."""
    faiss = _faiss()
    if n is None:
        import numba

        n = numba.get_num_threads()
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "blake2b": _io.file_digest(path)}


def _verify(file: Path, rec: dict) -> list[str]:
    if not file.is_file():
        return [f"{file}: missing"]
    if file.stat().st_size != rec["size"]:
        return [f"{file}: {file.stat().st_size} bytes, the manifest says {rec['size']}"]
    if _io.file_digest(file) != rec["blake2b"]:
        return [f"{file}: content does not match its digest"]
    return []


def _check_size(file: Path, rec: dict | None) -> None:
    if not file.is_file():
        raise GlobalDamagedError(file, "missing")
    if rec is not None and file.stat().st_size != rec.get("size"):
        raise GlobalDamagedError(file, f"{file.stat().st_size} bytes, the manifest says {rec.get('size')}")


def _load_checked(file: Path, rec: dict | None, dtype, shape) -> np.ndarray:
    _check_size(file, rec)
    try:
        a = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # unreadable header, short file, pickled content
        raise GlobalDamagedError(file, f"unreadable ({str(exc).splitlines()[0][:120]})") from None
    if a.dtype != np.dtype(dtype) or a.shape != tuple(shape) or not a.flags.c_contiguous:
        raise GlobalDamagedError(file, f"expected {np.dtype(dtype)} {tuple(shape)}, got {a.dtype} {a.shape}")
    return a


def _open_segment(root: Path, rec: dict, dim: int, dtype: str) -> _Segment:
    d = Path(root) / rec["name"]
    rows = int(rec["rows"])
    files = rec.get("files") or {}
    vec = _load_checked(d / "vectors.npy", files.get("vectors.npy"), dtype, (rows, dim))
    ids = np.array(_load_checked(d / "ids.npy", files.get("ids.npy"), np.int64, (rows,)))
    return _Segment(vec, ids, rec["name"], files)


def read_manifest(path) -> dict:
    """Parse and check ``path/manifest.json``; FileNotFoundError when there is no index, GlobalDamagedError
    when it is unreadable."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no d2r global index here (manifest.json missing)")
    try:
        m = json.loads(file.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise GlobalDamagedError(file, f"unreadable manifest ({exc})") from None
    if m.get("format") != FORMAT:
        raise GlobalDamagedError(file, f"not a d2r global index manifest (format {m.get('format')!r})")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{file}: format version {m['format_version']} is newer than this d2r supports "
                         f"({FORMAT_VERSION})")
    try:
        int(m["generation"]), int(m["dim"])
        if m["dtype"] not in DTYPES:
            raise ValueError(f"dtype {m['dtype']!r}")
        for s in m["segments"]:
            if not str(s["name"]).startswith("seg-") or "/" in s["name"] or int(s["rows"]) < 0:
                raise ValueError(f"bad segment record {s!r}")
        for key, prefix in (("removed", "removed-"), ("ann", "ann-")):
            rec = m.get(key)
            if rec is not None and (not str(rec.get("name")).startswith(prefix) or "/" in rec["name"]):
                raise ValueError(f"bad {key} record")
    except (KeyError, TypeError, ValueError) as exc:
        raise GlobalDamagedError(file, f"malformed manifest ({exc})") from None
    return m


def _referenced(m: dict) -> set[str]:
    names = {s["name"] for s in m["segments"]}
    for key in ("removed", "ann"):
        if m.get(key):
            names.add(m[key]["name"])
    return names


def _collect_garbage(path: Path, current: dict) -> None:
    """Delete files that neither ``current`` nor the kept generations before it reference (the database's
    rule)."""
    gen = int(current["generation"])
    keep = _referenced(current)
    for entry in path.glob("manifest-*.json"):
        try:
            g = int(entry.stem.split("-", 1)[1])
        except ValueError:
            continue
        if g <= gen - KEEP_GENERATIONS:
            entry.unlink(missing_ok=True)
        elif g < gen:
            try:
                keep |= _referenced(json.loads(entry.read_text()))
            except (ValueError, OSError, KeyError, TypeError):
                return  # a damaged old generation: keep everything this time
    for entry in path.iterdir():
        if entry.name.startswith(("seg-", "removed-", "ann-", ".seg-")) and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _concat(parts, dtype) -> np.ndarray:
    parts = [np.asarray(p) for p in parts if p.shape[0]]
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
