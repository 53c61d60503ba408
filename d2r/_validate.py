"""Input checks shared by the public classes (kernels validate nothing)."""

from __future__ import annotations

import numpy as np


def as_descriptors(x, dim: int | None = None, name: str = "descriptors") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (N, D) array, or raise ValueError saying what is wrong.

    Accepts any real floating dtype (cast to float32); an empty input of shape (0,) or (0, D) gives (0, dim).
    Integer, bool, complex or object arrays, wrong rank, a D that differs from ``dim`` and non-finite values
    are refused. The caller's array is never modified.
    """
    x = np.asarray(x)
    if x.size == 0 and x.ndim in (1, 2):
        d = dim if dim is not None else (x.shape[1] if x.ndim == 2 else 0)
        if x.ndim == 2 and dim is not None and x.shape[1] not in (0, dim):
            raise ValueError(f"{name}: expected D={dim}, got {x.shape[1]}")
        return np.zeros((0, d), dtype=np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected a floating-point array (float32), got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (N, D) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected D={dim}, got {x.shape[1]}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{name}: {bad} row(s) contain NaN or inf")
    return x


def as_counts(regions, n: int) -> np.ndarray:
    """Return per-region feature counts as int64 (R,), checking they are non-negative integers summing to n."""
    counts = np.asarray(regions)
    if counts.ndim != 1:
        raise ValueError(f"regions: expected a 1-D array of per-region counts, got shape {counts.shape}")
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        if not (np.issubdtype(counts.dtype, np.floating) and np.all(counts == np.round(counts))):
            raise ValueError(f"regions: counts must be integers, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise ValueError("regions: counts must be non-negative")
    if int(counts.sum()) != n:
        raise ValueError(f"regions: counts sum to {int(counts.sum())} but there are {n} descriptors")
    return counts


def as_top_k(top_k) -> int:
    """``top_k`` of a search as an int, or ValueError: a positive integer (numpy ints too); bools, floats,
    None and counts below 1 are refused (-1 used to return nothing, 2.5 to become 2)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return int(top_k)
