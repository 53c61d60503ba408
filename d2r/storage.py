"""Storage primitives shared by the feature store and the index: hashed ``.npy`` files and their records.

Every data file is written once (fsynced) and recorded in a manifest as ``{"size", "blake2b"}`` (BLAKE2b-128 of
its bytes); :class:`DamagedError` names a file that is missing or does not hold what its record says.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from d2r import _io

HINT = ("index damaged; `d2r index check` lists the damaged files, `d2r index repair` drops them (`--reindex`: "
        "indexes their images again from the engine's feature store)")


class DamagedError(ValueError):
    """A database file is missing, truncated, or does not hold what the manifest says. ``file``: its path."""

    def __init__(self, file, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{file}: {problem} ({HINT})")


class NpyWriter:
    """Write one ``.npy`` of known shape and dtype in pieces (rows appended), hashing (BLAKE2b-128) as it goes.

    Memory is the size of one piece; the digest equals :func:`d2r._io.file_digest` of the finished file."""

    def __init__(self, path, shape, dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.rows = 0
        self._hash = hashlib.blake2b(digest_size=16)
        self.size = 0
        self._f = open(self.path, "wb")
        header = io.BytesIO()
        np.lib.format.write_array_header_2_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        self._put(header.getvalue())

    def _put(self, data) -> None:
        self._f.write(data)
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
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()
        return {"size": self.size, "blake2b": self._hash.hexdigest()}


def save_array(path, array: np.ndarray, chunk_rows: int = 1 << 16) -> dict:
    """Write ``array`` as ``.npy`` (fsynced); return its record ``{"size", "blake2b"}``."""
    array = np.asarray(array)
    w = NpyWriter(path, array.shape, array.dtype)
    if array.ndim == 0:
        w.write(array.reshape(1))
    for start in range(0, array.shape[0] if array.ndim else 0, chunk_rows):
        w.write(array[start:start + chunk_rows])
    return w.close()


class RowReader:
    """Rows ``[start, stop)`` of a ``.npy`` by ``pread`` (no memory map, so merges do not grow the RSS)."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        self.shape, self.dtype = shape, dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, start: int, stop: int) -> np.ndarray:
        n = max(int(stop) - int(start), 0)
        want = n * self.row_bytes
        data = os.pread(self._fd, want, self.offset + int(start) * self.row_bytes) if want else b""
        if len(data) != want:
            raise DamagedError(self.path, f"truncated (rows {start}:{stop} missing)")
        return np.frombuffer(data, self.dtype).reshape((n,) + tuple(self.shape[1:]))

    def close(self) -> None:
        os.close(self._fd)


def check_file(file: Path, record: dict, bad, digests: bool = True) -> None:
    if not file.is_file():
        bad(file, "missing")
        return
    size = file.stat().st_size
    if size != record["size"]:
        bad(file, f"{size} bytes, the manifest says {record['size']}")
    elif digests and _io.file_digest(file) != record["blake2b"]:
        bad(file, "checksum mismatch (contents changed)")


def file_record(file: Path) -> dict:
    return {"file": {"size": file.stat().st_size, "blake2b": _io.file_digest(file)}} if file.is_file() else {}
