"""Codebook training: sample local descriptors, run k-means (Lloyd or mini-batch), record provenance.

The nearest-centroid step is :meth:`d2r.Codebook.assign` (BLAS shortlist + exact float64 refine); the update
step is a numba kernel (:mod:`d2r.kernels.kmeans`). Training is deterministic for a given seed, checkpoints
every iteration atomically, and a run resumed from its checkpoint ends bit-for-bit identical to an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from d2r._version import __version__
from d2r import _io
from d2r._validate import as_descriptors
from d2r.codebook.codebook import Codebook
from d2r.kernels.kmeans import assigned_sq_distances, cluster_sums, kmeanspp_steps, minibatch_update
from d2r.features import FeatureStore
from d2r.features import get_extractor, list_images
from d2r.features.base import whole_image
from d2r.features.extract import extract_each, extract_image, failure_line

log = logging.getLogger(__name__)

METHODS = ("lloyd", "minibatch")
INITS = ("auto", "k-means||", "k-means++", "random")
# k-means‖ as Bahmani et al. (VLDB 2012) ran it: 5 rounds, ℓ = 0.5·k, plain k-means++ (one draw per centre)
# to re-cluster the ≈ 2.5·k candidates. A round costs about half a Lloyd iteration (an exact assignment to the
# ≈ ℓ new candidates), the re-clustering ≈ 2.5·k²·D multiply-adds. Measured on 107k RootSIFT descriptors of the
# dev photos (benchmarks/results/kmeans.md): the seeding costs about 5 Lloyd iterations at K 1,024 and 8,192.
# scikit-learn's 2 + ln k greedy draws per centre cost the same at K 1,024 with no gain after 20 Lloyd
# iterations, and 5× the seeding time at K 8,192 (20 Lloyd iterations) for 0.6 % lower inertia: one draw.
KMEANS_PARALLEL_ROUNDS = 5
KMEANS_PARALLEL_OVERSAMPLING = 0.5
KMEANS_PARALLEL_TRIALS = 1
# What init="auto" runs, at every K. Random seeds (free) trained to the same inertia at K 1,024 but 0.46 %
# higher at K 8,192; scikit-learn's k-means++ costs ≈ 150 Lloyd iterations at K 1,024 (the old rule, k-means++ up to
# K 2,048, assumed it was cheaper than the Lloyd run there; it was 5× dearer).
AUTO_INIT = "k-means||"
CHECKPOINT_FORMAT = "d2r-kmeans-checkpoint"
CHECKPOINT_VERSION = 1


# ---- sampling --------------------------------------------------------------------------------------------
def _descriptors_of(item, name: str) -> np.ndarray:
    """Whole-image descriptors of one store item (LocalFeatures, RegionFeatures or an (N, D) array)."""
    feats = whole_image(item)  # RegionFeatures: keep the whole-image region
    desc = getattr(feats, "descriptors", feats)
    return as_descriptors(desc, name=name)


def sample_descriptors(source, per_image: int = 300, max_total: int = 1_000_000, seed: int = 0,
                       progress: bool = True):
    """Sample training descriptors: at most ``per_image`` per image, at most ``max_total`` overall.

    source: a feature store (iterating ``(image_id, LocalFeatures | RegionFeatures)``), a mapping
    ``{image_id: features}``, or a sequence of ``LocalFeatures`` / (N, D) arrays. When the number of images is
    known the per-image quota shrinks to ``max_total // images`` so every image contributes evenly.
    Returns ``(descriptors float32 (n, D), info dict)`` with images, images_used, descriptors_seen, samples,
    dim. Raises ValueError when nothing is found, dimensions differ between images, or an image has NaN
    descriptors.
    Deterministic for a given seed and source order.
    """
    per_image = int(per_image)
    max_total = int(max_total)
    if per_image < 1 or max_total < 1:
        raise ValueError(f"per_image and max_total must be ≥ 1, got {per_image} and {max_total}")
    items = source.items() if isinstance(source, dict) else source
    try:
        n_images = len(source)
    except TypeError:
        n_images = None
    quota = image_quota(per_image, max_total, n_images)
    chunks: list[np.ndarray] = []
    held = 0
    dim = None
    seen = used = total = 0
    compact_rng = np.random.default_rng([seed, 7])
    iterator = items
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(items, total=n_images, desc="sampling descriptors", unit="img")
    for i, item in enumerate(iterator):
        image_id, feats = item if isinstance(item, tuple) and len(item) == 2 else (i, item)
        desc = _descriptors_of(feats, name=f"descriptors of image {image_id!r}")
        seen += 1
        if desc.shape[0] == 0:
            continue
        if dim is None:
            dim = desc.shape[1]
        elif desc.shape[1] != dim:
            raise ValueError(f"image {image_id!r}: descriptors have D={desc.shape[1]}, "
                             f"earlier images D={dim}")
        total += desc.shape[0]
        used += 1
        desc = sample_image(desc, quota, seed, i)
        chunks.append(desc)
        held += desc.shape[0]
        if held > 2 * max_total:  # unknown length: keep memory bounded by compacting to max_total
            all_ = np.concatenate(chunks)
            chunks = [all_[np.sort(compact_rng.choice(all_.shape[0], max_total, replace=False))]]
            held = max_total
    if not chunks:
        raise ValueError(f"no descriptors found ({seen} image(s), all empty)" if seen else
                         "no descriptors found: the source is empty")
    x = np.concatenate(chunks)
    if x.shape[0] > max_total:
        x = x[np.sort(np.random.default_rng([seed, 8]).choice(x.shape[0], max_total, replace=False))]
    info = {"images": seen, "images_used": used, "descriptors_seen": total, "samples": int(x.shape[0]),
            "dim": int(dim)}
    return np.ascontiguousarray(x), info


def image_quota(per_image: int, max_total: int, n_images: int | None) -> int:
    """Descriptors sampled per image: ``per_image``, shrunk to ``max_total // n_images`` (≥ 1) when known."""
    return per_image if not n_images else min(per_image, max(1, max_total // n_images))


def sample_image(desc: np.ndarray, quota: int, seed: int, i: int) -> np.ndarray:
    """The sample of image number ``i`` (its position in the source): at most ``quota`` rows of ``desc``
    (N, D), chosen with the generator seeded ``[seed, i]``, in their original order; a float32 copy."""
    if desc.shape[0] > quota:
        desc = desc[np.sort(np.random.default_rng([seed, i]).choice(desc.shape[0], quota, replace=False))]
    return np.array(desc, dtype=np.float32, copy=True)


def _extractor_provenance(info: dict, pca_fingerprint=None) -> dict:
    # the variant where variants are other descriptor spaces (aliked-n16: d2r.features.config.feature_type)
    out = {"feature": info.get("feature_type", info.get("name")), "feature_config": info.get("config", {}),
           "feature_fingerprint": info.get("fingerprint")}
    pca = pca_fingerprint or info.get("pca_fingerprint") or (info.get("config") or {}).get("pca_fingerprint")
    if pca:
        out["pca_fingerprint"] = pca
    return out


def load_training_descriptors(*, store=None, images=None, descriptors=None, feature: str | None = None,
                              model=None, pca=None, dim: int | None = None, per_image: int = 300,
                              max_total: int = 1_000_000, seed: int = 0, progress: bool = True, sampler=None):
    """Gather training descriptors from exactly one source and describe where they came from.

    store: a feature-store folder (:class:`d2r.features.FeatureStore`); images: a folder (searched
    recursively) or a list file, features extracted on the fly with
    ``get_extractor(feature or "rootsift", model, pca)`` (an image that fails is logged and skipped);
    descriptors: an (N, D) float32 ``.npy`` file or array.
    ``feature`` / ``dim``, when given, must agree with the store's extractor / the data (else ValueError).
    sampler: replaces :func:`sample_descriptors` for a store or images source, called as ``sampler(source,
    per_image=, max_total=, seed=, progress=)`` with the open store or the ``(image_id, path)`` list; returns
    ``(x, info)`` like it (plus ``failed``, ids, for images) — :func:`d2r.distributed.sample_descriptors`.
    Returns ``(descriptors float32 (n, D), metadata dict)``: feature, feature_config, feature_fingerprint,
    pca_fingerprint (when known), training_source, training_images, training_descriptors_seen, samples.
    """
    given = [name for name, v in (("store", store), ("images", images), ("descriptors", descriptors))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of store, images, descriptors (got {given or 'none'})")
    meta: dict = {}
    if descriptors is not None:
        if isinstance(descriptors, (str, Path)):
            path = Path(descriptors)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: descriptor file not found")
            try:
                arr = np.load(path, allow_pickle=False, mmap_mode="r")
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                raise ValueError(f"{path}: not a .npy array ({exc})") from None
            if not isinstance(arr, np.ndarray):  # an .npz archive
                arr.close()
                raise ValueError(f"{path}: an .npz archive, not a .npy array")
            name = str(path)
            meta["training_source"] = str(path)
        else:
            arr, name = descriptors, "descriptors"
            meta["training_source"] = "array"
        x = as_descriptors(arr, name=name)
        if x.shape[0] == 0:
            raise ValueError(f"{name}: no descriptors (N = 0)")
        if x.shape[0] > max_total:
            x = x[np.sort(np.random.default_rng([seed, 8]).choice(x.shape[0], max_total, replace=False))]
        if feature is not None:
            meta["feature"] = feature
        meta.update(training_descriptors_seen=int(arr.shape[0]), samples=int(x.shape[0]))
    elif store is not None:
        path = Path(store)
        if not path.exists():
            raise FileNotFoundError(f"{path}: feature store not found")
        fs = FeatureStore.open(path)
        info = fs.extractor
        if feature is not None and str(info.get("name", "")).lower() != feature.lower():
            raise ValueError(f"{path}: the store holds {info.get('name')!r} features, not {feature!r}")
        if dim is not None and fs.dim != int(dim):
            raise ValueError(f"{path}: the store holds D={fs.dim} descriptors, expected D={dim}")
        if len(fs) == 0:
            raise ValueError(f"{path}: the feature store is empty")
        x, sinfo = (sampler or sample_descriptors)(fs, per_image=per_image, max_total=max_total, seed=seed,
                                                   progress=progress)
        if x.shape[1] != fs.dim:
            raise ValueError(f"{path}: manifest says D={fs.dim} but descriptors have D={x.shape[1]}")
        meta.update(_extractor_provenance(info))
        meta.update(training_source=str(path), training_images=sinfo["images_used"],
                    training_descriptors_seen=sinfo["descriptors_seen"], samples=sinfo["samples"])
    else:
        extractor = get_extractor(feature or "rootsift", model=model, pca=pca)
        pairs = list_images(images)
        if not pairs:
            raise ValueError(f"{images}: no images found")
        failed: list[str] = []

        def extracted():  # the one extraction loop (its bar is the sampling bar)
            workers = getattr(extractor, "default_workers", 1) or 1
            for image_id, p, feats, error in extract_each(pairs, lambda _, p: extract_image(extractor, p),
                                                          workers, progress=False):
                if error is None:
                    yield image_id, feats
                    continue
                log.warning("%s", failure_line(p if isinstance(p, (str, Path)) else image_id, error))
                failed.append(str(image_id))
                # keeps its place: image i is sampled with seed [seed, i] whatever fails before it
                yield image_id, np.zeros((0, extractor.dim), np.float32)

        class _Sized:  # lets sample_descriptors spread the quota evenly over the images
            def __len__(self):
                return len(pairs)

            def __iter__(self):
                return extracted()

        if sampler is not None:
            x, sinfo = sampler(pairs, per_image=per_image, max_total=max_total, seed=seed, progress=progress)
            failed.extend(sinfo.get("failed", []))
        else:
            x, sinfo = sample_descriptors(_Sized(), per_image=per_image, max_total=max_total, seed=seed,
                                          progress=progress)
        info = extractor.info() if hasattr(extractor, "info") else {
            "name": extractor.name, "config": {}, "fingerprint": extractor.fingerprint()}
        pca_obj = getattr(extractor, "pca", None)
        meta.update(_extractor_provenance(info, pca_obj.fingerprint() if pca_obj is not None else None))
        meta.update(training_source=str(images), training_images=sinfo["images_used"],
                    training_images_failed=len(failed), training_descriptors_seen=sinfo["descriptors_seen"],
                    samples=sinfo["samples"])
        if x.shape[1] != extractor.dim:
            raise ValueError(f"{extractor.name} extractor says D={extractor.dim}, "
                             f"descriptors have D={x.shape[1]}")
    if dim is not None and x.shape[1] != int(dim):
        raise ValueError(f"{meta.get('training_source')}: descriptors have D={x.shape[1]}, expected D={dim}")
    return x, meta


# ---- k-means ---------------------------------------------------------------------------------------------
def _data_hash(x: np.ndarray) -> str:
    h = hashlib.sha256(f"{x.shape[0]}x{x.shape[1]}:".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()[:16]


def _initial_centroids(x: np.ndarray, k: int, init: str, seed: int, init_sample: int,
                       progress: bool = False) -> np.ndarray:
    """The (k, D) float32 starting centroids of ``init`` ("random", "k-means||" or "k-means++") on ``x``."""
    n = x.shape[0]
    if init == "random":
        idx = np.sort(np.random.default_rng([seed, 0]).choice(n, k, replace=False))
        return x[idx].copy()
    m = min(n, max(int(init_sample), k))
    sub = x if m == n else x[np.sort(np.random.default_rng([seed, 0]).choice(n, m, replace=False))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        steps = KMEANS_PARALLEL_ROUNDS + k if init == "k-means||" else 1
        bar = tqdm(total=steps, desc=f"seeding k={k} ({init}) on {m} descriptors", unit="step")
    try:
        if init == "k-means||":
            return kmeans_parallel(sub, k, seed, bar=bar)
        from sklearn.cluster import kmeans_plusplus  # k-means++
        centers, _ = kmeans_plusplus(sub, k, random_state=np.random.RandomState(seed % (2 ** 32)))
        if bar is not None:
            bar.update(1)
        return np.ascontiguousarray(centers, dtype=np.float32)
    finally:
        if bar is not None:
            bar.close()


def kmeans_parallel(x: np.ndarray, k: int, seed: int, *, rounds: int | None = None,
                    oversampling: float | None = None, trials: int | None = None, bar=None) -> np.ndarray:
    """k-means‖ seeding (Bahmani et al., VLDB 2012): k starting centroids among the rows of ``x`` (n, D)
    float32.

    One point drawn uniformly, then ``rounds`` rounds that each add every point independently with
    probability min(1, ℓ · d²(x) / Σ d²), ℓ = ``oversampling`` · k, d² the exact (float64) squared distance to
    the nearest candidate so far (:meth:`d2r.Codebook.assign`); each candidate is weighted by the number of
    points nearest to it, and weighted k-means++ with ``trials`` draws per centre (1: plain k-means++, as in
    the paper; more: scikit-learn's greedy variant; :func:`d2r.kernels.kmeans.kmeanspp_steps`) picks the k
    centroids among the candidates. A round costs one exact assignment of the n points to ℓ words, the
    re-clustering k · trials · (≈ rounds · ℓ candidates) · D multiply-adds. When there are no more than k
    candidates (data with few distinct points) they are all kept and completed with random other rows.
    ``bar`` (tqdm) advances one step per round and per centre. Returns (k, D) float32, the same for the same
    seed and data on any machine.
    """
    n = x.shape[0]
    rounds = KMEANS_PARALLEL_ROUNDS if rounds is None else int(rounds)
    ell = (KMEANS_PARALLEL_OVERSAMPLING if oversampling is None else float(oversampling)) * k
    trials = KMEANS_PARALLEL_TRIALS if trials is None else int(trials)
    rng = np.random.default_rng([seed, 2])
    first = int(rng.integers(n))
    picked = [np.array([first], np.int64)]
    d2 = assigned_sq_distances(x, x[first:first + 1], np.zeros(n, np.int64))
    nearest = np.zeros(n, np.int64)  # candidate (position in the concatenated picks) nearest to each point
    total = 1
    for _ in range(rounds):
        u = rng.random(n)
        phi = float(d2.sum())
        new = np.flatnonzero(u * phi < ell * d2) if phi > 0 else np.empty(0, np.int64)
        if new.size:  # candidates have d² = 0 and are never drawn again
            cand = np.ascontiguousarray(x[new])
            labels = Codebook(cand).assign(x)[:, 0]
            dn = assigned_sq_distances(x, cand, labels)
            closer = dn < d2
            d2[closer] = dn[closer]
            nearest[closer] = total + labels[closer]
            picked.append(new)
            total += new.size
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{total} candidates")
    idx = np.concatenate(picked)
    if total <= k:
        rest = np.setdiff1d(np.arange(n), idx)
        idx = np.concatenate([idx, rng.choice(rest, k - total, replace=False)])
        if bar is not None:
            bar.update(k)
        return x[idx].copy()
    weights = np.bincount(nearest, minlength=total).astype(np.float64)
    points_t = np.ascontiguousarray(x[idx].T)
    uniforms = rng.random((k, trials))
    closest = np.empty(total, np.float64)
    chosen = np.empty(k, np.int64)
    if bar is not None:
        bar.set_postfix_str(f"weighted k-means++ on {total} candidates")
    step = max(1, k // 50)
    for s in range(0, k, step):
        kmeanspp_steps(points_t, weights, uniforms, closest, chosen, s, min(s + step, k))
        if bar is not None:
            bar.update(min(s + step, k) - s)
    return x[idx[chosen]].copy()


def reseed_empty(x: np.ndarray, labels: np.ndarray, sq_dist: np.ndarray, counts: np.ndarray,
                 empty: np.ndarray) -> tuple[np.ndarray, int]:
    """New positions for the ``empty`` clusters: each takes the farthest unused point of the currently largest
    cluster, whose effective size then halves (so many empties spread over many large clusters).

    x: (n, D) float32; labels (n,) int64; sq_dist (n,) float64 distance to the assigned centroid; counts (k,)
    int64. Returns ``(rows float32 (len(empty), D), repaired)``; clusters that cannot be re-seeded (no cluster
    left with ≥ 2 points) get NaN rows, which the caller keeps at their old position. Deterministic.
    """
    order = np.lexsort((-sq_dist, labels))  # by cluster, farthest first, ties by point index
    starts = np.concatenate(([0], np.cumsum(counts)))
    rows = np.full((empty.shape[0], x.shape[1]), np.nan, np.float32)
    plan = reseed_plan(counts, empty.shape[0])
    for r, (j, t) in enumerate(plan):
        rows[r] = x[order[starts[j] + t]]
    return rows, len(plan)


def reseed_plan(counts: np.ndarray, num_empty: int) -> list[tuple[int, int]]:
    """Where :func:`reseed_empty` takes its points from, knowing only the cluster sizes: one ``(cluster j,
    rank t)`` per re-seeded cluster, in order, meaning "the t-th farthest point of cluster j" (farthest first,
    ties by point index). Shorter than ``num_empty`` when no cluster with ≥ 2 points is left."""
    taken = np.zeros(counts.shape[0], np.int64)
    heap = [(-int(c), int(j)) for j, c in enumerate(counts) if c >= 2]
    heapq.heapify(heap)
    plan = []
    for _ in range(int(num_empty)):
        if not heap:
            break
        neg, j = heapq.heappop(heap)
        plan.append((j, int(taken[j])))
        taken[j] += 1
        size = (-neg) // 2
        if size >= 2 and taken[j] < counts[j] - 1:
            heapq.heappush(heap, (-size, j))
    return plan


def _apply_reseed(centroids, x, labels, sq, counts, empty) -> int:
    rows, repaired = reseed_empty(x, labels, sq, counts, empty)
    ok = ~np.isnan(rows[:, 0])
    centroids[empty[ok]] = rows[ok]
    return repaired


def _load_checkpoint(path: Path, expect: dict) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            state = {name: z[name] for name in z.files if name != "header"}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a d2r k-means checkpoint ({exc})") from None
    if header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a d2r k-means checkpoint (format {header.get('format')!r})")
    for key, value in expect.items():
        if header.get(key) != value:
            raise ValueError(f"{path}: checkpoint was written for {key}={header.get(key)!r}, this run has "
                             f"{key}={value!r}; delete the checkpoint or use the same settings and data")
    state["header"] = header
    return state


def _save_checkpoint(path: Path, expect: dict, done: int, converged: bool, centroids, counts, inertia,
                     repairs) -> None:
    header = dict(expect, format=CHECKPOINT_FORMAT, format_version=CHECKPOINT_VERSION, done=done,
                  converged=converged)
    _io.save_npz(path, header=np.array(json.dumps(header, sort_keys=True)), centroids=centroids,
                 counts=counts, inertia=np.asarray(inertia, np.float64),
                 repairs=np.asarray(repairs, np.int64))


def train_codebook(descriptors, k: int, *, iterations: int = 20, init: str = "auto", method: str = "lloyd",
                   seed: int = 0, batch_size: int | None = None, init_sample: int = 100_000, tol: float = 0.0,
                   checkpoint=None, progress: bool = True, callback=None, metadata: dict | None = None,
                   lloyd_step=None):
    """Train a ``k``-word codebook on ``descriptors`` (N, D) float32 with k-means.

    Args:
        k: number of words, 1 ≤ k ≤ N.
        iterations: Lloyd iterations, or mini-batch epochs (passes over the data). Stops earlier when the
            centroids stop changing, or when the relative inertia decrease falls below ``tol`` (> 0).
        init: "k-means||" (:func:`kmeans_parallel`), "k-means++" (scikit-learn's, slow at large k: k passes
            over the points), both on a subsample of max(``init_sample``, k) points; "random" (k distinct
            points); "auto" (:data:`AUTO_INIT`: k-means||); or a (k, D) array of initial centroids. Seeding
            shows its own progress bar, naming the number of points it looks at.
        method: "lloyd" (exact assignment + mean update; inertia never increases) or "minibatch" (Sculley's
            per-centre learning rate, batches of ``batch_size``, default max(8192, 2k)).
        checkpoint: path of an .npz written after every iteration (atomically); if it exists and matches this
            run (k, D, data, method, init, seed, batch size) training resumes from it and ends identical to an
            uninterrupted run. A mismatching checkpoint raises ValueError.
        callback: called after each iteration (and its checkpoint) with a dict (iteration, inertia,
            repaired, seconds); an exception it raises stops training and propagates.
        metadata: extra provenance stored in the codebook (feature, feature_config, pca_fingerprint, ...).
        lloyd_step: replaces the in-process Lloyd iteration, ``lloyd_step(x, centroids) -> (new centroids,
            inertia, repaired, changed)`` (:func:`d2r.distributed.train_codebook` runs it on Ray workers).

    Empty clusters are re-seeded at the farthest points of the largest clusters (:func:`reseed_empty`).
    ``inertia`` of an iteration is the sum of squared distances of the points to their nearest centroid at
    that iteration's assignment step (as faiss reports it). Returns ``(Codebook, info)``; info holds k, dim,
    samples, iterations (run in total), inertia (list per iteration), repairs, converged, seconds,
    resumed_from.
    """
    x = as_descriptors(descriptors, name="descriptors")
    n, d = x.shape
    if n == 0:
        raise ValueError("descriptors: no descriptors to train on (N = 0)")
    if d == 0:
        raise ValueError("descriptors: D = 0")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of training descriptors N={n}; sample more "
                         "descriptors or ask for fewer words")
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if lloyd_step is not None and method != "lloyd":
        raise ValueError(f"a distributed step runs method 'lloyd', not {method!r}")
    given_init = None
    if not isinstance(init, str):
        given_init = as_descriptors(init, d, name="init")
        if given_init.shape[0] != k:
            raise ValueError(f"init: expected {k} initial centroids, got {given_init.shape[0]}")
        init = "array:" + _data_hash(given_init)
    elif init not in INITS:
        raise ValueError(f"init must be one of {INITS} or a (k, D) array, got {init!r}")
    if init == "auto":
        init = AUTO_INIT
    if method == "minibatch":
        batch_size = int(batch_size) if batch_size is not None else max(8192, 2 * k)
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        batch_size = min(batch_size, n)
    else:
        batch_size = None
    seed = int(seed)

    t0 = time.perf_counter()
    expect = {"k": k, "dim": d, "samples": n, "data_hash": _data_hash(x), "method": method, "init": init,
              "seed": seed, "batch_size": batch_size, "init_sample": int(init_sample)}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    done, converged, inertia, repairs = 0, False, [], []
    counts = np.zeros(k, np.int64)
    bar = None
    if ckpt is not None and ckpt.is_file():
        state = _load_checkpoint(ckpt, expect)
        centroids = state["centroids"].copy()
        counts = state["counts"].copy()
        inertia = [float(v) for v in state["inertia"]]
        repairs = [int(v) for v in state["repairs"]]
        done, converged = int(state["header"]["done"]), bool(state["header"]["converged"])
        log.info("resuming k-means from %s after %d iteration(s)", ckpt, done)
    else:
        if given_init is not None:
            centroids = given_init.copy()
        else:
            centroids = _initial_centroids(x, k, init, seed, init_sample, progress)
        if method == "minibatch":
            centroids = centroids.astype(np.float64)
    resumed_from = done
    if progress:  # shown before the first step, which can take minutes at large K
        from tqdm.auto import tqdm
        bar = tqdm(total=iterations, initial=min(done, iterations), desc=f"k-means k={k} ({method})",
                   unit="it")
        bar.set_postfix_str(f"first iteration on {n} descriptors")
    try:
        while done < iterations and not converged:
            if method == "lloyd":
                centroids, value, repaired, changed = (lloyd_step or _lloyd_step)(x, centroids)
            else:
                value, repaired, changed = _minibatch_epoch(x, centroids, counts, batch_size, seed, done)
            done += 1
            previous = inertia[-1] if inertia else None
            inertia.append(value)
            repairs.append(repaired)
            converged = not changed or (tol > 0 and previous is not None
                                        and previous - value <= tol * abs(previous))
            if ckpt is not None:
                _save_checkpoint(ckpt, expect, done, converged, centroids, counts, inertia, repairs)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(inertia=f"{value:.6g}", repaired=repaired)
            log.debug("k-means iteration %d: inertia %.6g, %d empty cluster(s) re-seeded", done, value,
                      repaired)
            if callback is not None:
                callback({"iteration": done, "inertia": value, "repaired": repaired,
                          "seconds": time.perf_counter() - t0})
    finally:
        if bar is not None:
            bar.close()

    seconds = time.perf_counter() - t0
    meta = {
        "tool": "d2r.codebook.train_codebook",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "method": method,
        "init": init,
        "iterations": done,
        "iterations_requested": iterations,
        "converged": converged,
        "inertia": inertia[-1] if inertia else None,
        "inertia_history": inertia,
        "training_descriptors": n,
        "training_data_hash": expect["data_hash"],
    }
    if batch_size is not None:
        meta["batch_size"] = batch_size
    if metadata:
        meta.update(metadata)
    book = Codebook(centroids.astype(np.float32), meta)
    info = {"k": k, "dim": d, "samples": n, "iterations": done, "inertia": list(inertia),
            "final_inertia": inertia[-1] if inertia else None, "repairs": list(repairs),
            "converged": converged,
            "seconds": seconds, "resumed_from": resumed_from, "method": method, "init": init,
            "fingerprint": book.fingerprint}
    return book, info


def _lloyd_step(x, centroids):
    """One Lloyd iteration from float32 ``centroids``: returns (new centroids, inertia, repaired, changed)."""
    labels, sq, sums, counts = lloyd_assign(x, centroids)
    new, repaired, changed = lloyd_update(
        centroids, sums, counts, lambda new, empty: _apply_reseed(new, x, labels, sq, counts, empty))
    return new, float(sq.sum()), repaired, changed


def lloyd_assign(x, centroids):
    """Assignment step of Lloyd on (a partition of) ``x`` (n, D) float32: ``(labels (n,) int64, sq (n,)
    float64 squared distance to the assigned centroid, sums (k, D) float64, counts (k,) int64)``."""
    labels = Codebook(centroids).assign(x)[:, 0]
    sq = assigned_sq_distances(x, centroids, labels)
    sums, counts = cluster_sums(x, labels, centroids.shape[0])
    return labels, sq, sums, counts


def lloyd_update(centroids, sums, counts, reseed):
    """Update step from (reduced) ``sums``/``counts``: clusters with points move to their mean, empty ones
    are re-seeded by ``reseed(new_centroids, empty_indices) -> repaired`` (which writes the rows in place).
    Returns (new float32 centroids, repaired, changed)."""
    new = centroids.copy()
    hit = counts > 0
    new[hit] = (sums[hit] / counts[hit, None]).astype(np.float32)
    empty = np.flatnonzero(~hit)
    repaired = reseed(new, empty) if empty.size else 0
    return new, repaired, not np.array_equal(new, centroids)


def _minibatch_epoch(x, centroids, total_counts, batch_size, seed, epoch):
    """One mini-batch pass over a seeded permutation of ``x``, updating float64 ``centroids`` and
    ``total_counts`` in place: returns (summed batch inertia, repaired, changed)."""
    n = x.shape[0]
    k = centroids.shape[0]
    before = centroids.copy()
    perm = np.random.default_rng([seed, 1, epoch]).permutation(n)
    epoch_counts = np.zeros(k, np.int64)
    value = 0.0
    for start in range(0, n, batch_size):
        idx = np.sort(perm[start:start + batch_size])
        xb = x[idx]
        c32 = centroids.astype(np.float32)
        labels = Codebook(c32).assign(xb)[:, 0]
        sq = assigned_sq_distances(xb, c32, labels)
        value += float(sq.sum())
        sums, cnt = cluster_sums(xb, labels, k)
        total_counts += cnt
        epoch_counts += cnt
        minibatch_update(centroids, sums, cnt, total_counts)
    empty = np.flatnonzero(epoch_counts == 0)
    repaired = 0
    if empty.size:  # re-seed from the last batch (its labels/distances are at hand)
        rows, repaired = reseed_empty(xb, labels, sq, cnt, empty)
        ok = ~np.isnan(rows[:, 0])
        centroids[empty[ok]] = rows[ok]
        total_counts[empty[ok]] = 0
    return value, repaired, not np.array_equal(before, centroids)


__all__ = ["train_codebook", "sample_descriptors", "load_training_descriptors", "reseed_empty", "reseed_plan",
           "lloyd_assign", "lloyd_update",
           "METHODS", "INITS"]
