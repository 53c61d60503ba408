"""Sharded on-disk feature store: many images' local features in a few large, immutable, checksummed shards.

Layout of a store folder::
    manifest.json                  the only commit point: format, version, generation, extractor {name,
                                   config, fingerprint}, dim, shards [{name, num_images, num_features,
                                   bytes, files {key: {size, digest}}, skip}], retired, failures {id: reason}
    failures.json                  a readable copy of the manifest's failures
    .lock                          held (fcntl) by the one writer; readers never take it
    shard-<hex>.ids.npy            (n,) str image ids
    shard-<hex>.kinds.npy          (n,) uint8: 0 = LocalFeatures, 1 = RegionFeatures
    shard-<hex>.offsets.npy        (n+1,) int64 feature offsets into the ragged arrays
    shard-<hex>.locations.npy      (F, 2) float32 (x, y) original pixels
    shard-<hex>.scales.npy         (F,) float32
    shard-<hex>.scores.npy         (F,) float32
    shard-<hex>.descriptors.npy    (F, D) float32
    shard-<hex>.region_offsets.npy (n+1,) int64 region offsets (images without regions own none)
    shard-<hex>.counts.npy         (R,) int64 features per region
    shard-<hex>.boxes.npy          (R, 4) float32 [x1, y1, x2, y2]
    shard-<hex>.box_ids.npy        (R,) int64 (-1 = whole image)
    shard-<hex>.box_scores.npy     (R,) float32

Writing: one writer per store (an OS lock on ``.lock``, taken by ``create`` / ``open(mode="a")`` before
anything else). Images are buffered and written as a shard once ``shard_bytes`` (default 256 MiB) are
buffered, or at an explicit ``flush``; every file is written atomically under a unique name, then the manifest
is rewritten (the commit). Small shards are merged into large ones by a tiered compaction that runs after a
commit when ``COMPACT_AT`` shards of similar size accumulate: the merged shard is written and committed before
the old ones are retired; retired files are deleted one generation and ``RETIRE_GRACE_SECONDS`` later (so a
reader of an older generation keeps working; one whose shards are gone moves to the newest generation, never
reading an image twice), and shard files no manifest lists are deleted only once they are older than
``GC_GRACE_SECONDS`` (a distributed run's :class:`ShardWriter` may still be writing or about to commit them).

Reading never locks: ``open`` reads one manifest generation, checks every file's size and every shard's ids,
and each shard is validated (dtypes, shapes, offsets) when first used, so a damaged file raises
:class:`StoreDamagedError` naming it instead of reaching a kernel. ``check()`` verifies every BLAKE2 digest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2r._io import atomic_path, file_digest, write_json
from d2r._lock import WriterLock
from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.features.config import extractor_info
from d2r.features.image import list_images

log = logging.getLogger(__name__)

FORMAT = "d2r-feature-store"
VERSION = 2
MANIFEST = "manifest.json"
FAILURES = "failures.json"
MiB = 1 << 20
DEFAULT_SHARD_BYTES = 256 * MiB
FLUSH_SECONDS = 60.0  # buffered features are committed at least this often (a killed run keeps the rest)
COMPACT_AT = 8  # this many small shards of one size tier are merged into one
RETIRE_GRACE_SECONDS = 60.0  # shards retired by a compaction stay readable this long (and one generation)
GC_GRACE_SECONDS = 6 * 3600  # uncommitted shard files younger than this may belong to a live ShardWriter
CACHE_SHARDS = 256  # shards whose headers and small arrays are cached per store (no files held open)
# key: (dtype or "U" for str, ndim, length) with lengths n = images, F = features, R = regions
_SPEC = {
    "ids": ("U", 1, "n"),
    "kinds": (np.uint8, 1, "n"),
    "offsets": (np.int64, 1, "n+1"),
    "locations": (np.float32, 2, "F"),
    "scales": (np.float32, 1, "F"),
    "scores": (np.float32, 1, "F"),
    "descriptors": (np.float32, 2, "F"),
    "region_offsets": (np.int64, 1, "n+1"),
    "counts": (np.int64, 1, "R"),
    "boxes": (np.float32, 2, "R"),
    "box_ids": (np.int64, 1, "R"),
    "box_scores": (np.float32, 1, "R"),
}
_ARRAYS = tuple(_SPEC)
_NAME = re.compile(r"^shard-[A-Za-z0-9_-]{1,128}$")
_FILE = re.compile(r"^(shard-[A-Za-z0-9_-]{1,128})\.([a-z_]+)\.npy$")


class StoreDamagedError(ValueError):
    """A store file is missing, truncated, altered or inconsistent with the manifest (named in the error)."""

class Shard:
    """One shard's validated arrays: the per-image and per-region ones in memory, the per-feature ones
    (locations, scales, scores, descriptors) read from the file by rows; ``shard[i]`` → the i-th image's
    features (new arrays)."""
    def __init__(self, name: str, arrays: dict):
        self.name = name
        for key in _ARRAYS:
            setattr(self, key, arrays[key])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> LocalFeatures | RegionFeatures:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        feats = LocalFeatures(
            np.array(self.locations[a:b], dtype=np.float32),
            np.array(self.scales[a:b], dtype=np.float32),
            np.array(self.scores[a:b], dtype=np.float32),
            np.array(self.descriptors[a:b], dtype=np.float32),
        )
        if int(self.kinds[i]) == 0:
            return feats
        ra, rb = int(self.region_offsets[i]), int(self.region_offsets[i + 1])
        return RegionFeatures(
            feats,
            np.array(self.counts[ra:rb], dtype=np.int64),
            np.array(self.boxes[ra:rb], dtype=np.float32),
            np.array(self.box_ids[ra:rb], dtype=np.int64),
            np.array(self.box_scores[ra:rb], dtype=np.float32),
        )


# ---------------------------------------------------------------------------------------------- low level
class _HashingFile:
    """File wrapper that BLAKE2-hashes and counts what ``np.save`` writes through it."""
    def __init__(self, f):
        import hashlib

        self.f = f
        self.h = hashlib.blake2b(digest_size=16)
        self.size = 0

    def write(self, data):
        view = memoryview(data)
        self.f.write(view)
        self.h.update(view)
        self.size += view.nbytes
        return view.nbytes


def _save_array(path: Path, array: np.ndarray) -> dict:
    """Write ``array`` as .npy atomically; return ``{"size", "digest"}`` (the digest of ``file_digest``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            hf = _HashingFile(f)
            np.save(hf, np.ascontiguousarray(array), allow_pickle=False)
    return {"size": hf.size, "digest": hf.h.hexdigest()}


def _file(folder: Path, name: str, key: str) -> Path:
    return folder / f"{name}.{key}.npy"


def _write_shard(folder: Path, name: str, arrays: dict) -> dict:
    """Write one shard's files; on failure remove what was written. Returns the manifest record."""
    files = {}
    try:
        for key in _ARRAYS:
            files[key] = _save_array(_file(folder, name, key), arrays[key])
    except BaseException:
        _remove_shard_files(folder, name)
        raise
    return {
        "name": name,
        "num_images": int(arrays["ids"].shape[0]),
        "num_features": int(arrays["offsets"][-1]),
        "bytes": int(sum(f["size"] for f in files.values())),
        "files": files,
        "skip": [],
    }


def _remove_shard_files(folder: Path, name: str) -> None:
    for key in _ARRAYS:
        try:
            _file(folder, name, key).unlink()
        except FileNotFoundError:
            pass


def _feature_bytes(features) -> int:
    """Bytes an image takes in a shard (close enough for rolling over by size)."""
    local = features.features if isinstance(features, RegionFeatures) else features
    n_reg = features.num_regions if isinstance(features, RegionFeatures) else 0
    return len(local) * (4 * local.dim + 16) + n_reg * 36 + 100


def _check_record(rec, where: str) -> None:
    """Validate a shard record read from a manifest or a ShardWriter result (untrusted JSON)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not _NAME.match(rec["name"]):
        raise StoreDamagedError(f"{where}: bad shard record {str(rec)[:80]!r}")
    for key in ("num_images", "num_features"):
        if not isinstance(rec.get(key), int) or rec[key] < 0:
            raise StoreDamagedError(f"{where}: shard {rec['name']}: bad {key} {rec.get(key)!r}")
    files = rec.get("files")
    if files is not None:
        if (
            not isinstance(files, dict)
            or set(files) != set(_ARRAYS)
            or not all(
                isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("digest"), str)
                for f in files.values()
            )
        ):
            raise StoreDamagedError(f"{where}: shard {rec['name']}: bad file records")
    skip = rec.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(s, int) and 0 <= s < rec["num_images"] for s in skip):
        raise StoreDamagedError(f"{where}: shard {rec['name']}: bad skip list")


def _check_sizes(folder: Path, rec: dict) -> None:
    """Every file of a shard exists and has the size the manifest records (cheap: one stat per file)."""
    for key in _ARRAYS:
        path = _file(folder, rec["name"], key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StoreDamagedError(f"{path}: missing (listed in the store manifest)") from None
        want = (rec.get("files") or {}).get(key, {}).get("size")
        if want is not None and size != want:
            raise StoreDamagedError(
                f"{path}: {size} bytes, the manifest records {want} (truncated or altered)"
            )


_ROWS = ("locations", "scales", "scores", "descriptors")  # the big per-feature arrays: read by rows on demand


class _RowFile:
    """The data of a validated .npy file, read by rows on demand (``rows[a:b]`` → a new array); holds no file
    open, so any number of shards can be cached and any number of threads can read."""
    def __init__(self, path: Path, offset: int, dtype: np.dtype, shape: tuple):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape
        self.ndim = len(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        n = max(0, b - a)
        out = np.empty((n,) + self.shape[1:], self.dtype)
        if n and self.row_bytes:
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(self.offset + a * self.row_bytes)
                    got = fh.readinto(memoryview(out).cast("B"))
            except FileNotFoundError:
                raise StoreDamagedError(f"{self.path}: missing (listed in the store manifest)") from None
            if got != n * self.row_bytes:
                raise StoreDamagedError(f"{self.path}: truncated (read {got} of {n * self.row_bytes} bytes)")
        return out

    def __array__(self, dtype=None, copy=None):
        return self[0 : self.shape[0]] if dtype is None else self[0 : self.shape[0]].astype(dtype)


def _load_array(path: Path, key: str, mmap: bool = True):
    """Parse and check a .npy header (dtype, dimensions, file size) before reading any data; small arrays are
    read whole, the per-feature ones (``_ROWS``) come back as a :class:`_RowFile` unless ``mmap=False``."""
    dtype, ndim, _ = _SPEC[key]
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            try:
                version = fmt.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dt = fmt.read_array_header_1_0(fh)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dt = fmt.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"unknown .npy version {version}")
            except Exception as exc:  # a torn or altered header: numpy raises many kinds
                raise StoreDamagedError(
                    f"{path}: not a readable .npy file ({type(exc).__name__}: {exc})"
                ) from None
            ok = dt.kind == "U" and dt.byteorder in ("=", "<", "|") if dtype == "U" else dt == np.dtype(dtype)
            if not ok:
                raise StoreDamagedError(
                    f"{path}: dtype {dt}, expected {'str' if dtype == 'U' else np.dtype(dtype)}"
                )
            if len(shape) != ndim or fortran:
                raise StoreDamagedError(
                    f"{path}: {len(shape)}-D array of shape {shape}, expected {ndim}-D C order"
                )
            offset = fh.tell()
            count = int(np.prod([int(x) for x in shape], dtype=object))
            size = os.fstat(fh.fileno()).st_size
            if size != offset + count * dt.itemsize:
                raise StoreDamagedError(
                    f"{path}: {size} bytes, its header needs {offset + count * dt.itemsize} "
                    f"(truncated or altered)"
                )
            if key in _ROWS and mmap:
                return _RowFile(path, offset, dt, tuple(shape))
            data = np.fromfile(fh, dtype=dt, count=count)
    except FileNotFoundError:
        raise StoreDamagedError(f"{path}: missing (listed in the store manifest)") from None
    if data.size != count:
        raise StoreDamagedError(f"{path}: truncated")
    return data.reshape(shape)


def _load_ids(folder: Path, rec: dict) -> list[str]:
    path = _file(folder, rec["name"], "ids")
    ids = _load_array(path, "ids", mmap=False)
    if ids.shape[0] != rec["num_images"]:
        raise StoreDamagedError(f"{path}: {ids.shape[0]} ids, the manifest records {rec['num_images']}")
    return _id_list(ids, path)


def _id_list(ids: np.ndarray, path: Path) -> list[str]:
    try:
        out = ids.tolist()
        for i in out:
            i.encode("utf-8")
    except (ValueError, UnicodeError) as exc:
        raise StoreDamagedError(f"{path}: image ids are not valid text ({exc})") from None
    return out


def _load_shard(folder: Path, rec: dict, dim: int) -> Shard:
    """Load and validate one shard (headers, sizes, offsets; no feature data read); StoreDamagedError naming
    the first bad file."""
    _check_sizes(folder, rec)
    name = rec["name"]
    a = {key: _load_array(_file(folder, name, key), key) for key in _ARRAYS}
    path = lambda key: _file(folder, name, key)  # noqa: E731
    n, n_feat = rec["num_images"], rec["num_features"]
    n_reg = a["counts"].shape[0]
    want = {
        "ids": (n,),
        "kinds": (n,),
        "offsets": (n + 1,),
        "locations": (n_feat, 2),
        "scales": (n_feat,),
        "scores": (n_feat,),
        "descriptors": (n_feat, dim),
        "region_offsets": (n + 1,),
        "counts": (n_reg,),
        "boxes": (n_reg, 4),
        "box_ids": (n_reg,),
        "box_scores": (n_reg,),
    }
    for key, shape in want.items():
        if a[key].shape != shape:
            raise StoreDamagedError(f"{path(key)}: shape {a[key].shape}, expected {shape}")
    for key, end in (("offsets", n_feat), ("region_offsets", n_reg)):
        off = np.asarray(a[key])
        if off[0] != 0 or off[-1] != end or (n and np.any(np.diff(off) < 0)):
            raise StoreDamagedError(f"{path(key)}: offsets not monotone from 0 to {end}")
    kinds = np.asarray(a["kinds"])
    if np.any(kinds > 1):
        raise StoreDamagedError(f"{path('kinds')}: kinds must be 0 or 1")
    roff = np.asarray(a["region_offsets"])
    nreg_img = np.diff(roff)
    if np.any(nreg_img[kinds == 0] != 0) or np.any(nreg_img[kinds == 1] < 1):
        raise StoreDamagedError(f"{path('region_offsets')}: region counts disagree with kinds")
    counts = np.asarray(a["counts"])
    if np.any(counts < 0):
        raise StoreDamagedError(f"{path('counts')}: negative region counts")
    _id_list(a["ids"], path("ids"))
    csum = np.concatenate([[0], np.cumsum(counts)])
    per_image = csum[roff[1:]] - csum[roff[:-1]]
    nfeat_img = np.diff(np.asarray(a["offsets"]))
    if np.any(per_image[kinds == 1] != nfeat_img[kinds == 1]):
        raise StoreDamagedError(f"{path('counts')}: region counts do not add up to the images' features")
    return Shard(name, a)


def _stamp(path: Path):
    """Changes whenever a new manifest is committed (each is a new file renamed into place)."""
    try:
        st = (path / MANIFEST).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.exists():
        raise FileNotFoundError(f"{path}: not a feature store (no {MANIFEST})")
    try:
        m = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreDamagedError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreDamagedError(
            f"{mpath}: format {m.get('format') if isinstance(m, dict) else m!r} is not {FORMAT!r}"
        )
    if not isinstance(m.get("version"), int) or m["version"] > VERSION:
        raise StoreDamagedError(
            f"{mpath}: version {m.get('version')!r} is not one this d2r reads (<= {VERSION})"
        )
    if (
        not isinstance(m.get("dim"), int)
        or m["dim"] < 1
        or not isinstance(m.get("shards"), list)
        or not isinstance(m.get("extractor"), dict)
        or "fingerprint" not in m["extractor"]
    ):
        raise StoreDamagedError(f"{mpath}: missing or bad dim / shards / extractor")
    names = set()
    for rec in m["shards"]:
        _check_record(rec, str(mpath))
        if rec["name"] in names:
            raise StoreDamagedError(f"{mpath}: shard {rec['name']} listed twice")
        names.add(rec["name"])
    m.setdefault("generation", 0)
    m.setdefault("retired", [])
    if "failures" not in m:  # version 1 kept them beside the manifest only
        fpath = path / FAILURES
        m["failures"] = json.loads(fpath.read_text()) if fpath.exists() else {}
    if not isinstance(m["failures"], dict):
        raise StoreDamagedError(f"{mpath}: bad failures")
    return m


class _View:
    """One manifest generation as seen by this process: ``records`` (live shards, store order), ``by_name``
    (live shards and those retired by the previous generation, still readable) and ``index`` image id ->
    (shard name, row)."""
    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.manifest = manifest
        self.records = list(manifest["shards"])
        self.by_name = {r["name"]: r for r in self.records}
        self.index: dict[str, tuple[str, int]] = {}
        for rec in self.records:
            self._add(rec)

    def _add(self, rec: dict) -> None:
        _check_sizes(self.folder, rec)
        skip = set(rec.get("skip", []))
        name = rec["name"]
        for row, image_id in enumerate(_load_ids(self.folder, rec)):
            if row in skip:
                continue
            if image_id in self.index:
                raise StoreDamagedError(
                    f"{_file(self.folder, name, 'ids')}: image {image_id!r} is already in "
                    f"shard {self.index[image_id][0]} (the manifest does not mask it)"
                )
            self.index[image_id] = (name, row)

    def apply(self, manifest: dict, doomed: list[str]) -> None:
        """Writer side: move to the next generation in place, reading only the new shards' ids."""
        new = [r for r in manifest["shards"] if r["name"] not in self.by_name]
        self.records = list(manifest["shards"])
        for rec in new:
            self.by_name[rec["name"]] = rec
            skip = set(rec.get("skip", []))
            for row, image_id in enumerate(_load_ids(self.folder, rec)):
                if row not in skip:
                    self.index[image_id] = (rec["name"], row)
        for name in doomed:
            self.by_name.pop(name, None)
        self.manifest = manifest

    def position(self) -> dict[str, int]:
        return {r["name"]: k for k, r in enumerate(self.records)}


class _Buffer:
    """Images waiting to be written as a shard."""
    def __init__(self):
        self.items: dict[str, LocalFeatures | RegionFeatures] = {}
        self.bytes = 0

    def add(self, image_id, features):
        self.items[image_id] = features
        self.bytes += _feature_bytes(features)

    def take(self) -> list:
        return list(self.items.items())

    def drop(self, items: list) -> None:
        for image_id, f in items:
            if self.items.pop(image_id, None) is not None:
                self.bytes -= _feature_bytes(f)


def _check_features(image_id, features, dim: int) -> None:
    if not isinstance(features, (LocalFeatures, RegionFeatures)):
        raise ValueError(
            f"{image_id}: expected LocalFeatures or RegionFeatures, got {type(features).__name__}"
        )
    local = features.features if isinstance(features, RegionFeatures) else features
    if local.dim != dim:
        raise ValueError(f"{image_id}: expected D={dim}, got {local.dim}")


# ---------------------------------------------------------------------------------------------- ShardWriter
class ShardWriter:
    """Write shards into an existing store folder without its writer lock and without touching its manifest
    (a distributed extraction worker). Hand ``close()``'s result to the store's writer, which calls
    :meth:`FeatureStore.commit`; shards never committed are ignored by readers and garbage-collected.

    ``add(image_id, features)`` buffers and writes a shard every ``shard_bytes``; ``add_failure(image_id,
    reason)`` records a failure; ``close()`` writes the rest and returns ``{"shards": [manifest records],
    "failures": {id: reason}}`` (plain JSON types).
    """
    def __init__(self, store_path, dim: int, shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = ""):
        self.path = Path(store_path)
        if not (self.path / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.path}: not a feature store (no {MANIFEST}); create it first")
        self.dim = int(dim)
        have = _read_manifest(self.path)["dim"]
        if have != self.dim:
            raise ValueError(f"{self.path}: the store holds D={have} features, not D={self.dim}")
        if not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        if not re.match(r"^[A-Za-z0-9_-]{0,32}$", str(prefix)):
            raise ValueError(f"prefix must be at most 32 of [A-Za-z0-9_-], got {prefix!r}")
        self.shard_bytes = int(shard_bytes)
        self.prefix = str(prefix)
        self.records: list[dict] = []
        self.failures: dict[str, str] = {}
        self._buffer = _Buffer()
        self._ids: set[str] = set()
        self._closed = False

    def new_name(self) -> str:
        return f"shard-{self.prefix}{uuid.uuid4().hex}"

    def add(self, image_id, features) -> None:
        if self._closed:
            raise ValueError("ShardWriter is closed")
        image_id = str(image_id)
        _check_features(image_id, features, self.dim)
        if image_id in self._ids:
            raise ValueError(f"{image_id}: added twice to this ShardWriter")
        self._ids.add(image_id)
        self.failures.pop(image_id, None)
        self._buffer.add(image_id, features)
        if self._buffer.bytes >= self.shard_bytes:
            self.write()

    def add_failure(self, image_id, reason) -> None:
        if str(image_id) not in self._ids:
            self.failures[str(image_id)] = str(reason)

    def write(self) -> dict | None:
        """Write the buffered images as one shard now; returns its record (None when nothing is buffered).
        On failure the buffer is kept and no file of the shard is left behind."""
        items = self._buffer.take()
        if not items:
            return None
        rec = _write_shard(self.path, self.new_name(), _pack(items, self.dim))
        self._buffer.drop(items)
        self.records.append(rec)
        return rec

    def _write_items(self, items) -> dict:
        return _write_shard(self.path, self.new_name(), _pack(items, self.dim))

    def get(self, image_id):
        return self._buffer.items.get(image_id)

    def close(self) -> dict:
        """Write what is buffered; return ``{"shards": [...], "failures": {...}}`` to commit."""
        if not self._closed:
            self.write()
            self._closed = True
        return {"shards": json.loads(json.dumps(self.records)), "failures": dict(self.failures)}


# ---------------------------------------------------------------------------------------------- FeatureStore
class FeatureStore:
    """A feature store folder. ``create`` / ``open`` it; ``add`` buffers and writes a shard every
    ``shard_bytes``, or once ``flush_seconds`` passed since the last commit; ``flush`` writes and commits
    what is buffered; ``close`` (or leaving a ``with`` block) flushes, collects garbage and releases the
    writer lock.

    Reading (lock-free, any number of threads): ``len(store)``, ``store.ids()``, ``image_id in store``,
    ``store.get(image_id)``, ``store.get_many(ids)``, ``for image_id, feats in store`` (streams shard by
    shard), ``store.load_shard(i)``; ``store.check()`` verifies every checksum.
    """
    def __init__(
        self,
        path,
        manifest: dict,
        writable: bool,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        shard_size: int | None = None,
        lock: WriterLock | None = None,
    ):
        self.path = Path(path)
        if not isinstance(shard_bytes, (int, np.integer)) or shard_bytes < 1:
            raise ValueError(f"shard_bytes must be a positive integer, got {shard_bytes!r}")
        if shard_size is not None and (not isinstance(shard_size, (int, np.integer)) or shard_size < 1):
            raise ValueError(f"shard_size must be a positive integer or None, got {shard_size!r}")
        self.writable = writable
        self.shard_bytes = int(shard_bytes)
        self.shard_size = None if shard_size is None else int(shard_size)
        self.flush_seconds = FLUSH_SECONDS
        self._flushed_at = time.monotonic()
        self._writer_lock = lock
        self._lock = threading.RLock()  # writers' state (buffer, manifest); readers never take it
        self._fill_lock = threading.Lock()  # only around loading a shard into the cache
        self._cache: OrderedDict[str, Shard] = OrderedDict()
        self._view = _View(self.path, manifest)
        self._stamp = None
        self._writer = ShardWriter.__new__(ShardWriter)  # the same machinery as a distributed worker
        if writable:
            self._writer.__init__(self.path, manifest["dim"], self.shard_bytes)
            self._pending_failures: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ open/create
    @classmethod
    def create(
        cls,
        path,
        extractor_info: dict,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        exist_ok: bool = True,
        lock_timeout: float | None = 0.0,
        shard_size: int | None = None,
    ) -> "FeatureStore":
        """Create a store for features of the extractor described by ``extractor_info`` ({name, config,
        fingerprint, dim}) and open it for writing (taking the writer lock, waiting up to ``lock_timeout``
        seconds). An existing store is reopened for appending if ``exist_ok`` and its extractor fingerprint
        and dim match; otherwise ValueError (features of different extractors never mix)."""
        path = Path(path)
        for key in ("name", "fingerprint", "dim"):
            if key not in extractor_info:
                raise ValueError(f"extractor_info needs {key!r}, got keys {sorted(extractor_info)}")
        if (path / MANIFEST).exists() and not exist_ok:
            raise FileExistsError(f"{path}: a feature store already exists")
        if (
            not (path / MANIFEST).exists()
            and path.exists()
            and any(p.name != ".lock" for p in path.iterdir())
        ):
            raise FileExistsError(f"{path}: folder exists, is not empty and holds no feature store")
        path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path, timeout=lock_timeout, what="feature store").acquire()
        try:
            if (path / MANIFEST).exists():  # also when another creator won the race for the lock
                store = cls._open_locked(path, lock, shard_bytes, shard_size)
                have = store.manifest["extractor"]
                same = have["fingerprint"] == extractor_info["fingerprint"]
                if not same or int(store.dim) != int(extractor_info["dim"]):
                    store.close()
                    raise ValueError(
                        f"{path}: store holds {have.get('name')} features "
                        f"(fingerprint {have['fingerprint']}, D={store.dim}), not {extractor_info['name']} "
                        f"(fingerprint {extractor_info['fingerprint']}, D={extractor_info['dim']})"
                    )
                return store
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "generation": 0,
                "extractor": {
                    "name": extractor_info["name"],
                    "config": extractor_info.get("config", {}),
                    "fingerprint": extractor_info["fingerprint"],
                },
                "dim": int(extractor_info["dim"]),
                "num_images": 0,
                "num_features": 0,
                "shards": [],
                "retired": [],
                "failures": {},
            }
            write_json(path / MANIFEST, manifest)
            return cls(
                path, manifest, writable=True, shard_bytes=shard_bytes, shard_size=shard_size, lock=lock
            )
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(
        cls,
        path,
        mode: str = "r",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        lock_timeout: float | None = 0.0,
        shard_size: int | None = None,
    ) -> "FeatureStore":
        """Open an existing store for reading (``"r"``, no lock) or appending (``"a"``: takes the writer lock,
        waiting up to ``lock_timeout`` seconds, None = forever)."""
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        if not (path / MANIFEST).exists():
            raise FileNotFoundError(f"{path}: not a feature store (no {MANIFEST})")
        if mode == "r":
            stamp = _stamp(path)  # taken before reading: a commit in between shows as a change later
            store = cls(path, _read_manifest(path), writable=False, shard_bytes=shard_bytes,
                        shard_size=shard_size)
            store._stamp = stamp
            return store
        lock = WriterLock(path, timeout=lock_timeout, what="feature store").acquire()
        try:
            return cls._open_locked(path, lock, shard_bytes, shard_size)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open_locked(cls, path, lock, shard_bytes, shard_size) -> "FeatureStore":
        manifest = _read_manifest(path)
        store = cls(path, manifest, writable=True, shard_bytes=shard_bytes, shard_size=shard_size, lock=lock)
        if manifest["version"] < VERSION or any("files" not in r for r in manifest["shards"]):
            store._upgrade()
        store.gc()
        return store

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def manifest(self) -> dict:
        return self._view.manifest

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def extractor(self) -> dict:
        return dict(self.manifest["extractor"])

    @property
    def failures(self) -> dict:
        if self.writable:
            return {**self.manifest["failures"], **self._pending_failures}
        return dict(self.manifest["failures"])

    @property
    def num_shards(self) -> int:
        return len(self._view.records)

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    def __len__(self) -> int:
        return len(self._view.index) + (len(self._writer._buffer.items) if self.writable else 0)

    def __contains__(self, image_id) -> bool:
        return image_id in self._view.index or (self.writable and image_id in self._writer._buffer.items)

    def ids(self) -> list[str]:
        """All stored image ids in store order (committed shards, then the unflushed buffer)."""
        view = self._view
        pos = view.position()
        out = sorted(view.index, key=lambda i: (pos[view.index[i][0]], view.index[i][1]))
        return out + (list(self._writer._buffer.items) if self.writable else [])

    def info(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path),
            "images": len(self),
            "shards": self.num_shards,
            "features": int(m["num_features"]),
            "generation": self.generation,
            "bytes": int(sum(r.get("bytes", 0) for r in m["shards"])),
            "failures": len(m["failures"]),
            "extractor": self.extractor,
            "dim": self.dim,
        }

    # ------------------------------------------------------------------------------------------ writing
    def _need_writable(self):
        if not self.writable:
            raise ValueError(f"{self.path}: store opened read-only")
        if self._writer_lock is None or not self._writer_lock.held:
            raise ValueError(f"{self.path}: store was closed")

    def add(self, image_id: str, features: LocalFeatures | RegionFeatures) -> None:
        """Buffer one image's features; writes and commits a shard once ``shard_bytes`` are buffered."""
        self._need_writable()
        image_id = str(image_id)
        _check_features(image_id, features, self.dim)
        with self._lock:
            if image_id in self:
                raise ValueError(f"{image_id}: already in the store {self.path}")
            self._writer._buffer.add(image_id, features)
            self._pending_failures.pop(image_id, None)
            buf = self._writer._buffer
            full = buf.bytes >= self.shard_bytes or (
                self.shard_size is not None and len(buf.items) >= self.shard_size
            ) or time.monotonic() - self._flushed_at >= self.flush_seconds  # a SIGKILL lost up to 256 MiB
        if full:
            self.flush()

    def add_failure(self, image_id: str, reason: str) -> None:
        """Record that ``image_id`` could not be extracted (committed at the next flush)."""
        self._need_writable()
        with self._lock:
            self._pending_failures[str(image_id)] = str(reason)

    def flush(self) -> None:
        """Write the buffered images as a new shard and commit it with the pending failures. A failed write
        leaves the buffer and the committed store as they were."""
        if not self.writable or self._writer_lock is None or not self._writer_lock.held:
            return
        with self._lock:
            items = self._writer._buffer.take()
            failures = dict(self._pending_failures)
            if not items and not failures:
                return
            rec = self._writer._write_items(items) if items else None
            try:
                self._commit([{"shards": [rec] if rec else [], "failures": failures}], verify=False)
            except BaseException:
                if rec is not None:
                    _remove_shard_files(self.path, rec["name"])
                raise
            self._writer._buffer.drop(items)
            for k in failures:
                self._pending_failures.pop(k, None)
            self._flushed_at = time.monotonic()
        self._maybe_compact()

    def commit(self, results: list[dict]) -> dict:
        """Commit shards written by :class:`ShardWriter` s (their ``close()`` results) into this store,
        atomically.

        Each shard file's size and digest are verified and each shard is validated before the commit; a shard
        already committed (same name) is skipped, so a retried commit is harmless; an image id already in the
        store
        (or earlier in ``results``) keeps its first copy, later ones are masked. Failures of ids that are not
        stored are recorded. Returns ``{"shards", "images", "duplicates", "failures"}`` counts of what was
        added.
        """
        self._need_writable()
        if not isinstance(results, (list, tuple)) or not all(
            isinstance(r, dict)
            and isinstance(r.get("shards", []), list)
            and isinstance(r.get("failures", {}), dict)
            for r in results
        ):
            raise ValueError(
                "commit expects a list of ShardWriter.close() results ({'shards': [...], 'failures': {...}})"
            )
        with self._lock:
            out = self._commit(results, verify=True)
        self._maybe_compact()
        return out

    def remove(self, image_ids) -> int:
        """Drop images from the store: their rows are masked in a new manifest generation (readers of the
        previous one keep working) and compaction reclaims their bytes. Ids not stored are ignored; their
        failure records go too (also those not flushed yet). Returns how many stored images were removed,
        buffered ones included."""
        self._need_writable()
        wanted = list(dict.fromkeys(str(i) for i in image_ids))
        with self._lock:
            gone = set(wanted)
            buffered = [(i, f) for i, f in self._writer._buffer.take() if i in gone]
            self._writer._buffer.drop(buffered)
            for image_id in wanted:
                self._pending_failures.pop(image_id, None)
            index = self._view.index
            rows: dict[str, set] = {}
            for image_id in wanted:
                if image_id in index:
                    name, row = index[image_id]
                    rows.setdefault(name, set()).add(row)
            manifest = json.loads(json.dumps(self.manifest))
            dropped_failures = [i for i in wanted if i in manifest["failures"]]
            if not rows and not dropped_failures:
                return len(buffered)
            for rec in manifest["shards"]:
                if rec["name"] in rows:
                    rec["skip"] = sorted(set(rec.get("skip", [])) | rows[rec["name"]])
            for image_id in dropped_failures:
                del manifest["failures"][image_id]
            self._write_manifest(manifest)
            self._view.by_name.update({r["name"]: r for r in manifest["shards"]})
            removed = [i for i in wanted if i in index]
            for image_id in removed:
                del index[image_id]
        return len(removed) + len(buffered)

    def _commit(self, results, verify: bool) -> dict:
        manifest = json.loads(json.dumps(self.manifest))  # committed only once everything checks out
        have = {r["name"] for r in manifest["shards"]}
        index = self._view.index
        known: set[str] = set()  # ids added by this commit
        added = {"shards": 0, "images": 0, "duplicates": 0, "failures": 0}
        failures = {}
        for result in results:
            for rec in result.get("shards", []):
                _check_record(rec, "commit")
                if rec["name"] in have:
                    continue
                if "files" not in rec:
                    raise ValueError(f"commit: shard {rec['name']} has no file records")
                if verify:
                    _verify_digests(self.path, rec)
                    shard = _load_shard(self.path, rec, self.dim)
                    ids = _id_list(shard.ids, _file(self.path, rec["name"], "ids"))
                    del shard
                else:
                    ids = _load_ids(self.path, rec)
                rec = dict(rec)
                skip = set(rec.get("skip", []))
                for row, image_id in enumerate(ids):
                    if row not in skip and (image_id in known or image_id in index):
                        skip.add(row)
                        added["duplicates"] += 1
                    elif row not in skip:
                        known.add(image_id)
                rec["skip"] = sorted(skip)
                have.add(rec["name"])
                manifest["shards"].append(rec)
                kept = rec["num_images"] - len(skip)
                added["shards"] += 1
                added["images"] += kept
            for image_id, reason in result.get("failures", {}).items():
                failures[str(image_id)] = str(reason)
        for image_id in known:
            manifest["failures"].pop(image_id, None)
        for image_id, reason in failures.items():
            if image_id not in known and image_id not in index:
                manifest["failures"][image_id] = reason
                added["failures"] += 1
        self._write_manifest(manifest)
        return added

    def _write_manifest(self, manifest: dict, retire: list | None = None) -> None:
        """Commit a new generation; delete files retired two generations ago (the previous one stays
        readable)."""
        gen = int(manifest.get("generation", 0)) + 1
        manifest["generation"] = gen
        manifest["version"] = VERSION
        live = manifest["shards"]
        manifest["num_images"] = int(sum(r["num_images"] - len(r.get("skip", [])) for r in live))
        manifest["num_features"] = int(sum(r["num_features"] for r in live))
        old = manifest.get("retired", [])
        now = time.time()
        expired = [
            r for r in old if r["generation"] < gen - 1 and now - r.get("time", 0) >= RETIRE_GRACE_SECONDS
        ]
        doomed = {r["name"] for r in expired}
        manifest["retired"] = [r for r in old if r["name"] not in doomed]
        manifest["retired"] += [{"name": n, "generation": gen - 1, "time": now} for n in (retire or [])]
        write_json(self.path / MANIFEST, manifest)
        self._view.apply(manifest, sorted(doomed))
        try:
            write_json(self.path / FAILURES, manifest["failures"])
        except OSError as exc:
            log.warning("%s: could not write %s: %s", self.path, FAILURES, exc)
        for name in doomed:
            _remove_shard_files(self.path, name)
            self._cache.pop(name, None)

    def _upgrade(self) -> None:
        """Record sizes and digests of a version-1 store's shards (once, when first opened for writing)."""
        manifest = json.loads(json.dumps(self.manifest))
        for rec in manifest["shards"]:
            if "files" not in rec:
                _record_files(self.path, rec)
                rec.setdefault("skip", [])
        self._write_manifest(manifest)

    # ------------------------------------------------------------------------------------------ compaction
    def _maybe_compact(self) -> None:
        try:
            self.compact(full=False)
        except (OSError, StoreDamagedError) as exc:  # the data is committed; compaction can wait
            log.warning("%s: compaction skipped: %s", self.path, exc)

    def compact(self, full: bool = True) -> int:
        """Merge small shards (< shard_bytes / 2) into shards of up to ``shard_bytes``; returns how many
        merges were done. ``full=False`` (automatic, after a commit): only when ``COMPACT_AT`` small shards of
        one size
        tier (a factor of ``COMPACT_AT`` in bytes) accumulate, so each byte is rewritten O(log) times.
        Crash-safe: the merged shards are committed before the old ones are retired."""
        self._need_writable()
        merges = 0
        with self._lock:
            while True:
                group = _compaction_group(self.manifest["shards"], self.shard_bytes, full)
                if not group:
                    return merges
                self._merge(group)
                merges += 1
                if full:
                    return merges

    def _merge(self, names: list[str]) -> None:
        recs = {r["name"]: r for r in self.manifest["shards"]}
        written: list[dict] = []
        buf = _Buffer()
        try:
            for name in names:
                rec = recs[name]
                shard = _load_shard(self.path, rec, self.dim)
                skip = set(rec.get("skip", []))
                for row in range(len(shard)):
                    if row in skip:
                        continue
                    buf.add(str(shard.ids[row]), shard[row])
                    if buf.bytes >= self.shard_bytes:
                        items = buf.take()
                        written.append(
                            _write_shard(self.path, self._writer.new_name(), _pack(items, self.dim))
                        )
                        buf.drop(items)
                del shard
            if buf.items:
                written.append(_write_shard(self.path, self._writer.new_name(), _pack(buf.take(), self.dim)))
            manifest = json.loads(json.dumps(self.manifest))
            first = next(i for i, r in enumerate(manifest["shards"]) if r["name"] in names)
            rest = [r for r in manifest["shards"] if r["name"] not in names]
            before = [r for r in manifest["shards"][:first] if r["name"] not in names]
            manifest["shards"] = before + written + rest[len(before) :]
            self._write_manifest(manifest, retire=list(names))
        except BaseException:
            for rec in written:
                if rec["name"] not in {r["name"] for r in self.manifest["shards"]}:
                    _remove_shard_files(self.path, rec["name"])
            raise

    def gc(self, grace_seconds: float = GC_GRACE_SECONDS) -> list[str]:
        """Delete shard files no manifest generation needs (neither live nor retired in the previous
        generation) and older than ``grace_seconds`` (younger ones may be a ShardWriter's, about to be
        committed), and stale temporary files. Returns the deleted file names."""
        self._need_writable()
        keep = {r["name"] for r in self.manifest["shards"]} | {r["name"] for r in self.manifest["retired"]}
        now = time.time()
        removed = []
        with self._lock:
            for entry in os.scandir(self.path):
                m = _FILE.match(entry.name)
                stale_tmp = entry.name.startswith(".") and entry.name.endswith(".tmp")
                if not (m and m.group(1) not in keep) and not stale_tmp:
                    continue
                try:
                    if now - entry.stat().st_mtime >= grace_seconds:
                        os.unlink(entry.path)
                        removed.append(entry.name)
                except FileNotFoundError:
                    pass
        return removed

    def close(self) -> None:
        """Flush, collect garbage and release the writer lock (a read-only store: nothing)."""
        if not self.writable or self._writer_lock is None or not self._writer_lock.held:
            return
        try:
            self.flush()
            self.gc()
        finally:
            self._writer_lock.release()

    # ------------------------------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """Read-only stores: move to the newest committed generation."""
        if not self.writable:
            stamp = _stamp(self.path)
            self._view = _View(self.path, _read_manifest(self.path))
            self._stamp = stamp

    def _shard(self, rec: dict) -> Shard:
        name = rec["name"]
        shard = self._cache.get(name)
        if shard is not None:
            try:
                self._cache.move_to_end(name)  # least recently used goes first
            except KeyError:  # evicted meanwhile by another thread: still a valid shard
                pass
            return shard
        with self._fill_lock:  # np.load header parsing is not thread-safe on CPython 3.11
            shard = self._cache.get(name)
            if shard is None:
                shard = _load_shard(self.path, rec, self.dim)
                self._cache[name] = shard
                while len(self._cache) > CACHE_SHARDS:
                    self._cache.popitem(last=False)
        return shard

    def load_shard(self, i: int, mmap: bool = True) -> Shard:
        """Validated arrays of shard ``i`` in store order (per-feature arrays are read by rows on demand)."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range (store has {self.num_shards})")
        return self._shard(self._view.records[i])

    def _locate(self, image_id):
        """(view, record, row) of a committed image, or features still buffered, or KeyError."""
        view = self._view
        loc = view.index.get(image_id)
        if loc is None and self.writable:
            with self._lock:
                feats = self._writer._buffer.items.get(image_id)
                if feats is not None:
                    return feats
                view = self._view
                loc = view.index.get(image_id)
        if loc is None and not self.writable and self._stamp != _stamp(self.path):
            self.refresh()  # committed by a writer since this reader opened the store
            view = self._view
            loc = view.index.get(image_id)
        if loc is None:
            raise KeyError(f"{image_id!r} is not in the feature store {self.path}")
        return view.by_name[loc[0]], loc[1]

    def get(self, image_id: str) -> LocalFeatures | RegionFeatures:
        """Features of one image (KeyError if it is not in the store; StoreDamagedError naming a damaged
        file)."""
        for attempt in range(3):
            found = self._locate(image_id)
            if not isinstance(found, tuple):
                return found
            rec, row = found
            try:
                return self._shard(rec)[row]
            except StoreDamagedError:
                if attempt == 2 or not self._moved_on(rec):
                    raise
                self.refresh()  # compacted away since this reader opened the store: read the newer generation
        raise AssertionError("unreachable")

    def _moved_on(self, rec) -> bool:
        """True when a read-only store's shard was retired by a newer generation (not damage)."""
        if self.writable:
            return False
        try:
            newer = _read_manifest(self.path)
        except (OSError, StoreDamagedError):
            return False
        return newer["generation"] != self.generation and rec["name"] not in {
            r["name"] for r in newer["shards"]
        }

    def get_many(self, image_ids) -> list:
        """Features of many images, in the given order; each shard is opened once."""
        return [self.get(i) for i in image_ids]

    def __iter__(self):
        """Yield ``(image_id, features)`` of this generation image by image, one shard at a time, in store
        order. If a compaction retires shards meanwhile, the rest is read from the newer generation (no image
        twice)."""
        return self._iter(self._view, None)

    def _iter(self, view: _View, wanted: set | None, attempts: int = 10):
        records = list(view.records)
        for k, rec in enumerate(records):
            row = 0
            try:
                shard = self._shard(rec)
                ids = shard.ids.tolist()
                skip = set(rec.get("skip", []))
                for row, image_id in enumerate(ids):
                    if row in skip or (wanted is not None and image_id not in wanted):
                        continue
                    feats = shard[row]
                    yield image_id, feats
            except StoreDamagedError:
                if attempts == 0 or not self._moved_on(rec):
                    raise
                later = {r["name"] for r in records[k + 1 :]}
                rest = {
                    i
                    for i, (name, r) in view.index.items()
                    if (name in later or (name == rec["name"] and r >= row))
                    and (wanted is None or i in wanted)
                }
                self.refresh()
                yield from self._iter(self._view, rest, attempts - 1)
                return

    def check(self, digests: bool = True) -> list[dict]:
        """Verify every committed file (size, BLAKE2 digest unless ``digests=False``, structure); returns the
        damaged files as ``[{"file", "problem"}]`` (empty: healthy)."""
        return _check_view(self.path, self.manifest, digests)

    def __repr__(self) -> str:
        name = self.manifest["extractor"].get("name")
        return (
            f"FeatureStore({str(self.path)!r}, extractor={name}, D={self.dim}, "
            f"images={len(self)}, shards={self.num_shards})"
        )

    def __del__(self):
        lock = getattr(self, "_writer_lock", None)
        if lock is not None and lock.held:
            writer = getattr(self, "_writer", None)
            if getattr(writer, "_buffer", None) is not None and writer._buffer.items:
                log.warning(
                    "%s: feature store not closed; %d unflushed images are lost",
                    self.path,
                    len(writer._buffer.items),
                )
            lock.release()


