"""Data files of both stores: ``.npy`` arrays written once (fsynced) while hashed, read back by rows, and
their records ``{"size", "blake2b"}`` (BLAKE2b-128 of the file's bytes, as :func:`d2r._io.file_digest`).

:class:`DamagedError` names a file that is missing or does not hold what its record or its header says; its
message ends with what to do, chosen by the store the file belongs to.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from d2r import _io

HINTS = {
    "index": "index damaged; `d2r index check` lists the damaged files, `d2r index repair` restores the newest "
             "intact generation and drops damaged segments (`--reindex`: indexes their images again from the "
             "engine's feature store)",
    "features": "feature store damaged; `d2r index check` lists the damaged files, `d2r index repair` restores "
                "the newest intact generation and drops damaged shards (their images must be extracted again)",
    "global": "global index damaged; GlobalIndex.check() lists the damaged files",
    "signatures": "signature index damaged; SignatureIndex.check() lists the damaged files; signatures are "
                  "only a cache of the images: remove the folder and `d2r duplicates ENGINE --keep` computes "
                  "them again",
}


class DamagedError(ValueError):
    """A store file is missing, truncated, or does not hold what its manifest says. ``file``: its path;
    ``problem``: what is wrong; ``store``: ``"index"``, ``"features"``, ``"global"`` or ``"signatures"`` (picks the hint of the message)."""

    def __init__(self, file, problem: str, store: str = "index"):
        self.file = str(file)
        self.problem = problem
        self.store = store
        super().__init__(f"{file}: {problem} ({HINTS[store]})")

    def __reduce__(self):  # picklable across processes (Ray, multiprocessing)
        return DamagedError, (self.file, self.problem, self.store)


def file_record(path) -> dict:
    """``{"size", "blake2b"}`` of the file at ``path`` as it is now (for files written by other means)."""
    return {"size": Path(path).stat().st_size, "blake2b": _io.file_digest(path)}


def check_file(file: Path, record: dict, bad, digests: bool = True) -> None:
    """Call ``bad(file, problem)`` when ``file`` is missing or differs from ``record`` in size or
    (``digests``) in its BLAKE2b digest."""
    try:
        size = Path(file).stat().st_size
    except FileNotFoundError:
        bad(file, "missing")
        return
    if size != record["size"]:
        bad(file, f"{size} bytes, the manifest says {record['size']}")
    elif digests and _io.file_digest(file, chunk=1 << 18) != record["blake2b"]:  # a small buffer: merges
        bad(file, "checksum mismatch (contents changed)")


def verify_file(file: Path, record: dict, store: str = "index", digests: bool = True) -> None:
    """:func:`check_file` raising :class:`DamagedError` (what a writer calls on every file it reads to write
    another: a damaged input is never rewritten under a fresh checksum)."""
    def bad(f, problem):
        raise DamagedError(f, problem, store)

    check_file(file, record, bad, digests)


class NpyWriter:
    """Write one ``.npy`` of known shape and dtype in pieces (rows appended), hashing (BLAKE2b-128) as it
    goes.

    Memory is the size of one piece; the digest equals :func:`d2r._io.file_digest` of the finished file. An
    OSError names the file."""

    def __init__(self, path, shape, dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.rows = 0
        self.size = 0
        self._hash = hashlib.blake2b(digest_size=16)
        with _io.naming(self.path):
            self._f = open(self.path, "wb")
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        self._put(header.getvalue())

    def _put(self, data) -> None:
        try:
            with _io.naming(self.path):
                self._f.write(data)
        except BaseException:
            self._f.close()
            raise
        self._hash.update(data)
        self.size += len(data)

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]} for an array of {self.shape}")
        if rows.shape[0]:
            self._put(memoryview(rows.reshape(-1)).cast("B"))
        self.rows += rows.shape[0]

    def close(self) -> dict:
        """Finish (fsync) and return the file's record ``{"size", "blake2b"}``."""
        try:
            if self.rows != (self.shape[0] if self.shape else 1):
                raise ValueError(f"{self.path}: wrote {self.rows} rows for an array of shape {self.shape}")
            with _io.naming(self.path):
                self._f.flush()
                os.fsync(self._f.fileno())
        finally:
            self._f.close()
        return {"size": self.size, "blake2b": self._hash.hexdigest()}


