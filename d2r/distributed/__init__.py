"""Scale-out on Ray (an optional extra: ``pip install -e '.[ray]'``).

- :func:`train_codebook`: Lloyd k-means with the assignment step on Ray workers; :func:`sample_descriptors`:
  the training sample drawn (and features extracted) on Ray workers.
- :class:`ShardedDatabase`, :func:`build_shards`: an index split by image into shard folders, searched as one.
- :func:`extract`: feature extraction by Ray actors into one feature store.

Importing this package does not import Ray; each entry point does, with a clear error when it is missing.
"""

from d2r.distributed._ray import import_ray, init, session
from d2r.distributed.extract import extract
from d2r.distributed.kmeans import sample_descriptors, train_codebook
from d2r.distributed.sharded import ShardedDatabase, ShardedEngine, build_shards, shard_bounds

__all__ = ["import_ray", "init", "session", "extract", "sample_descriptors", "train_codebook",
           "ShardedDatabase", "ShardedEngine", "build_shards", "shard_bounds"]
