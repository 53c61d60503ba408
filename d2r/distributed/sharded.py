"""An index split by image into shards, searched as one: :class:`ShardedDatabase` and :func:`build_shards`.

Each shard is a normal :class:`~d2r.index.Database` folder (or an engine folder holding one in ``index/``),
built where its features are. A query is aggregated once on the driver and sent to every shard (in-process,
or to Ray actors that each hold one open shard); the per-shard top-k lists are merged. Statistics that span
shards (document frequencies and the item count behind IDF) are added up and the combined idf is sent with
the query, so scores equal those of one index holding every image. Ties are broken by (shard, position in
the shard), which is the insertion order of one index built from the shards' images concatenated in shard
order — what :func:`build_shards` makes — so rankings are identical, ties included.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2r._validate import as_top_k
from d2r.engine import Engine
from d2r.engine.config import EngineConfig, engine_config
from d2r.index.database import Database, Ranking
from d2r.aggregate import Aggregated
from d2r.aggregate import Aggregator
from d2r.distributed._ray import init
from d2r.engine.check import check_engine
from d2r.engine.sources import SourcesTable
from d2r.features.base import RegionFeatures
from d2r.features.store import FeatureStore
from d2r.index.database import DatabaseConfig

log = logging.getLogger(__name__)

# "NODE_IP:/path": open this shard on the Ray node with that IP (the path is on that node).
_NODE_PATH = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){3}):(/.*)$")
# Settings that must agree between shards (the query is aggregated once for all of them).
_SAME = ("kernel", "mode", "alpha", "tau", "tau_inclusive", "normalize", "query_num_assignments", "idf")


def _database_folder(path: Path) -> Path:
    """``path`` itself, or ``path/index`` for an engine folder."""
    return path / "index" if (path / "engine.json").is_file() else path


class _Shard:
    """One open shard (runs in-process or as a Ray actor)."""
    def __init__(self, source):
        if isinstance(source, Database):
            self.db, self.engine_config = source, None
            return
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard not found")
        folder = _database_folder(path)
        self.db = Database.open(folder)
        self.engine_config = self._store = None
        self._sources: dict = {}
        if folder != path:  # an engine folder: its feature store and sources serve re-ranking and hits

            self.engine_config = engine_config(path).to_dict()  # old engine.json files converted
            self._sources = SourcesTable(path)  # sources.json and its log, read at the first hit
            if (path / "features" / "manifest.json").is_file():
                self._store = FeatureStore.open(path / "features")

    def describe(self) -> dict:
        db = self.db
        return {"config": db.config.to_dict(), "codebook": db.codebook.fingerprint, "images": len(db),
                "id_type": db._id_type, "engine_config": self.engine_config,
                "path": None if db.path is None else str(db.path)}

    def codebook(self):
        return self.db.codebook

    def statistics(self) -> dict:
        return self.db.statistics()

    def ids(self):
        return self.db.ids()

    def contains(self, image_id) -> bool:
        return image_id in self.db

    def features(self, image_id):
        """Stored features of ``image_id`` (None when this shard has no store or not this image)."""
        if self._store is None or image_id not in self._store:
            return None
        return self._store.get(image_id)

    def source(self, image_id):
        return self._sources.get(image_id)

    def record(self, image_id):
        """The index record of ``image_id`` (None when this shard does not hold it)."""
        return self.db.record(image_id) if image_id in self.db else None

    def search(self, queries, top_k: int, idf):
        kw = {} if idf is None else {"idf": idf}
        out = []
        for q in queries:
            r = self.db.search(q, top_k, **kw)
            out.append((np.asarray(r.ids), np.asarray(r.scores), np.asarray(r.regions)))
        return out


class ShardedDatabase:
    """Search many database shards as one index.

    shards: database or engine folders, open :class:`Database` objects (in-process only), or, with Ray,
    ``"NODE_IP:/path"`` to open a shard on a given node. ray: False (in-process, shards searched by threads),
    True (one Ray actor per shard on a local Ray or the cluster at ``address``). Every shard must use the same
    codebook and search settings (ValueError naming the shard otherwise). Use as a context manager or call
    :meth:`close` to release the actors.
    """
    def __init__(self, shards, *, ray: bool = False, address: str | None = None):
        shards = list(shards)
        if not shards:
            raise ValueError("a sharded database needs at least one shard")
        seen: dict = {}
        for s in shards:  # one shard twice would count its images (and their statistics) twice
            if isinstance(s, Database):
                key = id(s)
            else:
                key = str(s) if _NODE_PATH.match(str(s)) else str(_database_folder(Path(s)).resolve())
            if key in seen:
                raise ValueError(f"{s}: the same shard as {seen[key]} (give each shard once)")
            seen[key] = s
        self._ray = None
        self._started = False
        self._pool = None
        if ray or address:
            if any(isinstance(s, Database) for s in shards):
                raise ValueError("Ray shards are opened from folders, not from Database objects")
            for s in shards:  # a shard on a named node is checked there
                if not _NODE_PATH.match(str(s)) and not Path(s).exists():
                    raise FileNotFoundError(f"{s}: shard not found")
            self._ray, self._started = init(address or None)
            actor = self._ray.remote(num_cpus=0)(_Shard)
            self._shards = []
            for s in shards:
                m = _NODE_PATH.match(str(s))
                opts = {"resources": {f"node:{m.group(1)}": 0.001}} if m else {}
                self._shards.append(actor.options(**opts).remote(m.group(2) if m else str(s)))
        else:
            for s in shards:
                if not isinstance(s, Database) and _NODE_PATH.match(str(s)):
                    raise ValueError(f"{s}: a shard on a node needs ray=True")
            self._shards = [_Shard(s) for s in shards]
            self._pool = ThreadPoolExecutor(len(shards)) if len(shards) > 1 else None
        try:
            self._describe = self._call("describe")
            self._check(shards)
            self.codebook = self._call_one(0, "codebook")
        except Exception:
            self.close()
            raise
        d = self._describe[0]

        self.config = DatabaseConfig.from_dict(d["config"])
        self.engine_config = d["engine_config"]
        self._query_agg = Aggregator(self.codebook, self.config.kernel, self.config.query_num_assignments)
        self._idf = None

    def _check(self, shards) -> None:
        first = self._describe[0]
        id_types = {d["id_type"] for d in self._describe if d["id_type"] is not None}
        for s, d in zip(shards, self._describe):
            name = d["path"] or repr(s)
            if d["codebook"] != first["codebook"]:
                raise ValueError(f"{name}: shard uses codebook {d['codebook']}, "
                                 f"the first shard {first['codebook']}")
            for key in _SAME:
                if d["config"][key] != first["config"][key]:
                    raise ValueError(f"{name}: shard has {key}={d['config'][key]!r}, the first shard "
                                     f"{first['config'][key]!r}; every shard must be searched the same way")
        if len(id_types) > 1:
            raise ValueError(f"shards mix image id types {sorted(id_types)}")

    # ---- calls on every shard ----------------------------------------------------------------------------
    def _call(self, method: str, *args) -> list:
        if self._ray is not None:
            return self._get([getattr(s, method).remote(*args) for s in self._shards])
        if self._pool is not None:
            return list(self._pool.map(lambda s: getattr(s, method)(*args), self._shards))
        return [getattr(s, method)(*args) for s in self._shards]

    def _call_one(self, i: int, method: str, *args):
        s = self._shards[i]
        if self._ray is not None:
            return self._get(getattr(s, method).remote(*args))
        return getattr(s, method)(*args)

    def _get(self, refs):
        """``ray.get``, re-raising a shard actor's error as itself (e.g. FileNotFoundError naming it)."""
        from ray.exceptions import RayTaskError

        try:
            return self._ray.get(refs)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise

    # ---- contents ----------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def kernel(self) -> str:
        return self.config.kernel

    def features(self, image_id):
        """Stored features of ``image_id`` from the shard (engine folder) holding it; KeyError if none has."""
        for f in self._call("features", image_id):
            if f is not None:
                return f
        raise KeyError(f"{image_id!r} is not in the feature store of any shard")

    def source(self, image_id):
        """The image file recorded for ``image_id`` by its shard's engine (None when unknown)."""
        return next((s for s in self._call("source", image_id) if s is not None), None)

    def record(self, image_id) -> Aggregated:
        """The index record of ``image_id`` from the shard holding it (:meth:`Database.record`; query
        expansion averages these); KeyError if no shard has it."""
        found = next((r for r in self._call("record", image_id) if r is not None), None)
        if found is None:
            raise KeyError(f"image {image_id!r} is not in any shard")
        return found

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return sum(d["images"] for d in self._describe)

    def __contains__(self, image_id) -> bool:
        return any(self._call("contains", image_id))

    def ids(self) -> np.ndarray:
        """Live image ids, shard by shard, in insertion order."""
        parts = self._call("ids")
        return np.concatenate(parts) if parts else np.zeros(0, str)

    def statistics(self) -> dict:
        """Combined statistics: ``df`` (K,) int64 document frequencies, ``items`` and ``images`` (live)."""
        stats = self._call("statistics")
        return {"df": np.sum([np.asarray(s["df"], np.int64) for s in stats], axis=0),
                "items": int(sum(s["items"] for s in stats)), "images": int(sum(s["images"] for s in stats))}

    def idf(self) -> np.ndarray:
        """(K,) float64 idf_c = log(N / max(df_c, 1)) over the live items of all shards (as one index)."""
        if self._idf is None:
            s = self.statistics()
            self._idf = np.log(max(s["items"], 1) / np.maximum(s["df"], 1))
        return self._idf

    # ---- search ------------------------------------------------------------------------------------------
    def _as_query(self, query):
        if isinstance(query, Aggregated):
            return query
        return self._query_agg(getattr(query, "descriptors", query))

    def search(self, query, top_k: int = 100) -> Ranking:
        """Rank all shards' images for one query ((N, D) descriptors, an object with ``.descriptors`` or an
        :class:`~d2r.aggregate.Aggregated`): exactly :meth:`Database.search` of one index holding them all."""
        return self.search_batch([query], top_k)[0]

    def search_batch(self, queries, top_k: int = 100) -> list[Ranking]:
        """:meth:`search` for many queries, sent to each shard in one call."""
        top_k = as_top_k(top_k)
        queries = [self._as_query(q) for q in queries]
        idf = self.idf() if self.config.idf else None
        per_shard = self._call("search", queries, top_k, idf)
        return [_merge([r[i] for r in per_shard], top_k) for i in range(len(queries))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._ray is not None:
            for s in self._shards:
                self._ray.kill(s)
            if self._started:
                self._ray.shutdown()
            self._ray = None
        self._shards = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ShardedDatabase({self.config.kernel}, mode={self.config.mode}, shards={self.num_shards})"


def _merge(results, top_k: int) -> Ranking:
    """Merge per-shard rankings ``[(ids, scores, regions), ...]`` (each sorted by score, then insertion):
    the best ``top_k`` by score, ties by (shard, position)."""
    ids = np.concatenate([r[0] for r in results])
    scores = np.concatenate([r[1] for r in results]).astype(np.float64)
    regions = np.concatenate([r[2] for r in results]).astype(np.int64)
    shard = np.concatenate([np.full(len(r[0]), s, np.int64) for s, r in enumerate(results)])
    pos = np.concatenate([np.arange(len(r[0]), dtype=np.int64) for r in results])
    order = np.lexsort((pos, shard, -scores))[:max(top_k, 0)]
    return Ranking(ids[order], scores[order], regions[order])


def shard_bounds(n: int, shards: int) -> np.ndarray:
    """(shards + 1,) int64 bounds of ``shards`` contiguous blocks of ``n`` images, sizes differing by ≤ 1."""
    shards = int(shards)
    if shards < 1:
        raise ValueError(f"shards must be ≥ 1, got {shards}")
    return (np.arange(shards + 1, dtype=np.int64) * int(n)) // shards


def build_shards(images, shards, codebook, *, progress: bool = False, **config) -> list[Database]:
    """Index ``images`` into ``shards`` databases, split by image into contiguous blocks (so one index built
    from the same list has the insertion order (shard, position in shard)).

    images: a sized sequence of ``(image_id, descriptors, regions_or_None)`` (as :meth:`Database.add_batch`
    takes) or a :class:`~d2r.features.FeatureStore`. shards: a number of in-memory databases, or a list of
    folders (each created, filled and saved). config: :meth:`Database.create` settings (kernel, mode, idf...).
    Returns the databases.
    """
    if isinstance(images, FeatureStore):
        ids = images.ids()

        def item(i):
            f = images.get(ids[i])
            if isinstance(f, RegionFeatures):
                return ids[i], f.features.descriptors, f.counts
            return ids[i], f.descriptors, None

        n = len(ids)
    else:
        images = list(images)
        n = len(images)

        def item(i):
            return images[i]

    paths = [None] * int(shards) if isinstance(shards, (int, np.integer)) else [Path(p) for p in shards]
    for p in paths:
        if p is not None and (p / "manifest.json").exists():
            raise FileExistsError(f"{p}: a database already exists here")
    bounds = shard_bounds(n, len(paths))
    out = []
    for s, path in enumerate(paths):
        db = Database.create(path, codebook, **config)
        db.add_batch((item(i) for i in range(bounds[s], bounds[s + 1])), progress=progress)
        if path is not None:
            db.save()
        out.append(db)
    return out


class _Sources:
    """``.get(image_id)``: the image file, asked of the shards (an engine's ``sources.json`` stays there)."""
    def __init__(self, sharded: ShardedDatabase):
        self._sharded = sharded

    def get(self, image_id, default=None):
        found = self._sharded.source(image_id)
        return default if found is None else found


class ShardedEngine(Engine):
    """An :class:`~d2r.engine.Engine` (search side) over engine folders that each index a block of the images:
    the query is extracted and aggregated once, ranked by a :class:`ShardedDatabase`, re-ranked with features
    fetched from the shard holding each image. Every shard must have the same features, regions and index
    settings. Read-only: index each shard with its own engine."""
    def __init__(self, shards, *, ray: bool = False, address: str | None = None):
        shards = list(shards)
        sharded = ShardedDatabase(shards, ray=ray, address=address)
        try:
            configs = [d["engine_config"] for d in sharded._describe]
            for s, c in zip(shards, configs):
                if c is None:
                    raise ValueError(f"{s}: not an engine folder (engine.json missing)")
                for key in ("features", "regions"):
                    if c[key] != configs[0][key]:
                        raise ValueError(f"{s}: shard has {key} {c[key]}, the first shard {configs[0][key]}")
        except Exception:
            sharded.close()
            raise
        super().__init__(Path(str(shards[0])), EngineConfig.from_dict(configs[0]))
        self.shards = [str(s) for s in shards]
        self._db = sharded
        self._sources = _Sources(sharded)
        self._failures = {}
        if self.global_stage is not None:  # its global index would be shard 0's alone
            log.warning("%s: a sharded engine runs the local stage only (the global stage of two-stage search "
                        "is per engine folder)", self.shards[0])
            self.global_stage = None

    def _stored(self, image_id):
        return self._db.features(str(image_id))

    def index(self, *args, **kwargs):
        raise ValueError("a sharded engine is read-only: index each shard with its own engine")

    def _writing(self, lock_timeout):  # every writer (remove, index_store...) would change shard 0 only
        raise ValueError("a sharded engine is read-only: add or remove images with the engine of their shard")

    def info(self) -> dict:
        """Counts over all shards, the shared config, and each shard's path and image count."""
        db = self._db
        return {"path": self.shards, "images": len(db), "failures": None, "config": self.config.to_dict(),
                "index": {"config": db.config.to_dict(), "codebook": {"fingerprint": db.codebook.fingerprint,
                                                                      "k": db.codebook.size,
                                                                      "dim": db.codebook.dim}},
                "shards": [{"path": p, "images": d["images"]} for p, d in zip(self.shards, db._describe)]}

    def check(self, digests: bool = True) -> list[dict]:
        """:meth:`Engine.check` of every shard on this machine (files named ``SHARD/...``); a shard on a Ray
        node (``NODE_IP:/path``) is checked there with ``d2r index check``, not here (ValueError)."""
        remote = [s for s in self.shards if _NODE_PATH.match(s)]
        if remote:
            raise ValueError(f"{remote[0]}: a shard on another node; run `d2r index check` there")
        return [dict(d, file=str(Path(s) / d["file"])) for s in self.shards for d in check_engine(s, digests)]

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
