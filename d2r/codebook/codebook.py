"""Visual-word codebooks: validation, nearest-word assignment, the ``.npz`` file format and its fingerprint."""

from __future__ import annotations

import hashlib
import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2r import _io
from d2r._validate import as_descriptors
from d2r.kernels.assign import CHUNK, finish_candidates, refine_or_scan, select_candidates, update_shortlist
from d2r.features.config import feature_type, pca_fingerprint

FORMAT = "d2r-codebook"
FORMAT_VERSION = 1

# Extra float32 candidates re-ranked exactly per descriptor. A row whose shortlist is not provably wide enough
# (float32 rounding bound, see ``assign``) is scanned in float64 over all words instead; that is rare.
_SHORTLIST_EXTRA = 4
# Two-pass selection (``kernels.assign.select_candidates``) for m ≤ _SELECT_MAX_M: float32 candidates kept per
# descriptor before a row falls back to the float64 scan.
_SELECT_MAX_M = 8
_CANDIDATES = 32
# GEMM blocks: rows of descriptors × columns of words; the (rows × words) float32 block stays in cache.
_BLOCK_ROWS = 256
_BLOCK_WORDS = 1024
# Below this many (descriptor, word) pairs one thread does everything (thread start-up costs more than it saves).
_PARALLEL_MIN_PAIRS = 1 << 21
_parallel_lock = threading.Lock()
_blas_controller = None


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
        self._centred_t = self._centred.T
        self._max_norm = float(np.sqrt(self._sq_norms.max(initial=0.0)))
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
        (0, m). Equal to a float64 brute force: a float32 BLAS GEMM in blocks keeps the m + 4 nearest words per
        descriptor, which are re-ranked in float64; a row whose float32 gap between the m-th and the last kept word
        is within the rounding bound is scanned in float64 over all words. Large inputs spread row blocks over
        ``numba.get_num_threads()`` Python threads with BLAS held at one thread; small ones run on one thread.
        """
        m = int(num_assignments)
        if m < 1 or m > self.size:
            raise ValueError(f"num_assignments must be in [1, K={self.size}], got {num_assignments}")
        x = as_descriptors(descriptors, self.dim)
        n = x.shape[0]
        if n == 0:
            return np.empty((0, m), np.int64)
        xc = x - self._mean
        # |float32 value − exact value| ≤ (D + 5)·u·R² with R = ‖x − μ‖ + max‖c − μ‖ (GEMM, norms, centring
        # rounding); bound is twice that. A word whose float32 value exceeds the m-th smallest by more than
        # 2·bound is provably farther than each of the m nearest.
        # ‖x − μ‖² summed in float32 (relative error ≤ D·u), rounded up by 4·D·u.
        up = 1.0 + 2.0 * self.dim * float(np.finfo(np.float32).eps)
        r = np.sqrt(np.einsum("nd,nd->n", xc, xc).astype(np.float64) * up) + self._max_norm
        bound = 2.0 * (self.dim + 8) * np.finfo(np.float32).eps / 2 * r * r
        if m <= _SELECT_MAX_M and min(self.size, _BLOCK_WORDS) >= 2 * m * CHUNK:
            return self._assign_two_pass(x, xc, m, (2.0 * bound * 1.001).astype(np.float32))
        c = min(m + _SHORTLIST_EXTRA, self.size)
        best_d = np.full((n, c), np.inf, np.float32)
        best_i = np.full((n, c), -1, np.int64)
        self._run_blocks(n, lambda s, e: self._shortlist(xc, s, e, best_d, best_i))
        if c < self.size:
            full = (best_d[:, c - 1].astype(np.float64) - best_d[:, m - 1]) <= 2.0 * bound
        else:
            full = np.zeros(n, bool)
        return refine_or_scan(x, self.centroids, best_i, full, m)

    def _run_blocks(self, n, work) -> None:
        """Call ``work(start, stop)`` on row blocks, on Python threads (BLAS at one thread) if large."""
        threads = _threads() if n * self.size >= _PARALLEL_MIN_PAIRS else 1
        if threads > 1 and n > 1:
            step = min(_BLOCK_ROWS, -(-n // threads))
            starts = range(0, n, step)
            with _parallel_lock, _one_blas_thread():
                with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                    list(pool.map(lambda s: work(s, min(s + step, n)), starts))
        else:
            for s in range(0, n, _BLOCK_ROWS):
                work(s, min(s + _BLOCK_ROWS, n))

    def _assign_two_pass(self, x, xc, m, margin) -> np.ndarray:
        n = x.shape[0]
        wit = np.full((n, m), np.inf, np.float32)
        cand_d = np.empty((n, _CANDIDATES), np.float32)
        cand_i = np.empty((n, _CANDIDATES), np.int64)
        cnt = np.zeros(n, np.int64)
        out = np.empty((n, m), np.int64)
        ct = self._centred_t

        def work(start, stop):
            block = np.empty((stop - start, min(_BLOCK_WORDS, self.size)), np.float32)
            rows = slice(start, stop)
            for k0 in range(0, self.size, _BLOCK_WORDS):
                k1 = min(k0 + _BLOCK_WORDS, self.size)
                dots = block[:, : k1 - k0]
                np.matmul(xc[rows], ct[:, k0:k1], out=dots)
                select_candidates(dots, self._sq_norms[k0:k1], k0, margin[rows], wit[rows], cand_d[rows],
                                  cand_i[rows], cnt[rows])
            finish_candidates(x[rows], self.centroids, margin[rows], cand_d[rows], cand_i[rows], cnt[rows],
                              out[rows])

        self._run_blocks(n, work)
        return out

    def _shortlist(self, xc, start, stop, best_d, best_i) -> None:
        rows = stop - start
        block = np.empty((rows, min(_BLOCK_WORDS, self.size)), np.float32)
        ct = self._centred_t
        for k0 in range(0, self.size, _BLOCK_WORDS):
            k1 = min(k0 + _BLOCK_WORDS, self.size)
            dots = block[:, : k1 - k0]
            np.matmul(xc[start:stop], ct[:, k0:k1], out=dots)
            update_shortlist(dots, self._sq_norms[k0:k1], k0, best_d[start:stop], best_i[start:stop])

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
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a folder, not a codebook file")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: codebook file not found")
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
                raise ValueError("a single array, not an .npz with 'centroids' and 'metadata'")
            with z:
                centroids = z["centroids"]
                header = json.loads(str(z["metadata"])) if "metadata" in z else {}
            if not isinstance(header, dict):
                raise ValueError(f"its metadata is a JSON {type(header).__name__}, not an object")
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


def _threads() -> int:
    import numba

    return int(numba.get_num_threads())


def _one_blas_thread():
    """Hold BLAS at one thread while Python threads run blocks in parallel (restored on exit)."""
    global _blas_controller
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


def _fingerprint(centroids: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{centroids.shape[0]}x{centroids.shape[1]}:".encode())
    h.update(np.ascontiguousarray(centroids, dtype="<f4").tobytes())
    return h.hexdigest()[:16]


def default_codebook_name(feature: str, dim: int, k: int, trainset: str, seed: int) -> str:
    """The codebooks/ naming convention: ``<feature>-<dim>d-k<K>-<trainset>-s<seed>.npz``."""
    k_txt = f"{k // 1024}k" if k % 1024 == 0 and k >= 1024 else str(k)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in trainset) or "data"
    return f"{feature}-{dim}d-k{k_txt}-{safe}-s{seed}.npz"


def check_codebook(codebook: Codebook, *, dim: int | None = None, feature: str | None = None,
                   pca_fingerprint: str | None = None) -> None:
    """Raise ValueError when ``codebook`` does not fit features of dimension ``dim`` / type ``feature`` / PCA
    ``pca_fingerprint`` (metadata fields absent from the codebook are not checked)."""
    if dim is not None and codebook.dim != int(dim):
        raise ValueError(f"codebook {codebook.fingerprint} has D={codebook.dim}, features have D={dim}")
    meta = codebook.metadata
    if feature is not None and meta.get("feature") not in (None, feature):
        raise ValueError(f"codebook {codebook.fingerprint} was trained on {meta['feature']!r} features, "
                         f"not {feature!r}")
    if pca_fingerprint is not None and meta.get("pca_fingerprint") not in (None, pca_fingerprint):
        raise ValueError(f"codebook {codebook.fingerprint} was trained after PCA {meta['pca_fingerprint']}, "
                         f"features use PCA {pca_fingerprint}")


# A codebook is trained on at least this many descriptors per word (k-means on fewer mostly memorises them).
MIN_DESCRIPTORS_PER_WORD = 4


def codebook_metadata(extractor, trainset: str) -> dict:
    """What a codebook trained on this extractor's features records (checked by :func:`fit_codebook`)."""
    meta = {"feature": feature_type(extractor), "trainset": trainset, "feature_fingerprint": extractor.fingerprint()}
    pca = pca_fingerprint(extractor)
    if pca is not None:
        meta["pca_fingerprint"] = pca
    return meta


