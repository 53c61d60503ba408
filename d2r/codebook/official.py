"""Import the released official Detect-to-Retrieve codebooks (TensorFlow checkpoints) into the d2r format.

The official codebooks (e.g. ``k65536_codebook_tfckpt/codebook``) are TF checkpoints holding one float32
(K, D) variable named ``clusters`` (TF1 name-based layout: key ``clusters``, possibly under a scope); the
official TF2 loader restores it through ``tf.train.Checkpoint(codebook=...)``, whose object-based key is
``codebook/.ATTRIBUTES/VARIABLE_VALUE``. Both layouts are recognised. TensorFlow is imported only here.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from d2r._version import __version__
from d2r.codebook.codebook import Codebook

log = logging.getLogger(__name__)

OBJECT_KEY = "codebook/.ATTRIBUTES/VARIABLE_VALUE"


def _checkpoint_exists(path: Path) -> bool:
    if path.is_dir():
        return (path / "checkpoint").is_file() or any(path.glob("*.index"))
    return Path(str(path) + ".index").is_file() or path.is_file()


def find_clusters_variable(names) -> str:
    """The checkpoint key of the codebook among ``names``: the one whose last component is ``clusters`` (or,
    failing that, the object-based ``codebook/...`` key). Raises ValueError when there is none or several."""
    names = sorted(names)
    hits = [n for n in names if n.split("/")[-1] == "clusters" and "OPTIMIZER_SLOT" not in n]
    if not hits:
        hits = [n for n in names if n == OBJECT_KEY]
    if len(hits) != 1:
        what = "no variable named 'clusters'" if not hits else f"several candidates {hits}"
        raise ValueError(f"{what} in the checkpoint (variables: {names}); pass the key explicitly")
    return hits[0]


def read_official_codebook(checkpoint, variable: str | None = None) -> tuple[np.ndarray, str]:
    """Read the (K, D) float32 cluster centres from a TF checkpoint prefix (or a folder holding one).

    Returns ``(centroids, variable key)``. Raises FileNotFoundError when nothing is there, ValueError for an
    unreadable checkpoint, a missing/ambiguous variable or a non-2-D / non-float tensor.
    """
    path = Path(checkpoint)
    if not _checkpoint_exists(path):
        raise FileNotFoundError(f"{path}: no TensorFlow checkpoint here (expected {path}.index or a folder "
                                "with a 'checkpoint' file)")
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(path))
        shapes = reader.get_variable_to_shape_map()
    except (tf.errors.OpError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the TensorFlow checkpoint ({exc})") from None
    key = variable if variable is not None else find_clusters_variable(shapes)
    if key not in shapes:
        raise ValueError(f"{path}: no variable {key!r} (variables: {sorted(shapes)})")
    value = np.asarray(reader.get_tensor(key))
    if value.ndim != 2 or not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"{path}: variable {key!r} has shape {value.shape} dtype {value.dtype}, expected a "
                         "2-D float (K, D) codebook")
    return np.ascontiguousarray(value, dtype=np.float32), key


def import_official_codebook(checkpoint, *, variable: str | None = None, feature: str = "delf",
                             dim: int | None = None, k: int | None = None,
                             metadata: dict | None = None) -> Codebook:
    """Build a :class:`Codebook` from an official TF checkpoint, with provenance metadata (source, variable,
    feature, tool version, created). ``dim`` / ``k``, when given, are checked (ValueError on mismatch)."""
    centroids, key = read_official_codebook(checkpoint, variable)
    if dim is not None and centroids.shape[1] != int(dim):
        raise ValueError(f"{checkpoint}: codebook has D={centroids.shape[1]}, expected D={dim}")
    if k is not None and centroids.shape[0] != int(k):
        raise ValueError(f"{checkpoint}: codebook has K={centroids.shape[0]}, expected K={k}")
    meta = {
        "feature": feature,
        "source": "official TensorFlow checkpoint",
        "training_source": str(checkpoint),
        "checkpoint_variable": key,
        "tool": "d2r.codebook.official.import_official_codebook",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if metadata:
        meta.update(metadata)
    book = Codebook(centroids, meta)
    log.info("imported %s from %s:%s", book, checkpoint, key)
    return book
