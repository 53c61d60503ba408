"""The feature store's payload on :mod:`d2r.storage`: the shard layout, its manifest, and how shards are
packed, written, read and validated.

Layout of a store folder::
    manifest.json                  the commit point (generation ``g``; ``manifest-<g>.json`` holds the same):
                                   format, format_version, generation, extractor {name, config, fingerprint},
                                   dim, num_images, num_features, shards [{name, num_images, num_features,
                                   bytes, files {key: {size, blake2b}}, skip}], failures {id: reason}
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
    shard-<hex>.sources.npy        (n,) str each image's source file ("" = unknown); only in shards of images
                                   added with a source (format version 3)

Format versions: 1 kept no file records and its failures beside the manifest only; 2 spelled ``version`` and
file records ``{"size", "digest"}`` and listed ``retired`` shards; 3 (this one) has manifest generations and
optional sources. Older manifests are converted as they are read; a writer commits version 3.

Every file is untrusted: a shard is validated (dtypes, shapes, offsets, region counts, ids) before use, and a
damaged file raises :class:`~d2r.storage.DamagedError` naming it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from d2r._io import write_json
from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.storage import (MANIFEST, RECORD, DamagedError, Generations, Int, Map, Opt, RowReader, Text, convert,
                         load_json, read_header, save_array, validate, verify_file)
from d2r.storage.manifest import problem

log = logging.getLogger(__name__)

FORMAT = "d2r-feature-store"
FORMAT_VERSION = 3
FAILURES = "failures.json"
KEEP_GENERATIONS = 3
DEFAULT_SHARD_BYTES = 256 << 20
RETIRE_GRACE_SECONDS = 60.0  # shards of a superseded generation stay readable this long (and two generations)
GC_GRACE_SECONDS = 6 * 3600  # uncommitted shard files younger than this may belong to a live ShardWriter
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
    "sources": ("U", 1, "n"),
}
_ARRAYS = tuple(k for k in _SPEC if k != "sources")  # every shard has these
OPTIONAL = ("sources",)
_ROWS = ("locations", "scales", "scores", "descriptors")  # the big per-feature arrays: read by rows on demand
_NAME = r"shard-[A-Za-z0-9_-]{1,128}"
_FILE = re.compile(rf"^({_NAME})\.([a-z_]+)\.npy$")
SHARD = {"name": Text(_NAME), "num_images": int, "num_features": int, "bytes": Opt(int),
         "files": Opt(Map(RECORD)), "skip": Opt([int])}
SCHEMA = {"format": FORMAT, "format_version": Int(1, FORMAT_VERSION), "generation": int,
          "extractor": {"name": Opt(str), "config": Opt(dict), "fingerprint": str}, "dim": Int(1),
          "num_images": Opt(int), "num_features": Opt(int), "shards": [SHARD], "failures": Map(str)}


def damaged(file, problem: str) -> DamagedError:
    return DamagedError(file, problem, "features")


class Shard:
    """One shard's validated arrays: the per-image and per-region ones in memory, the per-feature ones
    (locations, scales, scores, descriptors) read from the file by rows; ``shard[i]`` → the i-th image's
    features (new arrays), ``shard.source(i)`` → its source file or None."""
    def __init__(self, name: str, arrays: dict):
        self.name = name
        for key in _SPEC:
            setattr(self, key, arrays.get(key))

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

    def source(self, i: int) -> str | None:
        return (str(self.sources[i]) or None) if self.sources is not None else None


# ---- files -------------------------------------------------------------------------------------------------
def shard_file(folder: Path, name: str, key: str) -> Path:
    return folder / f"{name}.{key}.npy"


def keys(rec: dict) -> tuple:
    """The array files a shard record has (a version-1 record, without file records: the mandatory ones)."""
    files = rec.get("files") or {}
    return _ARRAYS + tuple(k for k in OPTIONAL if k in files)


def part_of(name: str) -> str | None:
    """The shard a folder entry is a file of (None: not a shard file)."""
    m = _FILE.match(name)
    return m.group(1) if m else None


def write_shard(folder: Path, name: str, arrays: dict) -> dict:
    """Write one shard's files (each atomically, hashed as written); on failure remove what was written.
    Returns the manifest record."""
    files = {}
    try:
        for key in _SPEC:
            if key in arrays:
                files[key] = save_array(shard_file(folder, name, key), arrays[key], atomic=True)
    except BaseException:
        remove_shard_files(folder, name)
        raise
    return {
        "name": name,
        "num_images": int(arrays["ids"].shape[0]),
        "num_features": int(arrays["offsets"][-1]),
        "bytes": int(sum(f["size"] for f in files.values())),
        "files": files,
        "skip": [],
    }


def remove_shard_files(folder: Path, name: str) -> None:
    for key in _SPEC:
        shard_file(folder, name, key).unlink(missing_ok=True)


def feature_bytes(features) -> int:
    """Bytes an image takes in a shard (close enough for rolling over by size)."""
    local = features.features if isinstance(features, RegionFeatures) else features
    n_reg = features.num_regions if isinstance(features, RegionFeatures) else 0
    return len(local) * (4 * local.dim + 16) + n_reg * 36 + 100


def pack(items: list, dim: int, sources: dict | None = None) -> dict:
    """The arrays of a shard of ``items`` ([(image id, features)]); ``sources`` {id: file} adds the optional
    ``sources`` array when any of the items has one."""
    n = len(items)
    kinds = np.zeros(n, np.uint8)
    offsets = np.zeros(n + 1, np.int64)
    region_offsets = np.zeros(n + 1, np.int64)
    locals_, regions = [], []
    for i, (_, f) in enumerate(items):
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
    ids = np.array([i for i, _ in items], dtype=str) if n else np.zeros(0, "U1")
    out = {
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
    if sources and any(sources.get(i) for i, _ in items):
        out["sources"] = np.array([sources.get(i) or "" for i, _ in items], dtype=str)
    return out


# ---- reading and validating --------------------------------------------------------------------------------
def _load_array(path: Path, key: str, rows: bool = True):
    """Parse and check a .npy header (dtype, dimensions, file size) before reading any data; small arrays are
    read whole, the per-feature ones (``_ROWS``) come back as a :class:`~d2r.storage.RowReader` unless
    ``rows=False``."""
    dtype, ndim, _ = _SPEC[key]
    shape, dt, offset = read_header(path, "features")
    ok = dt.kind == "U" and dt.byteorder in ("=", "<", "|") if dtype == "U" else dt == np.dtype(dtype)
    if not ok:
        raise damaged(path, f"dtype {dt}, expected {'str' if dtype == 'U' else np.dtype(dtype)}")
    if len(shape) != ndim:
        raise damaged(path, f"{len(shape)}-D array of shape {shape}, expected {ndim}-D")
    reader = RowReader(path, (shape, dt, offset), "features")
    return reader if key in _ROWS and rows else reader.read(0, shape[0]).reshape(shape)


def id_list(ids: np.ndarray, path: Path) -> list[str]:
    try:
        out = ids.tolist()
        for i in out:
            i.encode("utf-8")
    except (ValueError, UnicodeError) as exc:
        raise damaged(path, f"image ids are not valid text ({exc})") from None
    return out


def load_ids(folder: Path, rec: dict) -> list[str]:
    path = shard_file(folder, rec["name"], "ids")
    ids = _load_array(path, "ids", rows=False)
    if ids.shape[0] != rec["num_images"]:
        raise damaged(path, f"{ids.shape[0]} ids, the manifest records {rec['num_images']}")
    return id_list(ids, path)


def check_sizes(folder: Path, rec: dict) -> None:
    """Every file of a shard exists and has the size the manifest records (cheap: one stat per file)."""
    for key in keys(rec):
        path = shard_file(folder, rec["name"], key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise damaged(path, "missing (listed in the store manifest)") from None
        want = (rec.get("files") or {}).get(key, {}).get("size")
        if want is not None and size != want:
            raise damaged(path, f"{size} bytes, the manifest records {want} (truncated or altered)")


def verify_shard(folder: Path, rec: dict) -> None:
    """Every file of a shard matches its record, digest included (before a shard is merged, linked or
    committed: a damaged input is never rewritten under a fresh checksum)."""
    check_sizes(folder, rec)
    for key in keys(rec):
        verify_file(shard_file(folder, rec["name"], key), rec["files"][key], "features")


def load_shard(folder: Path, rec: dict, dim: int) -> Shard:
    """Load and validate one shard (headers, sizes, offsets; no feature data read); DamagedError naming the
    first bad file."""
    check_sizes(folder, rec)
    name = rec["name"]
    a = {key: _load_array(shard_file(folder, name, key), key) for key in keys(rec)}
    path = lambda key: shard_file(folder, name, key)  # noqa: E731
    n, n_feat = rec["num_images"], rec["num_features"]
    n_reg = a["counts"].shape[0]
    want = {
        "ids": (n,), "kinds": (n,), "offsets": (n + 1,), "locations": (n_feat, 2), "scales": (n_feat,),
        "scores": (n_feat,), "descriptors": (n_feat, dim), "region_offsets": (n + 1,), "counts": (n_reg,),
        "boxes": (n_reg, 4), "box_ids": (n_reg,), "box_scores": (n_reg,), "sources": (n,),
    }
    for key in a:
        if a[key].shape != want[key]:
            raise damaged(path(key), f"shape {a[key].shape}, expected {want[key]}")
    for key, end in (("offsets", n_feat), ("region_offsets", n_reg)):
        off = np.asarray(a[key])
        if off[0] != 0 or off[-1] != end or (n and np.any(np.diff(off) < 0)):
            raise damaged(path(key), f"offsets not monotone from 0 to {end}")
    kinds = np.asarray(a["kinds"])
    if np.any(kinds > 1):
        raise damaged(path("kinds"), "kinds must be 0 or 1")
    roff = np.asarray(a["region_offsets"])
    nreg_img = np.diff(roff)
    if np.any(nreg_img[kinds == 0] != 0) or np.any(nreg_img[kinds == 1] < 1):
        raise damaged(path("region_offsets"), "region counts disagree with kinds")
    counts = np.asarray(a["counts"])
    if np.any(counts < 0):
        raise damaged(path("counts"), "negative region counts")
    id_list(a["ids"], path("ids"))
    if "sources" in a:
        id_list(a["sources"], path("sources"))
    csum = np.concatenate([[0], np.cumsum(counts)])
    per_image = csum[roff[1:]] - csum[roff[:-1]]
    nfeat_img = np.diff(np.asarray(a["offsets"]))
    if np.any(per_image[kinds == 1] != nfeat_img[kinds == 1]):
        raise damaged(path("counts"), "region counts do not add up to the images' features")
    return Shard(name, a)


# ---- the manifest ------------------------------------------------------------------------------------------
def record_problem(rec) -> str | None:
    """What is wrong with a shard record (from a manifest or a ShardWriter's result: untrusted JSON)."""
    found = problem(rec, SHARD, "shard")
    if found:
        return found
    files = rec.get("files")
    if files is not None and not set(_ARRAYS) <= set(files) <= set(_SPEC):
        return f"shard {rec['name']}: file records of {sorted(files)}, expected {list(_ARRAYS)} (+ sources)"
    if not all(s < rec["num_images"] for s in rec.get("skip") or []):
        return f"shard {rec['name']}: skip list beyond its {rec['num_images']} images"
    return None


def read_file(file: Path) -> dict:
    """Parse, convert (versions 1 and 2) and check one store manifest; DamagedError naming it otherwise."""
    m = load_json(file, "features")
    if m.get("format") != FORMAT:
        raise damaged(file, f"format {m.get('format')!r} is not {FORMAT!r}")
    convert(m)
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise damaged(file, f"format version {version!r} is not one this d2r reads (1 to {FORMAT_VERSION})")
    m.setdefault("generation", 0)
    m.pop("retired", None)  # version 2: shards retired by a compaction, now garbage no generation lists
    if "failures" not in m:  # version 1 kept them beside the manifest only
        fpath = file.parent / FAILURES
        try:
            m["failures"] = json.loads(fpath.read_text()) if fpath.exists() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise damaged(fpath, f"not valid JSON ({exc})") from None
    validate(file, m, SCHEMA, "features")
    names = set()
    for rec in m["shards"]:
        found = record_problem(rec)
        if found:
            raise damaged(file, f"malformed manifest ({found})")
        if rec["name"] in names:
            raise damaged(file, f"shard {rec['name']} listed twice")
        names.add(rec["name"])
        rec.setdefault("skip", [])
    return m


def generations(orphan_grace: float | None = None) -> Generations:
    """The store's generation log (its grace periods read now, so a caller can shorten them)."""
    return Generations(store="features", what="feature store", read_file=read_file,
                       parts=lambda m: {r["name"] for r in m["shards"]}, part_of=part_of,
                       keep=KEEP_GENERATIONS, retire_grace=RETIRE_GRACE_SECONDS,
                       orphan_grace=GC_GRACE_SECONDS if orphan_grace is None else orphan_grace)


def commit(folder: Path, manifest: dict) -> list[str]:
    """Commit ``manifest`` as the next generation (counts recomputed), write the readable failures table,
    then collect garbage; returns the names deleted. The lock holder only."""
    gen = int(manifest.get("generation", 0)) + 1
    manifest["generation"] = gen
    manifest["format_version"] = FORMAT_VERSION
    live = manifest["shards"]
    manifest["num_images"] = int(sum(r["num_images"] - len(r.get("skip", [])) for r in live))
    manifest["num_features"] = int(sum(r["num_features"] for r in live))
    log_ = generations()
    log_.commit(folder, manifest)
    try:
        write_json(folder / FAILURES, manifest["failures"])
    except OSError as exc:
        log.warning("%s: could not write %s: %s", folder, FAILURES, exc)
    return log_.collect_garbage(folder, manifest)


def read_manifest(folder: Path) -> dict:
    return generations().read(folder)


def stamp(folder: Path):
    """Changes whenever a new manifest is committed (each is a new file renamed into place)."""
    try:
        st = (folder / MANIFEST).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
