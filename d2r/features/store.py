"""Sharded on-disk feature store: many images' local features in a few flat ``.npy`` files per shard.

Layout of a store folder::

    manifest.json                    format, version, extractor {name, config, fingerprint}, dim, shard list
    failures.json                    {image_id: reason} for images that could not be extracted
    shard-00000.ids.npy              (n,) str image ids
    shard-00000.kinds.npy            (n,) uint8: 0 = LocalFeatures, 1 = RegionFeatures
    shard-00000.offsets.npy          (n+1,) int64 feature offsets into the ragged arrays
    shard-00000.locations.npy        (F, 2) float32 (x, y) original pixels
    shard-00000.scales.npy           (F,) float32
    shard-00000.scores.npy           (F,) float32
    shard-00000.descriptors.npy      (F, D) float32
    shard-00000.region_offsets.npy   (n+1,) int64 region offsets (images without regions own none)
    shard-00000.counts.npy           (R,) int64 features per region
    shard-00000.boxes.npy            (R, 4) float32 [x1, y1, x2, y2]
    shard-00000.box_ids.npy          (R,) int64 (-1 = whole image)
    shard-00000.box_scores.npy       (R,) float32

Every file is written atomically and the manifest is rewritten last, so it is the commit point: a crash leaves
the store as of the last flushed shard (stray shard files of an unfinished flush are overwritten next time).
Shards are independent, so a distributed engine can write them in parallel and merge manifests.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2r._io import save_npy, write_json
from d2r.features.base import LocalFeatures, RegionFeatures

log = logging.getLogger(__name__)

FORMAT = "d2r-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.json"
_ARRAYS = ("ids", "kinds", "offsets", "locations", "scales", "scores", "descriptors",
           "region_offsets", "counts", "boxes", "box_ids", "box_scores")


@dataclass
class Shard:
    """One shard's arrays (memory-mapped where possible); ``shard[i]`` → the i-th image's features."""

    ids: np.ndarray
    kinds: np.ndarray
    offsets: np.ndarray
    locations: np.ndarray
    scales: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    region_offsets: np.ndarray
    counts: np.ndarray
    boxes: np.ndarray
    box_ids: np.ndarray
    box_scores: np.ndarray

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


class FeatureStore:
    """A feature store folder. ``create`` / ``open`` it; ``add`` buffers and flushes a shard every
    ``shard_size`` images; ``close`` (or leaving a ``with`` block) flushes the rest.

    Reading: ``len(store)``, ``store.ids()``, ``image_id in store``, ``store.get(image_id)``,
    ``for image_id, feats in store`` (streams shard by shard), ``store.load_shard(i)``.
    """

    def __init__(self, path, manifest: dict, writable: bool, shard_size: int = 1000):
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable
        self.shard_size = int(shard_size)
        if self.shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._buffer: list[tuple[str, LocalFeatures | RegionFeatures]] = []
        self._buffer_ids: set[str] = set()
        self._index: dict[str, tuple[int, int]] = {}
        for s, shard in enumerate(manifest["shards"]):
            ids = np.load(self.path / f"{shard['name']}.ids.npy", allow_pickle=False)
            for i, image_id in enumerate(ids.tolist()):
                self._index[image_id] = (s, i)
        fpath = self.path / FAILURES
        self.failures: dict[str, str] = json.loads(fpath.read_text()) if fpath.exists() else {}
        self._cache: tuple[int, Shard] | None = None

    # ------------------------------------------------------------------------------------------ open/create
    @classmethod
    def create(cls, path, extractor_info: dict, shard_size: int = 1000,
               exist_ok: bool = True) -> "FeatureStore":
        """Create a store for features of the extractor described by ``extractor_info`` ({name, config,
        fingerprint, dim}). An existing store is reopened for appending if ``exist_ok`` and its extractor
        fingerprint and dim match; otherwise ValueError (features of different extractors never mix)."""
        path = Path(path)
        for key in ("name", "fingerprint", "dim"):
            if key not in extractor_info:
                raise ValueError(f"extractor_info needs {key!r}, got keys {sorted(extractor_info)}")
        if (path / MANIFEST).exists():
            if not exist_ok:
                raise FileExistsError(f"{path}: a feature store already exists")
            store = cls.open(path, mode="a", shard_size=shard_size)
            have = store.manifest["extractor"]
            same = have["fingerprint"] == extractor_info["fingerprint"]
            if not same or int(store.dim) != int(extractor_info["dim"]):
                raise ValueError(
                    f"{path}: store holds {have['name']} features (fingerprint {have['fingerprint']}, "
                    f"D={store.dim}), not {extractor_info['name']} "
                    f"(fingerprint {extractor_info['fingerprint']}, D={extractor_info['dim']})"
                )
            return store
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path}: folder exists, is not empty and holds no feature store")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "extractor": {
                "name": extractor_info["name"],
                "config": extractor_info.get("config", {}),
                "fingerprint": extractor_info["fingerprint"],
            },
            "dim": int(extractor_info["dim"]),
            "num_images": 0,
            "num_features": 0,
            "shards": [],
        }
        write_json(path / MANIFEST, manifest)
        return cls(path, manifest, writable=True, shard_size=shard_size)

    @classmethod
    def open(cls, path, mode: str = "r", shard_size: int = 1000) -> "FeatureStore":
        """Open an existing store for reading (``"r"``) or appending (``"a"``)."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{path}: not a feature store (no {MANIFEST})")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        if int(manifest.get("version", 0)) > VERSION:
            raise ValueError(f"{mpath}: version {manifest['version']} is newer than this d2r reads "
                             f"({VERSION})")
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        return cls(path, manifest, writable=(mode == "a"), shard_size=shard_size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def extractor(self) -> dict:
        return dict(self.manifest["extractor"])

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return len(self._index) + len(self._buffer)

    def __contains__(self, image_id) -> bool:
        return image_id in self._index or image_id in self._buffer_ids

    def ids(self) -> list[str]:
        """All stored image ids in store order (flushed shards, then the unflushed buffer)."""
        out = [None] * len(self._index)
        pos = 0
        for shard in self.manifest["shards"]:
            n = shard["num_images"]
            ids = np.load(self.path / f"{shard['name']}.ids.npy", allow_pickle=False).tolist()
            out[pos:pos + n] = ids
            pos += n
        return out + [i for i, _ in self._buffer]

    # ------------------------------------------------------------------------------------------ writing
    def add(self, image_id: str, features: LocalFeatures | RegionFeatures) -> None:
        """Buffer one image's features; flushes a shard when ``shard_size`` images are buffered."""
        if not self.writable:
            raise ValueError(f"{self.path}: store opened read-only")
        image_id = str(image_id)
        if not isinstance(features, (LocalFeatures, RegionFeatures)):
            raise ValueError(f"{image_id}: expected LocalFeatures or RegionFeatures, "
                             f"got {type(features).__name__}")
        local = features.features if isinstance(features, RegionFeatures) else features
        if local.dim != self.dim:
            raise ValueError(f"{image_id}: expected D={self.dim}, got {local.dim}")
        with self._lock:
            if image_id in self._index or image_id in self._buffer_ids:
                raise ValueError(f"{image_id}: already in the store {self.path}")
            self._buffer.append((image_id, features))
            self._buffer_ids.add(image_id)
            self.failures.pop(image_id, None)
            full = len(self._buffer) >= self.shard_size
        if full:
            self.flush()

    def add_failure(self, image_id: str, reason: str) -> None:
        """Record that ``image_id`` could not be extracted (written to failures.json at the next flush)."""
        with self._lock:
            self.failures[str(image_id)] = str(reason)

    def flush(self) -> None:
        """Write the buffered images as a new shard (atomically), then the failures and the manifest."""
        if not self.writable:
            return
        with self._lock:
            buffer = list(self._buffer)
            manifest = json.loads(json.dumps(self.manifest))  # committed only once every file is written
            if buffer:
                shard_no = len(manifest["shards"])
                name = f"shard-{shard_no:05d}"
                arrays = _pack(buffer, self.dim)
                for key in _ARRAYS:
                    save_npy(self.path / f"{name}.{key}.npy", arrays[key])
                n_feat = int(arrays["offsets"][-1])
                manifest["shards"].append({"name": name, "num_images": len(buffer), "num_features": n_feat})
                manifest["num_images"] += len(buffer)
                manifest["num_features"] += n_feat
            write_json(self.path / FAILURES, self.failures)
            write_json(self.path / MANIFEST, manifest)
            # A failed write above leaves the buffer, the ids and the old manifest as they were.
            self.manifest = manifest
            for i, (image_id, _) in enumerate(buffer):
                self._index[image_id] = (shard_no, i)
            self._buffer = self._buffer[len(buffer):]
            self._buffer_ids.difference_update(i for i, _ in buffer)

    def close(self) -> None:
        if self.writable:
            self.flush()

    # ------------------------------------------------------------------------------------------ reading
    def load_shard(self, i: int, mmap: bool = True) -> Shard:
        """Arrays of shard ``i`` (memory-mapped unless ``mmap=False``)."""
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} out of range (store has {self.num_shards})")
        name = self.manifest["shards"][i]["name"]
        mode = "r" if mmap else None
        arrays = {k: np.load(self.path / f"{name}.{k}.npy", mmap_mode=mode, allow_pickle=False)
                  for k in _ARRAYS}
        return Shard(**arrays)

    def _shard(self, i: int) -> Shard:
        cached = self._cache  # one read: another thread may replace the cache meanwhile
        if cached is None or cached[0] != i:
            # np.load parses headers with ast.literal_eval, which CPython 3.11 cannot run from two threads at once
            with self._load_lock:
                cached = self._cache
                if cached is None or cached[0] != i:
                    cached = (i, self.load_shard(i))
                    self._cache = cached
        return cached[1]

    def get(self, image_id: str) -> LocalFeatures | RegionFeatures:
        """Features of one image (KeyError if it is not in the store)."""
        loc = self._index.get(image_id)
        if loc is None:
            for bid, feats in list(self._buffer):
                if bid == image_id:
                    return feats
            loc = self._index.get(image_id)  # flushed meanwhile
        if loc is None:
            raise KeyError(f"{image_id!r} is not in the feature store {self.path}")
        return self._shard(loc[0])[loc[1]]

    def __iter__(self):
        """Yield ``(image_id, features)`` image by image, one shard in memory at a time."""
        for s in range(self.num_shards):
            shard = self.load_shard(s)
            for i, image_id in enumerate(shard.ids.tolist()):
                yield image_id, shard[i]

    def __repr__(self) -> str:
        name = self.manifest["extractor"]["name"]
        return (f"FeatureStore({str(self.path)!r}, extractor={name}, D={self.dim}, "
                f"images={len(self)}, shards={self.num_shards})")


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
    ids = np.array([i for i, _ in buffer], dtype=str)
    return {
        "ids": ids, "kinds": kinds, "offsets": offsets,
        "locations": allf.locations, "scales": allf.scales, "scores": allf.scores,
        "descriptors": allf.descriptors,
        "region_offsets": region_offsets, "counts": counts, "boxes": boxes, "box_ids": box_ids,
        "box_scores": box_scores,
    }


