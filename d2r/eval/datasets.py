"""Dataset layouts of the benchmark protocols: revisitop image names and boxes, GLDv2 paths and id lists."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


# ---- paths and queries ---------------------------------------------------------------------------------------
def resolve_image(root, name: str) -> Path:
    """The file of image ``name`` under ``root``: ``root/name`` if it exists (names relative to the folder, as in
    our dev data), else ``root/name`` + .jpg/.png/.jpeg (revisitop ``imlist`` names carry no extension).
    FileNotFoundError names the image and the paths tried."""
    root = Path(root)
    base = root / name
    if base.is_file():
        return base
    tried = [base]
    for suffix in IMAGE_SUFFIXES:
        p = root / (name + suffix)
        if p.is_file():
            return p
        tried.append(p)
    shown = ", ".join(str(t) for t in tried[:3])
    raise FileNotFoundError(f"image {name!r} not found under {root} (tried {shown}, ...)")


def gldv2_path(root, image_id: str) -> Path:
    """GLDv2 layout ``root/a/b/c/<id>.jpg`` (first three characters of the id), else ``root/<id>.jpg``."""
    root = Path(root)
    nested = root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg" if len(image_id) >= 3 else None
    if nested is not None and nested.is_file():
        return nested
    return resolve_image(root, image_id)


def query_box(bbx):
    """revisitop query crop: the box [x1, y1, x2, y2] rounded to whole pixels (as the official query extraction
    does before ``PIL.Image.crop``), or None for the whole image."""
    if bbx is None:
        return None
    b = np.asarray(bbx, dtype=np.float64).reshape(-1)
    if b.size == 0:
        return None
    if b.size != 4 or not np.all(np.isfinite(b)):
        raise ValueError(f"bbx must be four finite numbers x1, y1, x2, y2, got {bbx!r}")
    return tuple(int(round(v)) for v in b)


# ---- GLDv2 ---------------------------------------------------------------------------------------------------
def read_ids(path) -> list[str]:
    """The ``id`` column of a GLDv2 ``index.csv`` / ``test.csv`` (the first column when there is no ``id``)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:  # the file named, not only the reason
        raise ValueError(f"{path}: cannot read the CSV ({getattr(exc, 'strerror', None) or exc})") from None
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header = rows[0]
    col = header.index("id") if "id" in header else 0
    ids = [r[col] for r in rows[1:] if r and r[col]]
    if not ids:
        raise ValueError(f"{path}: no image ids")
    return ids