def save_array(path, array: np.ndarray, chunk_rows: int = 1 << 16, atomic: bool = False) -> dict:
    """Write ``array`` as ``.npy`` (fsynced); return its record ``{"size", "blake2b"}``. ``atomic``: under a
    temporary name beside ``path``, renamed onto it once complete (``path`` never holds a torn file)."""
    if atomic:
        try:
            with _io.atomic_path(path) as tmp:
                return save_array(tmp, array, chunk_rows)
        except OSError as exc:  # name the file being written, not its temporary twin
            if exc.errno is None or not Path(exc.filename or "").name.startswith(f".{Path(path).name}."):
                raise
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    array = np.asarray(array)
    w = NpyWriter(path, array.shape, array.dtype)
    if array.ndim == 0:
        w.write(array.reshape(1))
    for start in range(0, array.shape[0] if array.ndim else 0, chunk_rows):
        w.write(array[start:start + chunk_rows])
    return w.close()


def read_header(path, store: str = "index") -> tuple[tuple, np.dtype, int]:
    """``(shape, dtype, data offset)`` of a C-ordered ``.npy`` whose size matches its header, read before any
    data; :class:`DamagedError` otherwise (missing, torn or altered header, wrong size)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            try:
                version = fmt.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = fmt.read_array_header_1_0(fh)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = fmt.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"unknown .npy version {version}")
            except Exception as exc:  # a torn or altered header: numpy raises many kinds
                raise DamagedError(path, f"not a readable .npy file ({type(exc).__name__}: {exc})",
                                   store) from None
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        raise DamagedError(path, "missing (listed in the manifest)", store) from None
    if fortran:
        raise DamagedError(path, f"Fortran-ordered array of shape {shape}, expected C order", store)
    need = offset + int(np.prod([int(x) for x in shape], dtype=object)) * dtype.itemsize
    if size != need:
        raise DamagedError(path, f"{size} bytes, its header needs {need} (truncated or altered)", store)
    return tuple(int(x) for x in shape), dtype, offset


class RowReader:
    """Rows of a ``.npy`` read by ``pread`` on demand (``reader[a:b]`` or ``read(a, b)``: a new array); holds
    no file open, so any number can be cached and any number of threads can read, and no memory map grows the
    RSS.

    Reads that run through the file in order, from its first row to its last (a streaming merge), are hashed
    on the way: :meth:`verify` then checks the record at no extra I/O (else it reads the file once more)."""

    def __init__(self, path, header: tuple | None = None, store: str = "index"):
        self.path = Path(path)
        self.store = store
        self.shape, self.dtype, self.offset = header if header is not None else read_header(self.path, store)
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._hash = None  # BLAKE2b of what was read in order from the start (False: read out of order)
        self._next = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        return self.read(a, b)

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = int(start), int(stop)
        n = max(stop - start, 0)
        out = np.empty((n,) + self.shape[1:], self.dtype)
        want = n * self.row_bytes
        if want:
            try:
                with open(self.path, "rb", buffering=0) as fh:
                    at = self.offset + start * self.row_bytes
                    got = _pread_into(fh.fileno(), memoryview(out).cast("B"), at)
                    if start == 0 and self._next == 0 and self._hash is None:
                        head = os.pread(fh.fileno(), self.offset, 0)
                        whole = len(head) == self.offset
                        self._hash = hashlib.blake2b(head, digest_size=16) if whole else False
            except FileNotFoundError:
                raise DamagedError(self.path, "missing (listed in the manifest)", self.store) from None
            if got != want:
                raise DamagedError(self.path, f"truncated (rows {start}:{stop} missing)", self.store)
            if self._hash and start == self._next:
                self._hash.update(memoryview(out).cast("B"))
                self._next = stop
            else:
                self._hash = False
        return out

    def verify(self, record: dict) -> None:
        """:class:`DamagedError` unless the file matches ``record`` (its size and BLAKE2b digest)."""
        whole = self._hash and self._next == self.shape[0] and self.offset + self._next * self.row_bytes
        if whole and whole == record["size"]:
            if self._hash.hexdigest() != record["blake2b"]:
                raise DamagedError(self.path, "checksum mismatch (contents changed)", self.store)
            return
        verify_file(self.path, record, self.store)


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset`` of ``fd`` (several reads where the OS returns less); the bytes read."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got
