"""``d2r extract``: images → features → a feature store (moved here unchanged from the old
``d2r/features/store.py``; the one extraction loop of ``d2r/build.py`` replaces this module)."""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from d2r.features.config import extractor_info
from d2r.features.image import list_images
from d2r.features.store.format import DEFAULT_SHARD_BYTES
from d2r.features.store.store import FeatureStore

log = logging.getLogger(__name__)


def extract_to_store(
    images,
    extractor,
    store_path,
    region_fn=None,
    progress: bool = True,
    workers: int | None = None,
    shard_size: int | None = None,
    retry_failed: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    lock_timeout: float | None = 0.0,
) -> dict:
    """Extract features of ``images`` into the store at ``store_path``; resumable.

    Args:
        images: a folder or list file (see :func:`d2r.features.image.list_images`), or an iterable of paths or
            ``(image_id, path_or_array)`` pairs.
        extractor: has ``extract(image) -> LocalFeatures``, ``name``, ``dim``, ``fingerprint()``.
        region_fn: optional ``region_fn(image_id, source, extractor) -> RegionFeatures`` used instead of
            ``extractor.extract`` (e.g. detector boxes → re-extraction on crops).
        workers: threads over images (default ``extractor.default_workers`` or 1).
        shard_bytes: a shard is written (and committed) every ``shard_bytes`` of features; ``shard_size``
            optionally also caps the images per shard.
        retry_failed: re-attempt images listed in failures.json (default: skip them).
        lock_timeout: seconds to wait for another writer of the store (0: fail at once; None: forever).

    The writer lock is taken before any image is read. Images already in the store are skipped; an image that
    fails (corrupt file, ...) is recorded in the store's failures and the run goes on. Returns ``{"images",
    "extracted", "skipped", "failed", "seconds", "store"}``.
    """
    t0 = time.perf_counter()
    workers = int(workers or getattr(extractor, "default_workers", 1) or 1)
    if workers <= 0:
        raise ValueError(f"workers must be positive, got {workers}")
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
    store = FeatureStore.create(
        store_path,
        extractor_info(extractor),
        shard_bytes=shard_bytes,
        shard_size=shard_size,
        lock_timeout=lock_timeout,
    )
    try:
        failures = store.failures
        todo = [(i, p) for i, p in pairs if i not in store and (retry_failed or i not in failures)]
        sources = {i: str(Path(p).resolve()) for i, p in todo if isinstance(p, (str, Path))}
        skipped = len(pairs) - len(todo)

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
            for image_id, feats, error in _ordered_map(work, todo, workers):
                if error is None:
                    store.add(image_id, feats, source=sources.get(image_id))
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
    finally:
        store.close()
    return {
        "images": len(pairs),
        "extracted": extracted,
        "skipped": skipped,
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 3),
        "store": str(store.path),
    }


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