def _compaction_group(records: list, shard_bytes: int, full: bool) -> list[str]:
    """Names of the shards to merge next (empty: nothing to do)."""
    small = [r for r in records if r.get("bytes", 0) < shard_bytes // 2 or len(r.get("skip", [])) > 0]
    if full:
        return [r["name"] for r in small] if len(small) >= 2 else []
    tiers: dict[int, list] = {}
    for r in small:
        tier = int(math.log(max(r.get("bytes", 1), 1), COMPACT_AT))
        tiers.setdefault(tier, []).append(r["name"])
        if len(tiers[tier]) >= COMPACT_AT:
            return tiers[tier]
    return []


def _record_files(folder: Path, rec: dict) -> None:
    """Give a version-1 shard record (no file records) the sizes and digests of its files, and ``bytes``."""
    paths = {k: _file(folder, rec["name"], k) for k in _ARRAYS}
    rec["files"] = {k: {"size": p.stat().st_size, "digest": file_digest(p)} for k, p in paths.items()}
    rec["bytes"] = int(sum(f["size"] for f in rec["files"].values()))


def _verify_digests(folder: Path, rec: dict) -> None:
    _check_sizes(folder, rec)
    for key in _ARRAYS:
        path = _file(folder, rec["name"], key)
        if file_digest(path) != rec["files"][key]["digest"]:
            raise StoreDamagedError(f"{path}: checksum mismatch (the file was altered)")


def _check_view(folder: Path, manifest: dict, digests: bool) -> list[dict]:
    damaged = []
    seen: dict[str, str] = {}
    for rec in manifest["shards"]:
        bad = []
        for key in _ARRAYS:
            path = _file(folder, rec["name"], key)
            try:
                _check_sizes_one(path, rec, key)
                if digests and "files" in rec and file_digest(path) != rec["files"][key]["digest"]:
                    raise StoreDamagedError(f"{path}: checksum mismatch (the file was altered)")
            except StoreDamagedError as exc:
                bad.append({"file": str(path), "problem": str(exc)})
        if not bad:
            try:
                shard = _load_shard(folder, rec, manifest["dim"])
                skip = set(rec.get("skip", []))
                for row, image_id in enumerate(shard.ids.tolist()):
                    if row not in skip and seen.setdefault(image_id, rec["name"]) != rec["name"]:
                        raise StoreDamagedError(
                            f"{_file(folder, rec['name'], 'ids')}: image {image_id!r} is "
                            f"also in shard {seen[image_id]}"
                        )
                del shard
            except StoreDamagedError as exc:
                msg = str(exc)
                bad.append({"file": msg.split(": ", 1)[0], "problem": msg})
        damaged.extend(bad)
    return damaged


def _check_sizes_one(path: Path, rec: dict, key: str) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StoreDamagedError(f"{path}: missing (listed in the store manifest)") from None
    want = (rec.get("files") or {}).get(key, {}).get("size")
    if want is not None and size != want:
        raise StoreDamagedError(f"{path}: {size} bytes, the manifest records {want} (truncated or altered)")


def check_store(path, digests: bool = True) -> list[dict]:
    """Check the feature store at ``path`` without opening it for use: ``[{"file", "problem"}]`` for every
    damaged file (a damaged manifest is one entry); empty when healthy. ``digests=False`` skips the BLAKE2
    checksums
    (sizes and structure only: cheap enough for ``index info``)."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
    except StoreDamagedError as exc:
        return [{"file": str(path / MANIFEST), "problem": str(exc)}]
    except FileNotFoundError as exc:
        return [{"file": str(path / MANIFEST), "problem": str(exc)}]
    return _check_view(path, manifest, digests)


def import_shards(dest: FeatureStore, src: FeatureStore, wanted: set | None = None) -> dict:
    """Bring ``src``'s shards that hold images of ``wanted`` (default: all) not yet in ``dest`` into ``dest``
    (a store open for writing, same extractor): files are hard-linked (copied across file systems), then
    committed with their checksums verified; images ``dest`` already holds are masked. A shard ``dest``
    already has under the same name (imported before, then some of its images removed) cannot be linked again:
    its wanted images are copied into a new shard instead. Returns :meth:`FeatureStore.commit`'s counts."""
    import shutil

    dest._need_writable()
    if dest.extractor["fingerprint"] != src.extractor["fingerprint"] or dest.dim != src.dim:
        raise ValueError(f"{src.path}: features of another extractor than {dest.path}'s")
    recs = []
    view = src._view
    need = {
        name
        for image_id, (name, _) in view.index.items()
        if (wanted is None or image_id in wanted) and image_id not in dest
    }
    copied = 0
    for rec in view.records:
        if rec["name"] not in need:
            continue
        if rec["name"] in dest._view.by_name:  # linked before: copy the images by id
            copied += _copy_images(dest, src, rec, wanted)
            continue
        rec = json.loads(json.dumps(rec))
        if "files" not in rec:  # a version-1 store
            _record_files(src.path, rec)
        _verify_digests(src.path, rec)  # untrusted input: checked where it lies, before anything is linked
        _load_shard(src.path, rec, src.dim)
        for key in _ARRAYS:
            a, b = _file(src.path, rec["name"], key), _file(dest.path, rec["name"], key)
            if b.exists():
                b.unlink()
            try:
                os.link(a, b)
            except OSError:
                with atomic_path(b) as tmp:
                    shutil.copyfile(a, tmp)
        recs.append(rec)
    if copied:
        dest.flush()
    with dest._lock:
        out = dest._commit([{"shards": recs, "failures": {}}], verify=False)
    out["images"] += copied
    dest._maybe_compact()
    return out


def _copy_images(dest: FeatureStore, src: FeatureStore, rec: dict, wanted: set | None) -> int:
    """Add the images of ``src``'s shard ``rec`` that are wanted and not in ``dest`` to ``dest`` (buffered);
    the shard is verified first. Returns how many were added."""
    if "files" in rec:
        _verify_digests(src.path, rec)
    shard = _load_shard(src.path, rec, src.dim)
    skip = set(rec.get("skip", []))
    added = 0
    for row, image_id in enumerate(shard.ids.tolist()):
        if row in skip or (wanted is not None and image_id not in wanted) or image_id in dest:
            continue
        dest.add(image_id, shard[row])
        added += 1
    return added


def _pack(buffer, dim: int) -> dict:
    n = len(buffer)
    kinds = np.zeros(n, np.uint8)
    offsets = np.zeros(n + 1, np.int64)
    region_offsets = np.zeros(n + 1, np.int64)
    locals_, regions = [], []
    for i, (_, f) in enumerate(buffer):
        if isinstance(f, RegionFeatures):
            kinds[i] = 1
            locals_.append(f.features)
            regions.append(f)
            region_offsets[i + 1] = region_offsets[i] + f.num_regions
        else:
            locals_.append(f)
            region_offsets[i + 1] = region_offsets[i]
        offsets[i + 1] = offsets[i] + len(locals_[-1])
    allf = LocalFeatures.concatenate(locals_, dim)
    if regions:
        counts = np.concatenate([r.counts for r in regions]).astype(np.int64)
        boxes = np.concatenate([r.boxes for r in regions]).astype(np.float32).reshape(-1, 4)
        box_ids = np.concatenate([r.box_ids for r in regions]).astype(np.int64)
        box_scores = np.concatenate([r.box_scores for r in regions]).astype(np.float32)
    else:
        counts = np.zeros(0, np.int64)
        boxes = np.zeros((0, 4), np.float32)
        box_ids = np.zeros(0, np.int64)
        box_scores = np.zeros(0, np.float32)
    ids = np.array([i for i, _ in buffer], dtype=str) if n else np.zeros(0, "U1")
    return {
        "ids": ids,
        "kinds": kinds,
        "offsets": offsets,
        "locations": allf.locations.reshape(-1, 2),
        "scales": allf.scales,
        "scores": allf.scores,
        "descriptors": allf.descriptors.reshape(-1, dim),
        "region_offsets": region_offsets,
        "counts": counts,
        "boxes": boxes,
        "box_ids": box_ids,
        "box_scores": box_scores,
    }


def extract_to_store(
    images,
    extractor,
    store_path,
    region_fn=None,
    progress: bool = True,
    workers: int | None = None,
    shard_size: int | None = None,
    retry_failed: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    lock_timeout: float | None = 0.0,
) -> dict:
    """Extract features of ``images`` into the store at ``store_path``; resumable.

    Args:
        images: a folder or list file (see :func:`d2r.features.image.list_images`), or an iterable of paths or
            ``(image_id, path_or_array)`` pairs.
        extractor: has ``extract(image) -> LocalFeatures``, ``name``, ``dim``, ``fingerprint()``.
        region_fn: optional ``region_fn(image_id, source, extractor) -> RegionFeatures`` used instead of
            ``extractor.extract`` (e.g. detector boxes → re-extraction on crops).
        workers: threads over images (default ``extractor.default_workers`` or 1).
        shard_bytes: a shard is written (and committed) every ``shard_bytes`` of features; ``shard_size``
            optionally also caps the images per shard.
        retry_failed: re-attempt images listed in failures.json (default: skip them).
        lock_timeout: seconds to wait for another writer of the store (0: fail at once; None: forever).

    The writer lock is taken before any image is read. Images already in the store are skipped; an image that
    fails (corrupt file, ...) is recorded in the store's failures and the run goes on. Returns ``{"images",
    "extracted", "skipped", "failed", "seconds", "store"}``.
    """
    t0 = time.perf_counter()
    workers = int(workers or getattr(extractor, "default_workers", 1) or 1)
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
    if isinstance(images, (str, Path)):
        pairs = list_images(images)
    else:
        pairs = []
        for item in images:
            if isinstance(item, tuple):
                pairs.append((str(item[0]), item[1]))
            else:
                pairs.extend(list_images([item]))
    seen = set()
    for image_id, _ in pairs:
        if image_id in seen:
            raise ValueError(f"image id {image_id!r} appears twice in the input")
        seen.add(image_id)
    store = FeatureStore.create(
        store_path,
        extractor_info(extractor),
        shard_bytes=shard_bytes,
        shard_size=shard_size,
        lock_timeout=lock_timeout,
    )
    try:
        failures = store.failures
        todo = [(i, p) for i, p in pairs if i not in store and (retry_failed or i not in failures)]
        skipped = len(pairs) - len(todo)

        def work(item):
            image_id, source = item
            try:
                if region_fn is not None:
                    return image_id, region_fn(image_id, source, extractor), None
                return image_id, extractor.extract(source), None
            except Exception as exc:  # one bad image must not kill the batch
                return image_id, None, f"{type(exc).__name__}: {exc}"

        extracted = failed = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"extract {getattr(extractor, 'name', '')}", unit="img")
        try:
            for image_id, feats, error in _ordered_map(work, todo, workers):
                if error is None:
                    store.add(image_id, feats)
                    extracted += 1
                else:
                    log.warning("%s: extraction failed: %s", image_id, error)
                    store.add_failure(image_id, error)
                    failed += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    finally:
        store.close()
    return {
        "images": len(pairs),
        "extracted": extracted,
        "skipped": skipped,
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 3),
        "store": str(store.path),
    }


def _ordered_map(fn, items, workers: int):
    """Apply ``fn`` in ``workers`` threads, yielding results in input order with a bounded window."""
    if workers == 1:
        for item in items:
            yield fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