def fit_codebook(book, extractor, what: str = "codebook") -> Codebook:
    """Load ``book`` (a :class:`Codebook` or a ``.npz`` path) and check it fits the extractor's features
    (dimension, feature type, PCA fingerprint, via :func:`check_codebook`); ValueError naming it."""
    source = what if isinstance(book, Codebook) else f"{what} {book}"
    if not isinstance(book, Codebook):
        book = Codebook.load(book)
    try:
        pca = pca_fingerprint(extractor)
        check_codebook(book, dim=extractor.dim, feature=feature_type(extractor), pca_fingerprint=pca)
        if pca is None and book.metadata.get("pca_fingerprint") is not None:
            raise ValueError(f"codebook {book.fingerprint} was trained after PCA "
                             f"{book.metadata['pca_fingerprint']}, the features use no PCA")
    except ValueError as exc:
        raise ValueError(f"{source}: does not fit the {feature_type(extractor)} features ({exc})") from None
    return book


def check_training_size(n_descriptors: int, k: int, option: str = "--codebook-size") -> None:
    """Refuse to train K words from fewer than K × :data:`MIN_DESCRIPTORS_PER_WORD` descriptors (ValueError
    suggesting a smaller ``option``)."""
    need = int(k) * MIN_DESCRIPTORS_PER_WORD
    if n_descriptors < need:
        raise ValueError(
            f"{n_descriptors} training descriptors are too few for K={k} words (need at least {need}, "
            f"{MIN_DESCRIPTORS_PER_WORD} per word); add more images, or pass a smaller {option} "
            f"(at most {max(1, n_descriptors // MIN_DESCRIPTORS_PER_WORD)})")
