"""Lloyd k-means with the assignment step on Ray workers.

The training sample is cut into contiguous partitions, one per worker actor (each keeps its partition in the
object store, so an iteration ships only the centroids). Every iteration each worker runs
:func:`d2r.codebook.kmeans.lloyd_assign` on its partition and returns per-cluster float64 sums, counts and its inertia;
the driver adds them up and runs :func:`d2r.codebook.kmeans.lloyd_update`. Empty clusters are re-seeded exactly as on
one machine: :func:`d2r.codebook.kmeans.reseed_plan` says, from the global counts alone, which ranked farthest point of
which cluster each empty cluster takes; workers send their candidates (farthest first, ties by global point
index) and the driver picks the same points. Validation, initialisation, checkpoints, progress and metadata
are those of :func:`d2r.codebook.kmeans.train_codebook`, which this calls.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from d2r._validate import as_descriptors
from d2r.distributed._ray import cluster_cpus, session
from d2r.codebook import train_codebook as train
from d2r.codebook.kmeans import _descriptors_of, sample_image
from d2r.codebook.kmeans import image_quota
from d2r.codebook.kmeans import lloyd_assign
from d2r.codebook.kmeans import lloyd_update, reseed_plan
from d2r.features import FeatureStore
from d2r.features import get_extractor

log = logging.getLogger(__name__)


class _Partition:
    """A worker holding rows ``[start, start + n)`` of the training sample."""
    def __init__(self, x, start: int):
        self.x = x
        self.start = int(start)
        self.labels = self.sq = None

    def assign(self, centroids):
        self.labels, self.sq, sums, counts = lloyd_assign(self.x, centroids)
        return sums, counts, float(self.sq.sum())

    def candidates(self, need: dict):
        """For each cluster j in ``need``, its ``need[j]`` farthest points of this partition (after the last
        :meth:`assign`): ``{j: (sq (m,) float64, global index (m,) int64, rows (m, D) float32)}``."""
        out = {}
        for j, m in need.items():
            idx = np.flatnonzero(self.labels == j)
            order = idx[np.lexsort((idx, -self.sq[idx]))][:m]
            out[j] = (self.sq[order], order + self.start, np.array(self.x[order]))
        return out


class _RayLloydStep:
    """``lloyd_step(x, centroids)`` for :func:`d2r.codebook.kmeans.train_codebook`, run by ``workers`` actors."""
    def __init__(self, ray, x: np.ndarray, partitions: int):
        n = x.shape[0]
        partitions = max(1, min(int(partitions), n))
        bounds = np.linspace(0, n, partitions + 1).astype(np.int64)
        cpus = min(1.0, cluster_cpus(ray) / partitions)
        actor = ray.remote(num_cpus=cpus)(_Partition)
        self.ray = ray
        self.workers = [actor.remote(ray.put(np.ascontiguousarray(x[a:b])), int(a))
                        for a, b in zip(bounds[:-1], bounds[1:])]

    def __call__(self, x, centroids):
        ray = self.ray
        ref = ray.put(centroids)
        parts = ray.get([w.assign.remote(ref) for w in self.workers])
        sums = parts[0][0].copy()
        counts = parts[0][1].copy()
        for s, c, _ in parts[1:]:  # reduced in partition order: deterministic
            sums += s
            counts += c
        value = float(sum(p[2] for p in parts))

        def reseed(new, empty):
            plan = reseed_plan(counts, empty.shape[0])
            if not plan:
                return 0
            need: dict = {}
            for j, t in plan:
                need[j] = max(need.get(j, 0), t + 1)
            found = ray.get([w.candidates.remote(need) for w in self.workers])
            for r, (j, t) in enumerate(plan):
                sq = np.concatenate([f[j][0] for f in found])
                index = np.concatenate([f[j][1] for f in found])
                rows = np.concatenate([f[j][2] for f in found])
                new[empty[r]] = rows[np.lexsort((index, -sq))[t]]
            return len(plan)

        new, repaired, changed = lloyd_update(centroids, sums, counts, reseed)
        return new, value, repaired, changed

    def close(self):
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []


def train_codebook(descriptors, k: int, *, address: str | None = None, workers: int | None = None,
                   num_cpus: int | None = None, **kwargs):
    """:func:`d2r.codebook.kmeans.train_codebook` (method "lloyd") with the assignment step on Ray.

    address: Ray cluster (see :func:`d2r.distributed.init`; None starts a local one with ``num_cpus``).
    workers: partitions of the sample, one actor each (default: the cluster's CPU count).
    Other keyword arguments (iterations, init, seed, checkpoint, metadata, ...) are those of
    :func:`d2r.codebook.kmeans.train_codebook`. With the same sample, seed and initial centroids the centroids equal
    the single-machine run to float32 rounding (partial sums are added per partition). Returns
    ``(Codebook, info)``; info also holds ``workers``.
    """
    if kwargs.get("method", "lloyd") != "lloyd":
        raise ValueError(f"distributed training runs method 'lloyd', not {kwargs['method']!r}")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    x = as_descriptors(descriptors, name="descriptors")
    with session(address, num_cpus=num_cpus) as ray:
        step = _RayLloydStep(ray, x, workers or cluster_cpus(ray))
        used = len(step.workers)
        try:
            book, info = train(x, k, lloyd_step=step, **kwargs)
        finally:
            step.close()
    info["workers"] = used
    book.metadata["distributed"] = "ray"
    return book, info


# ---- descriptor sampling on workers ---------------------------------------------------------------------
class _Sampler:
    """A worker sampling images of a feature store (``store``) or extracted on the fly (``features`` spec)."""
    def __init__(self, store=None, features=None):
        self.store = self.extractor = None
        if store is not None:
            self.store = FeatureStore.open(store)
        else:
            self.extractor = get_extractor(features["name"], model=features.get("model"),
                                           pca=features.get("pca"), **features.get("options", {}))

    def sample(self, block, quota: int, seed: int):
        """``block`` [(position i, image_id, path_or_None)] → [(i, image_id, seen descriptors, sample or None,
        error or None)], sampled as :func:`d2r.codebook.kmeans.sample_descriptors` samples image number i."""
        out = []
        for i, image_id, source in block:
            try:
                feats = self.store.get(image_id) if self.store is not None else self.extractor.extract(source)
            except Exception as exc:  # an image that fails is reported, never fatal
                if self.store is not None:
                    raise
                out.append((i, image_id, 0, None, f"{type(exc).__name__}: {exc}"))
                continue
            desc = _descriptors_of(feats, name=f"descriptors of image {image_id!r}")
            out.append((i, image_id, int(desc.shape[0]), sample_image(desc, quota, seed, i), None))
        return out


def sample_descriptors(source, per_image: int = 300, max_total: int = 1_000_000, seed: int = 0,
                       progress: bool = True, *, features: dict | None = None, address: str | None = None,
                       workers: int | None = None, block: int = 64):
    """:func:`d2r.codebook.kmeans.sample_descriptors` on Ray workers: each samples blocks of images (read from the
    store, or extracted with the ``features`` spec {name, model, pca, options} when ``source`` is a list of
    ``(image_id, path)``), the driver puts the samples together in image order. The same seed gives the same
    sample as on one machine (for up to 2·``max_total`` images; one machine compacts beyond that).
    Returns ``(x float32 (n, D), info)``; info as :func:`d2r.codebook.kmeans.sample_descriptors`, plus ``failed``
    (ids of images that could not be extracted)."""
    per_image, max_total = int(per_image), int(max_total)
    if per_image < 1 or max_total < 1:
        raise ValueError(f"per_image and max_total must be ≥ 1, got {per_image} and {max_total}")
    if isinstance(source, (FeatureStore, str, Path)):
        store = str(source.path if isinstance(source, FeatureStore) else source)
        items = [(i, image_id, None) for i, image_id in enumerate(FeatureStore.open(store).ids())]
        init_kw = {"store": store}
    else:
        if features is None:
            raise ValueError("sampling images on Ray needs the extractor spec (features={'name': ...})")
        items = [(i, str(image_id), str(p)) for i, (image_id, p) in enumerate(source)]
        init_kw = {"features": features}
    if not items:
        raise ValueError("no descriptors found: the source is empty")
    quota = image_quota(per_image, max_total, len(items))
    blocks = [items[a:a + block] for a in range(0, len(items), block)]
    results = []
    with session(address) as ray:
        n = max(1, min(int(workers or cluster_cpus(ray)), len(blocks)))
        cpus = min(1.0, cluster_cpus(ray) / n)  # more workers than CPUs share them
        actors = [ray.remote(num_cpus=cpus)(_Sampler).remote(**init_kw) for _ in range(n)]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=f"sampling descriptors on Ray ({n} workers)", unit="img")
        try:
            queue = list(reversed(blocks))
            inflight = {}
            for a in actors * 2:
                if queue:
                    inflight[a.sample.remote(queue.pop(), quota, seed)] = a
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                a = inflight.pop(ready[0])
                got = ray.get(ready[0])
                results.extend(got)
                if bar is not None:
                    bar.update(len(got))
                if queue:
                    inflight[a.sample.remote(queue.pop(), quota, seed)] = a
        finally:
            if bar is not None:
                bar.close()
            for a in actors:
                ray.kill(a)
    results.sort(key=lambda r: r[0])
    chunks, failed, dim, seen_desc, used = [], [], None, 0, 0
    for _, image_id, count, sample, error in results:
        if error is not None:
            log.warning("%s: feature extraction failed: %s", image_id, error)
            failed.append(image_id)
            continue
        if count == 0:
            continue
        if dim is None:
            dim = sample.shape[1]
        elif sample.shape[1] != dim:
            raise ValueError(f"image {image_id!r}: descriptors have D={sample.shape[1]}, "
                             f"earlier images D={dim}")
        seen_desc += count
        used += 1
        chunks.append(sample)
    if not chunks:
        raise ValueError(f"no descriptors found ({len(items)} image(s), all empty or failed)")
    x = np.concatenate(chunks)
    if x.shape[0] > max_total:
        x = x[np.sort(np.random.default_rng([seed, 8]).choice(x.shape[0], max_total, replace=False))]
    info = {"images": len(items), "images_used": used, "descriptors_seen": seen_desc,
            "samples": int(x.shape[0]), "dim": int(dim), "failed": failed}
    return np.ascontiguousarray(x), info
