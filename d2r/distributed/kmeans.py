"""Lloyd k-means with the assignment step on Ray workers.

The training sample is cut into contiguous partitions, one per worker actor (each keeps its partition in the
object store, so an iteration ships only the centroids). Every iteration each worker runs
:func:`d2r.train.lloyd_assign` on its partition and returns per-cluster float64 sums, counts and its inertia;
the driver adds them up and runs :func:`d2r.train.lloyd_update`. Empty clusters are re-seeded exactly as on
one machine: :func:`d2r.train.reseed_plan` says, from the global counts alone, which ranked farthest point of
which cluster each empty cluster takes; workers send their candidates (farthest first, ties by global point
index) and the driver picks the same points. Validation, initialisation, checkpoints, progress and metadata
are those of :func:`d2r.train.train_codebook`, which this calls.
"""

from __future__ import annotations

import numpy as np

from d2r._validate import as_descriptors
from d2r.distributed._ray import cluster_cpus, session


class _Partition:
    """A worker holding rows ``[start, start + n)`` of the training sample."""

    def __init__(self, x, start: int):
        self.x = x
        self.start = int(start)
        self.labels = self.sq = None

    def assign(self, centroids):
        from d2r.train import lloyd_assign

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
    """``lloyd_step(x, centroids)`` for :func:`d2r.train.train_codebook`, run by ``workers`` actors."""

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
        from d2r.train import lloyd_update, reseed_plan

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
    """:func:`d2r.train.train_codebook` (method "lloyd") with the assignment step on Ray.

    address: Ray cluster (see :func:`d2r.distributed.init`; None starts a local one with ``num_cpus``).
    workers: partitions of the sample, one actor each (default: the cluster's CPU count).
    Other keyword arguments (iterations, init, seed, checkpoint, metadata, ...) are those of
    :func:`d2r.train.train_codebook`. With the same sample, seed and initial centroids the centroids equal
    the single-machine run to float32 rounding (partial sums are added per partition). Returns
    ``(Codebook, info)``; info also holds ``workers``.
    """
    from d2r.train import train_codebook as train

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
