"""Feature extraction by Ray actors into one feature store.

Each actor builds one extractor (the DELF model is loaded once per actor; with ``gpus_per_worker`` Ray gives
it that fraction of a GPU) and one :class:`~d2r.features.store.ShardWriter`, and extracts batches of images,
writing uniquely named shards straight into the store folder (shared storage: every node must see the image
paths and the store). The driver holds the store's writer lock and commits each written shard with
:meth:`FeatureStore.commit <d2r.features.FeatureStore.commit>`, so the manifest has one writer.

Resumable: images already in the store (or recorded as failed, unless ``retry_failed``) are skipped; a shard
written but not committed when the driver dies is ignored and later garbage-collected, its images extracted
again. A worker that dies mid-run is replaced and every image it had not yet written to a committed shard goes
back to the queue, so the run still completes; the commit keeps the first copy of an id, so nothing is
duplicated. A failing image is recorded in the store's failures, never fatal.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from d2r.distributed._ray import cluster_cpus
from d2r.distributed._ray import import_ray, init
from d2r.features import get_extractor
from d2r.features.config import extractor_info
from d2r.features.image import list_images
from d2r.features.store import DEFAULT_SHARD_BYTES
from d2r.features.store import FeatureStore
from d2r.features.store import ShardWriter

log = logging.getLogger(__name__)

ACTOR_PREFIX = "d2r-extract-"


class _Worker:
    """One extraction actor: an extractor and a ShardWriter into the store folder."""
    def __init__(self, features: dict, store_path: str, dim: int, shard_bytes: int, prefix: str):
        self.extractor = get_extractor(features["name"], model=features.get("model"), pca=features.get("pca"),
                                       **features.get("options", {}))
        self._new_writer = lambda: ShardWriter(store_path, dim, shard_bytes=shard_bytes, prefix=prefix)
        self.writer = self._new_writer()
        self.sent = 0  # shard records already returned
        self.buffered: list[str] = []  # ids added but not yet in a written shard

    def pid(self) -> int:
        return os.getpid()

    def run(self, batch) -> dict:
        """Extract ``batch`` [(image_id, path_or_pixels)]: ``{"shards": records written now, "failures":
        {id: reason}, "durable": ids now in written shards, "seconds": extraction time}``."""
        failures = {}
        t0 = time.perf_counter()
        for image_id, source in batch:
            try:
                feats = self.extractor.extract(source)
                self.writer.add(image_id, feats)
                self.buffered.append(image_id)
            except Exception as exc:  # one bad image never kills the batch
                failures[image_id] = f"{type(exc).__name__}: {exc}"
        return self._result(failures, time.perf_counter() - t0)

    def finish(self) -> dict:
        """Write what is buffered (the worker can go on with a fresh writer)."""
        self.writer.close()
        out = self._result({}, 0.0)
        self.writer, self.sent = self._new_writer(), 0
        return out

    def _result(self, failures: dict, seconds: float) -> dict:
        shards = self.writer.records[self.sent:]
        self.sent = len(self.writer.records)
        durable = [i for i in self.buffered if self.writer.get(i) is None]
        self.buffered = [i for i in self.buffered if self.writer.get(i) is not None]
        return {"shards": [dict(r) for r in shards], "failures": failures, "durable": durable,
                "seconds": seconds}


def _features_spec(features, model, pca, options) -> dict:
    if isinstance(features, str):
        return {"name": features, "model": None if model is None else str(model),
                "pca": None if pca is None else str(pca), "options": dict(options or {})}
    spec = features.to_dict() if hasattr(features, "to_dict") else dict(features)
    if model is not None or pca is not None or options:
        raise ValueError("give model/pca/options inside the features config, not beside it")
    return {"name": spec.get("name", "rootsift"), "model": spec.get("model"), "pca": spec.get("pca"),
            "options": dict(spec.get("options") or {})}


def _pairs(images) -> list[tuple[str, object]]:
    if isinstance(images, (str, Path)):
        pairs = list_images(images)
    else:
        pairs = []
        for item in images:
            pairs.extend([(str(item[0]), item[1])] if isinstance(item, tuple) else list_images([item]))
    seen = set()
    for image_id, _ in pairs:
        if image_id in seen:
            raise ValueError(f"image id {image_id!r} appears twice in the input")
        seen.add(image_id)
    return [(i, str(p) if isinstance(p, Path) else p) for i, p in pairs]


def extract(images, store, features="rootsift", *, model=None, pca=None, options: dict | None = None,
            address: str | None = None, workers: int | None = None, gpus_per_worker: float | None = None,
            batch_size: int = 8, shard_bytes: int | None = None, retry_failed: bool = False,
            lock_timeout: float | None = 0.0, progress: bool = True, num_cpus: int | None = None,
            max_restarts: int | None = None) -> dict:
    """Extract local features of ``images`` into the feature store ``store`` with Ray actors; resumable.

    images: a folder, list file, or iterable of paths / ``(image_id, path)`` pairs (paths readable on every
    node). features: an extractor name ("rootsift", "delf") with ``model``/``pca``/``options`` (config fields,
    e.g. ``{"max_features": 1000}``), or a :class:`~d2r.engine.FeaturesConfig` / dict. address: Ray cluster
    (None: a local Ray with ``num_cpus``). workers: actors (default: the cluster's CPUs, or GPUs ÷
    ``gpus_per_worker``). batch_size: images per task. shard_bytes: a worker writes a shard every this many
    bytes (default the store's, 256 MiB; smaller = less re-extraction after a crash, more files).
    max_restarts: dead workers replaced in one run (default ``workers``).

    The extractor is built once on the driver first (validating model and settings before any image is read
    or folder created) and once per actor. Returns ``{"images", "extracted", "skipped", "failed", "seconds",
    "store", "workers", "restarts", "worker_seconds" (extraction time summed over the workers),
    "setup_seconds" (driver: extractor check, listing, store), "driver_seconds" (driver: committing)}``.
    """
    t0 = time.perf_counter()
    spec = _features_spec(features, model, pca, options)
    for name, value in (("workers", workers), ("batch_size", batch_size), ("shard_bytes", shard_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if gpus_per_worker is not None and not 0 < float(gpus_per_worker) <= 8:
        raise ValueError(f"gpus_per_worker must be in (0, 8], got {gpus_per_worker!r}")
    import_ray()
    extractor = get_extractor(spec["name"], model=spec["model"], pca=spec["pca"], **spec["options"])
    info = extractor_info(extractor)
    pairs = _pairs(images)
    shard_bytes = int(shard_bytes or DEFAULT_SHARD_BYTES)
    ray, started = init(address, num_cpus=num_cpus)
    try:
        return _extract(ray, pairs, store, spec, info, workers, gpus_per_worker, batch_size, shard_bytes,
                        retry_failed, lock_timeout, progress, max_restarts, t0)
    finally:
        if started:
            ray.shutdown()


def _extract(ray, pairs, store, spec, info, workers, gpus_per_worker, batch_size, shard_bytes, retry_failed,
             lock_timeout, progress, max_restarts, t0) -> dict:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_worker and float(gpus_per_worker) * (workers or 1) > gpus:
        raise ValueError(f"gpus_per_worker={gpus_per_worker} × {workers or 1} worker(s) needs more GPUs than "
                         f"the Ray cluster has ({gpus:g})")
    fs = FeatureStore.create(store, info, shard_bytes=shard_bytes, lock_timeout=lock_timeout)
    setup = time.perf_counter() - t0
    driver = 0.0
    worker_seconds = 0.0
    extracted = failed = restarts = 0
    try:
        known_failures = fs.failures
        todo = [(i, p) for i, p in pairs if i not in fs and (retry_failed or i not in known_failures)]
        skipped = len(pairs) - len(todo)
        if not todo:
            return _summary(pairs, 0, skipped, 0, t0, fs, 0, 0, 0.0, setup, driver)
        import ray.exceptions as rex

        if workers is None:
            if gpus_per_worker:
                workers = max(1, int(gpus / float(gpus_per_worker)))
            else:
                workers = cluster_cpus(ray)
        workers = min(workers, len(todo))
        max_restarts = workers if max_restarts is None else int(max_restarts)
        remote = ray.remote(_Worker)
        # more workers than CPUs share them (an actor waiting for a CPU would never start)
        opts = {"num_cpus": min(1.0, cluster_cpus(ray) / workers)}
        if gpus_per_worker:
            opts["num_gpus"] = float(gpus_per_worker)
        serial = [0]

        def start():
            k = serial[0]
            serial[0] += 1
            log.debug("starting extraction worker %d", k)
            return remote.options(name=f"{ACTOR_PREFIX}{os.getpid()}-{k}", **opts).remote(
                spec, str(fs.path), fs.dim, shard_bytes, f"r{k}x")

        actors = {k: start() for k in range(workers)}
        queue = deque(todo[i:i + batch_size] for i in range(0, len(todo), batch_size))
        pending = {k: [] for k in actors}  # ids extracted by actor k, not yet in a committed shard
        by_id = dict(todo)
        inflight: dict = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"extract {spec['name']} on Ray ({workers} workers)",
                       unit="img")

        def submit(k):
            if queue and k in actors:
                batch = queue.popleft()
                inflight[actors[k].run.remote(batch)] = (k, batch)

        def commit(res):
            nonlocal driver
            c0 = time.perf_counter()
            if res["shards"] or res["failures"]:
                fs.commit([{"shards": res["shards"], "failures": res["failures"]}])
            driver += time.perf_counter() - c0

        def died(k, exc, batch=None):
            """Actor ``k`` is gone: its batch and unwritten images go back to the queue; replace it."""
            nonlocal restarts
            if batch is not None:
                queue.appendleft(batch)
            if k not in actors:  # already handled (another of its tasks failed first)
                return
            lost = pending.pop(k)
            del actors[k]
            if lost:
                queue.appendleft([(i, by_id[i]) for i in lost])
            if bar is not None:
                bar.total += len(lost) + (len(batch) if batch else 0)
                bar.refresh()
            if restarts >= max_restarts:
                why = " ".join(str(exc).split())[:300]
                raise ChildProcessError(f"Ray extraction worker died ({type(exc).__name__}: {why}); "
                                        f"{restarts} worker(s) replaced already, giving up") from None
            log.warning("extraction worker died (%s); starting another", type(exc).__name__)
            restarts += 1
            k2 = serial[0]
            actors[k2] = start()
            pending[k2] = []

        def done_with(k, res, batch=()):
            nonlocal worker_seconds, extracted, failed
            worker_seconds += res["seconds"]
            commit(res)
            durable = set(res["durable"])
            extracted += len(durable)
            pending[k] = [i for i in pending[k] if i not in durable]
            pending[k].extend(i for i, _ in batch if i not in durable and i not in res["failures"])
            failed += len(res["failures"])
            for image_id, reason in res["failures"].items():
                log.warning("%s: extraction failed: %s", image_id, reason)

        dead = (rex.RayActorError, rex.ActorUnavailableError)
        try:
            while queue:
                for k in list(actors):
                    submit(k)
                    submit(k)
                while inflight:
                    ready, _ = ray.wait(list(inflight), num_returns=1)
                    k, batch = inflight.pop(ready[0])
                    try:
                        res = ray.get(ready[0])
                    except dead as exc:
                        died(k, exc, batch)
                        for k2 in actors:  # a replacement starts working
                            if not any(v[0] == k2 for v in inflight.values()):
                                submit(k2)
                                submit(k2)
                        continue
                    done_with(k, res, batch)
                    if bar is not None:
                        bar.update(len(batch))
                    submit(k)
                for k, a in list(actors.items()):  # each worker writes the rest of its buffer
                    try:
                        done_with(k, ray.get(a.finish.remote()))
                    except dead as exc:
                        died(k, exc)
        finally:
            if bar is not None:
                bar.close()
            for a in actors.values():
                ray.kill(a)
    finally:
        fs.close()
    return _summary(pairs, extracted, skipped, failed, t0, fs, workers, restarts, worker_seconds, setup,
                    driver)


def _summary(pairs, extracted, skipped, failed, t0, fs, workers, restarts, worker_seconds, setup,
             driver) -> dict:
    return {"images": len(pairs), "extracted": extracted, "skipped": skipped, "failed": failed,
            "seconds": round(time.perf_counter() - t0, 3), "store": str(fs.path), "workers": workers,
            "restarts": restarts, "worker_seconds": round(worker_seconds, 3),
            "setup_seconds": round(setup, 3), "driver_seconds": round(driver, 3)}
