"""Writing shards: the buffer of images waiting for a shard, and :class:`ShardWriter` (a distributed worker
that writes shards into a store folder without its lock; the store's writer commits them)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np

from d2r.features.base import LocalFeatures, RegionFeatures
from d2r.features.store.format import (DEFAULT_SHARD_BYTES, MANIFEST, feature_bytes, generations, pack,
                                       read_manifest, write_shard)


class Buffer:
    """Images waiting to be written as a shard, with their sources."""
    def __init__(self):
        self.items: dict[str, LocalFeatures | RegionFeatures] = {}
        self.sources: dict[str, str] = {}
        self.bytes = 0

    def add(self, image_id, features, source: str | None = None):
        self.items[image_id] = features
        if source:
            self.sources[image_id] = source
        self.bytes += feature_bytes(features)

    def take(self) -> list:
        return list(self.items.items())

    def drop(self, items: list) -> None:
        for image_id, f in items:
            if self.items.pop(image_id, None) is not None:
                self.bytes -= feature_bytes(f)
            self.sources.pop(image_id, None)


def check_features(image_id, features, dim: int, source=None) -> str | None:
    """ValueError naming the image unless ``features`` are of dimension ``dim``; the source as text (or
    None)."""
    if not isinstance(features, (LocalFeatures, RegionFeatures)):
        raise ValueError(
            f"{image_id}: expected LocalFeatures or RegionFeatures, got {type(features).__name__}"
        )
    local = features.features if isinstance(features, RegionFeatures) else features
    if local.dim != dim:
        raise ValueError(f"{image_id}: expected D={dim}, got {local.dim}")
    if source is not None and not isinstance(source, (str, Path)):
        raise ValueError(f"{image_id}: source must be a file path (str) or None, got {type(source).__name__}")
    return None if source is None else str(source)


class ShardWriter:
    """Write shards into an existing store folder without its writer lock and without touching its manifest
    (a distributed extraction worker). Hand ``close()``'s result to the store's writer, which calls
    :meth:`FeatureStore.commit`; shards never committed are ignored by readers and garbage-collected.

    ``add(image_id, features, source=None)`` buffers and writes a shard every ``shard_bytes``;
    ``add_failure(image_id, reason)`` records a failure; ``close()`` writes the rest and returns
    ``{"shards": [manifest records], "failures": {id: reason}}`` (plain JSON types).
    """
    def __init__(self, store_path, dim: int, shard_bytes: int = DEFAULT_SHARD_BYTES, prefix: str = ""):
        self.path = Path(store_path)
        if not (self.path / MANIFEST).is_file():
            generations().refuse_lost(self.path)
            raise FileNotFoundError(f"{self.path}: not a feature store (no {MANIFEST}); create it first")
        self.dim = int(dim)
        have = read_manifest(self.path)["dim"]
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
        self._buffer = Buffer()
        self._ids: set[str] = set()
        self._closed = False

    def new_name(self) -> str:
        return f"shard-{self.prefix}{uuid.uuid4().hex}"

    def add(self, image_id, features, source=None) -> None:
        if self._closed:
            raise ValueError("ShardWriter is closed")
        image_id = str(image_id)
        source = check_features(image_id, features, self.dim, source)
        if image_id in self._ids:
            raise ValueError(f"{image_id}: added twice to this ShardWriter")
        self._ids.add(image_id)
        self.failures.pop(image_id, None)
        self._buffer.add(image_id, features, source)
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
        rec = self.write_items(items)
        self._buffer.drop(items)
        self.records.append(rec)
        return rec

    def write_items(self, items, sources: dict | None = None) -> dict:
        """Write ``items`` ([(id, features)]) as one new shard (sources from ``sources``, else the
        buffer's)."""
        return write_shard(self.path, self.new_name(),
                           pack(items, self.dim, self._buffer.sources if sources is None else sources))

    def get(self, image_id):
        return self._buffer.items.get(image_id)

    def close(self) -> dict:
        """Write what is buffered; return ``{"shards": [...], "failures": {...}}`` to commit."""
        if not self._closed:
            self.write()
            self._closed = True
        return {"shards": json.loads(json.dumps(self.records)), "failures": dict(self.failures)}
