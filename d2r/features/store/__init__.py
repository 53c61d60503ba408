"""The feature store: images' local features in large, immutable, checksummed shards on :mod:`d2r.storage`.

:mod:`~d2r.features.store.format` (shard layout, manifest), :mod:`~d2r.features.store.store`
(:class:`FeatureStore`), :mod:`~d2r.features.store.writer` (:class:`ShardWriter`),
:mod:`~d2r.features.store.check` (:func:`check_store`, :func:`repair_store`).
"""

from d2r.features.store.check import check_store, repair_store
from d2r.features.store.format import DEFAULT_SHARD_BYTES, FORMAT, FORMAT_VERSION, Shard
from d2r.features.store.store import FeatureStore, import_shards
from d2r.features.store.writer import ShardWriter
from d2r.storage import DamagedError

StoreDamagedError = DamagedError  # the name of releases up to a0fe626 (documented in FeatureStore.get)

__all__ = ["FeatureStore", "ShardWriter", "check_store", "repair_store", "import_shards",
           "DEFAULT_SHARD_BYTES", "FORMAT", "FORMAT_VERSION", "Shard", "DamagedError"]
