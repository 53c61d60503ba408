"""The global index: one float32 (or float16) vector per image id, exact inner-product search over memory
maps, incremental add / remove, crash-safe saves; an optional faiss IVF-PQ index past what an exact scan
serves.

Storage (on :mod:`d2r.storage` and its rows base :class:`~d2r.storage.rows.IdRows`, the layer under the feature
store and the index: hashed ``.npy`` files, generations as the only commit point and garbage collection
(:class:`~d2r.storage.Generations`), the tier policy of merges (:class:`~d2r.storage.TierPolicy`), one writer under
an OS lock, readers lock-free on the generation they opened):

- ``seg-<uuid>/vectors.npy`` (n, D) float32|float16 and ``seg-<uuid>/ids.npy`` (n,) int64, immutable, written
  in a temporary folder renamed into place;
- ``removed-<uuid>.npy`` (rows,) bool over the rows of all segments in manifest order (rows removed since);
- ``ann-<uuid>.faiss``: an IVF-PQ index of the rows that existed when it was built (dropped by a merge);
- ``manifest.json`` = the newest ``manifest-<gen>.json``: format, D, dtype, segments and files with their
  size and BLAKE2b-128 digest. Garbage collection keeps every file the last :data:`KEEP_GENERATIONS`
  generations name (the storage layer's rule, as for the index).

Order of results: score descending, ties by insertion order (merges keep the order of rows). Files on disk are
untrusted: sizes, dtypes and shapes are checked against the manifest on open (the one
:class:`~d2r.storage.DamagedError` names the file, one line); :meth:`GlobalIndex.check` also verifies every digest.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.globaldesc.search import exact_top_k, merge_top_k
from d2r.storage import DamagedError, NpyWriter, RowReader, TierPolicy, file_record
from d2r.storage.rows import IdRows, RowsFormat, Segment

FORMAT = "d2r-global-index"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")
_CHUNK_ROWS = 1 << 16
KEEP_GENERATIONS = 3  # the current one and the two before it, as the index
GlobalDamagedError = DamagedError  # the storage layer's one damage error (store "global")



class _Segment(Segment):
    """A saved segment opened as memory maps (or the pending rows, in memory)."""

    def __init__(self, vectors, ids, name=None, files=None):
        self.vectors = vectors
        super().__init__(ids, name, files)


class GlobalIndex(IdRows):
    """Exact inner-product search over (N, D) vectors with int64 ids.

    ``GlobalIndex(dim)`` lives in memory; :meth:`create` / :meth:`open` work on a folder (``writable=True``
    takes the writer lock; readers see the generation they opened until :meth:`refresh`). :meth:`add` and
    :meth:`remove` change the in-memory state; :meth:`save` commits it.
    """

    def __init__(self, dim: int, dtype: str = "float32", path=None, policy: TierPolicy | None = None):
        if isinstance(dim, bool) or int(dim) < 1:
            raise ValueError(f"global index: dim must be a positive integer, got {dim!r}")
        if dtype not in DTYPES:
            raise ValueError(f"global index: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.dim, self.dtype = int(dim), dtype
        self._ann: dict | None = None  # manifest record of the faiss index
        self._faiss = None
        super().__init__(path, policy)


    # ---- folders -------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, dim: int, dtype: str = "float32", metadata: dict | None = None,
               policy: TierPolicy | None = None) -> "GlobalIndex":
        """A new, empty index in folder ``path`` (created; refused if it already holds an index), writable."""
        return cls._create(path, lambda: cls(dim, dtype, policy=policy), metadata)

    @classmethod
    def open(cls, path, writable: bool = False, policy: TierPolicy | None = None) -> "GlobalIndex":
        return cls._open(path, writable, lambda m: cls(m["dim"], m["dtype"], path, policy))

    def _load(self, m: dict) -> None:
        super()._load(m)
        self._ann, self._faiss = m.get("ann"), None

    def _open_segment(self, rec: dict) -> _Segment:
        return _open_segment(self.path, rec, self.dim, self.dtype)

    def _empty_data(self) -> np.ndarray:
        return np.zeros((0, self.dim), self.dtype)

    def _row_bytes(self) -> int:
        return self.dim * np.dtype(self.dtype).itemsize

    def _params(self) -> dict:
        return {"dim": self.dim, "dtype": self.dtype}

    def _extra_parts(self) -> dict:
        return {"ann": self._ann}

    # ---- contents ------------------------------------------------------------------------------------------
    def add(self, ids, vectors) -> None:
        """Add (N,) int64 ``ids`` with (N, D) real ``vectors`` (stored as the index dtype; search scores are
        those of the stored values). An id that is live already, or repeated, is refused (ValueError) and
        nothing is added; a removed id may come back."""
        ids = self._new_ids(ids)
        v = np.asarray(vectors)
        if v.ndim != 2 or v.shape != (ids.shape[0], self.dim) or v.dtype.kind not in "fiu":
            raise ValueError(f"vectors: expected ({ids.shape[0]}, {self.dim}) real, got {v.dtype} {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError("vectors: NaN or infinite values")
        self._append(ids, v.astype(self.dtype))

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
                raise ROWS.damaged(file, f"unreadable faiss index ({str(exc).splitlines()[0][:120]})")
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
    def _before_commit(self) -> None:
        """The faiss index built since the last save is written (the manifest names it)."""
        if self._ann is not None and self._ann["name"] is None:
            name = f"ann-{uuid.uuid4().hex}.faiss"
            with _io.atomic_path(self.path / name) as tmp:
                _faiss().write_index(self._faiss, str(tmp))
            self._ann = dict(self._ann, name=name, files={name: file_record(self.path / name)})

    def _write_segment(self, vectors: np.ndarray, ids: np.ndarray) -> _Segment:
        return self._write_parts([(vectors, ids)], int(ids.shape[0]))

    def _write_parts(self, parts, rows: int) -> _Segment:
        """A segment of ``rows`` rows from ``parts``, (vectors, ids) blocks written in row chunks."""
        def write(tmp):
            vw = NpyWriter(tmp / "vectors.npy", (rows, self.dim), self.dtype)
            iw = NpyWriter(tmp / "ids.npy", (rows,), np.int64)
            for vec, ids in parts:
                for a in range(0, ids.shape[0], _CHUNK_ROWS):
                    vw.write(vec[a:a + _CHUNK_ROWS])
                    iw.write(ids[a:a + _CHUNK_ROWS])
            return {"vectors.npy": vw.close(), "ids.npy": iw.close()}
        return _open_segment(self.path, self._write_folder(write, rows), self.dim, self.dtype)

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
                reader = RowReader(self.path / s.name / "vectors.npy", store="global")  # holds no file open
                for a in range(0, s.rows, _CHUNK_ROWS):
                    b = min(a + _CHUNK_ROWS, s.rows)
                    keep = ~dead[a:b]
                    yield reader.read(a, b)[keep], np.asarray(s.ids[a:b])[keep]
                reader.verify(s.files["vectors.npy"])  # hashed on the way: a merge never copies damage

        self._splice(start, stop, self._write_parts(chunks(), keep_total))
        self._ann, self._faiss = None, None  # its row numbers no longer hold

    def check(self) -> list[str]:
        """Verify every file of the current generation (sizes, digests, shapes): one line per problem."""
        return GlobalIndex._check_folder(self.path, read_manifest(self.path), _verify)


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


def _verify(file: Path, rec: dict) -> list[str]:
    if not file.is_file():
        return [f"{file}: missing"]
    if file.stat().st_size != rec["size"]:
        return [f"{file}: {file.stat().st_size} bytes, the manifest says {rec['size']}"]
    if _io.file_digest(file) != rec["blake2b"]:
        return [f"{file}: content does not match its digest"]
    return []


def _open_segment(root: Path, rec: dict, dim: int, dtype: str) -> _Segment:
    d = Path(root) / rec["name"]
    rows = int(rec["rows"])
    files = rec.get("files") or {}
    vec = _load_checked(d / "vectors.npy", files.get("vectors.npy"), dtype, (rows, dim))
    ids = np.array(_load_checked(d / "ids.npy", files.get("ids.npy"), np.int64, (rows,)))
    return _Segment(vec, ids, rec["name"], files)


def read_manifest(path) -> dict:
    """The current manifest of the global index at ``path``; FileNotFoundError when there is none, DamagedError
    when it is unreadable (or gone while generations or parts remain)."""
    return GENERATIONS.read(Path(path))


def _params(m: dict) -> None:
    int(m["dim"])
    if m["dtype"] not in DTYPES:
        raise ValueError(f"dtype {m['dtype']!r}")


ROWS = RowsFormat(FORMAT, FORMAT_VERSION, "global", "global index", _params, [("ann", "ann-", ".faiss")],
                  keep=KEEP_GENERATIONS)
GlobalIndex._ROWS = ROWS
GENERATIONS = ROWS.generations
_load_checked, _check_size = ROWS.load_checked, ROWS.check_size