def _extractor_info(extractor) -> dict:
    if hasattr(extractor, "info"):
        return extractor.info()
    return {"name": extractor.name, "config": {}, "fingerprint": extractor.fingerprint(),
            "dim": extractor.dim}


def extract_to_store(images, extractor, store_path, region_fn=None, progress: bool = True,
                     workers: int | None = None, shard_size: int = 1000, retry_failed: bool = False) -> dict:
    """Extract features of ``images`` into the store at ``store_path``; resumable.

    Args:
        images: a folder or list file (see :func:`d2r.features.image.list_images`), or an iterable of paths or
            ``(image_id, path_or_array)`` pairs.
        extractor: has ``extract(image) -> LocalFeatures``, ``name``, ``dim``, ``fingerprint()``.
        region_fn: optional ``region_fn(image_id, source, extractor) -> RegionFeatures`` used instead of
            ``extractor.extract`` (e.g. detector boxes → re-extraction on crops).
        workers: threads over images (default ``extractor.default_workers`` or 1).
        retry_failed: re-attempt images listed in failures.json (default: skip them).

    Images already in the store are skipped; an image that fails (corrupt file, ...) is recorded in
    ``failures.json`` and the run goes on. Returns ``{"images", "extracted", "skipped", "failed", "seconds",
    "store"}``.
    """
    from d2r.features.image import list_images

    t0 = time.perf_counter()
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
    store = FeatureStore.create(store_path, _extractor_info(extractor), shard_size=shard_size)
    todo = [(i, p) for i, p in pairs
            if i not in store and (retry_failed or i not in store.failures)]
    skipped = len(pairs) - len(todo)
    workers = int(workers or getattr(extractor, "default_workers", 1) or 1)
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")

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
        results = _ordered_map(work, todo, workers)
        for image_id, feats, error in results:
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
        store.close()
    return {"images": len(pairs), "extracted": extracted, "skipped": skipped, "failed": failed,
            "seconds": round(time.perf_counter() - t0, 3), "store": str(store.path)}


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
