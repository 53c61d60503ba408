"""Visual-word codebooks: validation, nearest-word assignment, the ``.npz`` file format and its fingerprint."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np

from d2r import _io
from d2r._validate import as_descriptors
from d2r.kernels.assign import refine_exact, smallest_per_row

FORMAT = "d2r-codebook"
FORMAT_VERSION = 1

# Extra float32 candidates re-ranked exactly per descriptor; float32 rounding can only swap words whose
# distances agree to ~1e-6 relative, far fewer than this many at once.
_SHORTLIST_EXTRA = 4
# Bound on the (rows × K) float32 distance block held at once.
_BLOCK_ELEMENTS = 1 << 24


class Codebook:
    """K visual words (centroids) in D dimensions.

    Args:
        centroids: (K, D) real array, K ≥ 1, finite; stored as C-contiguous float32.
        metadata: free-form provenance (feature type and parameters, PCA fingerprint, training set, seed, ...),
            saved with the codebook. ``metadata["fingerprint"]`` is always the content hash.
    """

    def __init__(self, centroids, metadata: dict | None = None):
        c = np.asarray(centroids)
        if c.ndim != 2:
            raise ValueError(f"centroids: expected a 2-D (K, D) array, got shape {c.shape}")
        if c.shape[0] == 0:
            raise ValueError("centroids: K = 0, a codebook needs at least one word")
        if c.shape[1] == 0:
            raise ValueError("centroids: D = 0")
        self.centroids = np.array(as_descriptors(c, name="centroids"))  # our own read-only copy
        self.centroids.setflags(write=False)
        # The float32 shortlist works on centred data: distances are unchanged, but a large common offset
        # (e.g. raw SIFT) no longer eats the float32 precision of ‖c‖² − 2⟨x, c⟩.
        self._mean = self.centroids.mean(axis=0, dtype=np.float64).astype(np.float32)
        self._centred = self.centroids - self._mean
        self._sq_norms = np.einsum("kd,kd->k", self._centred, self._centred).astype(np.float32)
        self.fingerprint = _fingerprint(self.centroids)
        self.metadata = dict(metadata or {})
        self.metadata["fingerprint"] = self.fingerprint

    @property
    def size(self) -> int:
        """K, the number of visual words."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """D, the descriptor dimensionality."""
        return int(self.centroids.shape[1])

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Codebook(K={self.size}, D={self.dim}, fingerprint={self.fingerprint!r})"

    def assign(self, descriptors, num_assignments: int = 1) -> np.ndarray:
        """The ``num_assignments`` nearest words of each descriptor, by squared L2, ties by lower word index.

        descriptors: (N, D) float32 (any float dtype is cast). Returns (N, m) int64, nearest first; N = 0 gives
        (0, m). The distance block is a float32 BLAS GEMM, processed in row chunks to bound memory; a shortlist of
        m + 4 words per descriptor is then re-ranked in float64, so the result equals an exact brute force.
        """
        m = int(num_assignments)
        if m < 1 or m > self.size:
            raise ValueError(f"num_assignments must be in [1, K={self.size}], got {num_assignments}")
        x = as_descriptors(descriptors, self.dim)
        n = x.shape[0]
        out = np.empty((n, m), np.int64)
        if n == 0:
            return out
        c = min(m + _SHORTLIST_EXTRA, self.size)
        rows = max(1, _BLOCK_ELEMENTS // self.size)
        block = np.empty((min(rows, n), self.size), np.float32)
        ct = self._centred.T
        for start in range(0, n, rows):
            xc = x[start:start + rows]
            dots = block[: xc.shape[0]]
            np.matmul(xc - self._mean, ct, out=dots)
            shortlist = smallest_per_row(dots, self._sq_norms, c)
            out[start:start + rows] = refine_exact(xc, self.centroids, shortlist, m)
        return out

    # ---- file format -------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write ``path`` (.npz: ``centroids`` float32 (K, D) + ``metadata`` JSON string) atomically."""
        path = Path(path)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "k": self.size, "dim": self.dim}
        header.update(self.metadata)
        _io.save_npz(path, centroids=self.centroids, metadata=np.array(json.dumps(header, sort_keys=True)))
        return path

    @classmethod
    def load(cls, path) -> "Codebook":
        """Read a codebook written by :meth:`save`, checking format, shape and fingerprint."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: codebook file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                centroids = z["centroids"]
                header = json.loads(str(z["metadata"])) if "metadata" in z else {}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a d2r codebook ({exc})") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a d2r codebook (format {header.get('format')!r})")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path}: codebook format version {header['format_version']} is newer than "
                             f"this d2r supports ({FORMAT_VERSION})")
        if centroids.ndim != 2 or (header.get("k"), header.get("dim")) != centroids.shape:
            raise ValueError(f"{path}: header says K={header.get('k')}, D={header.get('dim')} but centroids "
                             f"have shape {centroids.shape}")
        meta = {k: v for k, v in header.items() if k not in ("format", "format_version", "k", "dim")}
        book = cls(centroids, meta)
        stored = header.get("fingerprint")
        if stored is not None and stored != book.fingerprint:
            raise ValueError(f"{path}: content hash {book.fingerprint} does not match the stored fingerprint "
                             f"{stored} (file corrupted?)")
        return book


def _fingerprint(centroids: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{centroids.shape[0]}x{centroids.shape[1]}:".encode())
    h.update(np.ascontiguousarray(centroids, dtype="<f4").tobytes())
    return h.hexdigest()[:16]
