"""PCA for local descriptors with the official DELF semantics, and the official DELF PCA file format.

Transform (official ``PostProcessDescriptors``): L2-normalise each row → ``(d - mean) @ P[:dim].T`` →
optional whitening (divide by sqrt of the first ``dim`` variances; off by default, as in the D2R config) →
L2-normalise.

Files: the official parameters are three DatumProto files in one folder — ``mean.datum`` (D,),
``pca_proj_mat.datum`` (D, D) with the principal directions as ROWS in decreasing variance, and
``pca_vars.datum`` (D,). A DatumProto (delf/protos/datum.proto) is ``shape`` (field 1: packed int64 dims) +
``float_list`` (field 2: packed float32 values, row-major). We read and write that wire format directly (no
protobuf dependency); ``.npy`` files with the same stem are accepted too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from d2r._io import save_npy, write_bytes, write_json
from d2r._validate import as_descriptors

MEAN_FILE = "mean.datum"
MATRIX_FILE = "pca_proj_mat.datum"
VARIANCES_FILE = "pca_vars.datum"


# --------------------------------------------------------------------------------------------- DatumProto
def _varint(value: int) -> bytes:
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
            if len(value) != n:
                raise ValueError("truncated length-delimited field")
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield field, wire, value


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def datum_to_bytes(array) -> bytes:
    """Serialise an array as a DatumProto (float32 values, row-major), like delf
    ``datum_io.SerializeToString``."""
    arr = np.asarray(array, dtype=np.float64)
    dims = b"".join(_varint(int(d)) for d in arr.shape)
    shape = _len_field(1, dims) if arr.shape else b""
    values = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    floats = _len_field(1, values) if values else b""
    return _len_field(1, shape) + _len_field(2, floats)


def datum_from_bytes(data: bytes, name: str = "datum") -> np.ndarray:
    """Parse a DatumProto (float_list or uint32_list) into a float64 array of its declared shape."""
    dims: list[int] = []
    values: list[np.ndarray] = []
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:
                for f, w, v in _fields(value):
                    if f != 1:
                        continue
                    if w == 2:  # packed
                        p = 0
                        while p < len(v):
                            d, p = _read_varint(v, p)
                            dims.append(d)
                    elif w == 0:
                        dims.append(v)
            elif field == 2 and wire == 2:
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        values.append(np.frombuffer(v, dtype="<f4").astype(np.float64))
                    elif f == 1 and w == 5:
                        values.append(np.frombuffer(v, dtype="<f4").astype(np.float64))
            elif field == 3 and wire == 2:  # uint32_list in newer datum.proto
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        p, ints = 0, []
                        while p < len(v):
                            d, p = _read_varint(v, p)
                            ints.append(d)
                        values.append(np.asarray(ints, dtype=np.float64))
                    elif f == 1 and w == 0:
                        values.append(np.asarray([v], dtype=np.float64))
    except ValueError as exc:
        raise ValueError(f"{name}: not a valid DatumProto ({exc})") from exc
    flat = np.concatenate(values) if values else np.zeros(0, np.float64)
    if int(np.prod(dims)) != flat.size:
        raise ValueError(f"{name}: DatumProto shape {dims} does not match {flat.size} values")
    return flat.reshape(dims)


def write_datum(path, array) -> None:
    write_bytes(path, datum_to_bytes(array))


def read_datum(path) -> np.ndarray:
    path = Path(path)
    return datum_from_bytes(path.read_bytes(), str(path))


def _read_param(folder: Path, datum_name: str, required: bool = True):
    p = folder / datum_name
    if p.exists():
        return read_datum(p)
    npy = p.with_suffix(".npy")
    if npy.exists():
        return np.load(npy, allow_pickle=False).astype(np.float64)
    if required:
        raise FileNotFoundError(f"{folder}: neither {datum_name} nor {npy.name} found")
    return None


# --------------------------------------------------------------------------------------------- PCA
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    n = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=1, keepdims=True))
    return (x / np.maximum(n, eps)).astype(np.float32)


class PCA:
    """Descriptor PCA: ``fit`` learns ``mean_`` (D,), ``components_`` (D, D) rows by decreasing variance and
    ``variances_`` (D,); ``transform`` maps (N, D) float32 → (N, dim) float32 unit rows (N = 0 → (0, dim))."""
    def __init__(self, dim: int = 128, whiten: bool = False):
        self.dim = int(dim)
        self.whiten = bool(whiten)

    # learned state ------------------------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, mean, components, variances=None, dim: int = 128, whiten: bool = False) -> "PCA":
        pca = cls(dim=dim, whiten=whiten)
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        components = np.asarray(components, dtype=np.float64)
        if components.ndim != 2 or components.shape[1] != mean.size:
            raise ValueError(f"PCA: projection matrix shape {components.shape} does not match "
                             f"mean of size {mean.size}")
        if not 0 < pca.dim <= components.shape[0]:
            raise ValueError(f"PCA: dim={pca.dim} but the projection has {components.shape[0]} rows")
        if whiten and variances is None:
            raise ValueError("PCA: whitening needs the variances")
        pca.mean_ = mean
        pca.components_ = components
        pca.variances_ = None if variances is None else np.asarray(variances, dtype=np.float64).reshape(-1)
        return pca

    def fit(self, descriptors) -> "PCA":
        """Fit on (N, D) descriptors (L2-normalised first, as at transform time); needs N >= 2."""
        x = as_descriptors(descriptors).astype(np.float64)
        if x.shape[0] < 2:
            raise ValueError(f"PCA.fit: need at least 2 descriptors, got {x.shape[0]}")
        if self.dim > x.shape[1]:
            raise ValueError(f"PCA.fit: dim={self.dim} exceeds descriptor dimension D={x.shape[1]}")
        x = l2_normalize(x).astype(np.float64)
        mean = x.mean(axis=0)
        cov = np.cov(x - mean, rowvar=False, bias=False)
        w, v = np.linalg.eigh(cov)
        order = np.argsort(-w, kind="stable")
        comps = v[:, order].T
        # Deterministic sign: the largest-magnitude entry of each component is positive.
        idx = np.argmax(np.abs(comps), axis=1)
        comps *= np.sign(comps[np.arange(comps.shape[0]), idx])[:, None]
        self.mean_ = mean
        self.components_ = comps
        self.variances_ = np.maximum(w[order], 0.0)
        return self

    @property
    def input_dim(self) -> int:
        return int(self.mean_.size)

    def _check_fitted(self):
        if not hasattr(self, "mean_"):
            raise ValueError("PCA is not fitted: call fit() or load()")

    def transform(self, descriptors) -> np.ndarray:
        """L2 → (d - mean) @ P[:dim].T → (whiten) → L2; (N, D) → (N, dim) float32."""
        self._check_fitted()
        x = as_descriptors(descriptors, dim=self.input_dim)
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        x = l2_normalize(x).astype(np.float64)
        y = (x - self.mean_) @ self.components_[: self.dim].T
        if self.whiten:
            y = y / np.sqrt(np.maximum(self.variances_[: self.dim], 1e-12))
        return l2_normalize(y)

    # files --------------------------------------------------------------------------------------------
    def save(self, folder, format: str = "datum") -> Path:
        """Write the official files (``format="datum"``) or ``.npy`` twins, plus ``pca.json``."""
        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {MEAN_FILE: self.mean_, MATRIX_FILE: self.components_}
        if self.variances_ is not None:
            arrays[VARIANCES_FILE] = self.variances_
        for name, arr in arrays.items():
            if format == "datum":
                write_datum(folder / name, arr)
            elif format == "npy":
                save_npy((folder / name).with_suffix(".npy"), arr.astype(np.float32))
            else:
                raise ValueError(f"PCA.save: format must be 'datum' or 'npy', got {format!r}")
        write_json(folder / "pca.json",
                   {"dim": self.dim, "whiten": self.whiten, "fingerprint": self.fingerprint()})
        return folder

    @classmethod
    def load(cls, folder, dim: int | None = None, whiten: bool | None = None) -> "PCA":
        """Load official ``mean.datum`` / ``pca_proj_mat.datum`` [/ ``pca_vars.datum``] (or ``.npy``) files.

        ``dim`` / ``whiten`` default to ``pca.json`` when present, else 128 / False (the D2R config)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: PCA folder not found")
        meta = {}
        if (folder / "pca.json").exists():
            meta = json.loads((folder / "pca.json").read_text())
        dim = int(dim if dim is not None else meta.get("dim", 128))
        whiten = bool(whiten if whiten is not None else meta.get("whiten", False))
        mean = _read_param(folder, MEAN_FILE)
        mat = _read_param(folder, MATRIX_FILE)
        var = _read_param(folder, VARIANCES_FILE, required=False)
        return cls.from_arrays(mean, mat, var, dim=dim, whiten=whiten)

    def fingerprint(self) -> str:
        """Stable hash of the learned parameters (as float32) and the options."""
        self._check_fitted()
        h = hashlib.sha1()
        h.update(json.dumps({"dim": self.dim, "whiten": self.whiten}, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.mean_, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.components_[: self.dim], dtype="<f4").tobytes())
        if self.whiten:
            h.update(np.ascontiguousarray(self.variances_[: self.dim], dtype="<f4").tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        fitted = hasattr(self, "mean_")
        return f"PCA(dim={self.dim}, whiten={self.whiten}{', D=%d' % self.input_dim if fitted else ''})"


def load_pca(source, dim: int | None = None) -> PCA | None:
    """None → None; a PCA → itself; a folder → ``PCA.load(folder, dim)``."""
    if source is None or isinstance(source, PCA):
        return source
    return PCA.load(source, dim=dim)

