"""The per-image worker and the one extraction loop, which every entry point runs (``d2r extract``,
``Engine.index``, ``d2r bench``, ``train-codebook --images``, ``tools/build_codebook_recipe.py``, the Ray
workers of :mod:`d2r.distributed`); :mod:`d2r.build` writes its results into stores.

It sits here, below :mod:`d2r.codebook` and :mod:`d2r.build`, because codebook training from images runs it
and the build module runs codebook training.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

from d2r._log import progress_bar
from d2r.detect.regions import extract_regions
from d2r.features.image import load_image


def extract_image(extractor, source, proposer=None, reextract: bool = True, name: str | None = None):
    """Index-side features of one image (a path, an array or a PIL image): :class:`LocalFeatures` of the whole
    image, or :class:`RegionFeatures` (the whole image, then each box of ``proposer``, re-extracted on its
    crop unless ``reextract`` is False) when a proposer is given. Raises what reading or describing it
    raises."""
    if proposer is None:
        return extractor.extract(source)
    return extract_regions(load_image(source), extractor, proposer, reextract=reextract,
                           name=name or str(source))


def failure_line(name, reason: str) -> str:
    """``"NAME: reason"`` with NAME once: a failure reason (``"ImageError: NAME: empty file"``) usually names
    its file already."""
    name = str(name)
    return f"{name}: {reason.replace(name + ': ', '', 1)}"


def extract_each(todo, fn, workers: int = 1, progress: bool = True, desc: str = "extracting"):
    """The one extraction loop: ``fn(image_id, source)`` for each ``(image_id, source)`` of ``todo`` (a
    sequence), in ``workers`` threads (1: serial), yielding ``(image_id, source, features, error)`` in input
    order; ``error`` is None, or ``"Type: message"`` when ``fn`` raised (the features are then None and the
    loop goes on). A progress bar counts the images unless ``progress`` is off. Ctrl-C (or the consumer
    stopping) cancels the images not yet started."""
    def work(item):
        try:
            return item, fn(*item), None
        except Exception as exc:  # one bad image never kills the batch: record why and go on
            return item, None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"

    bar = progress_bar(len(todo), desc, progress)
    try:
        for (image_id, source), features, error in _ordered_map(work, todo, max(1, int(workers))):
            yield image_id, source, features, error
            bar.update(1)
    finally:
        bar.close()


def _ordered_map(fn, items, workers: int):
    """Apply ``fn`` in ``workers`` threads, yielding results in input order with a bounded window (at most
    2 × ``workers`` items started ahead); items not yet started are cancelled when the consumer stops."""
    if workers == 1:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    pending = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["extract_image", "extract_each", "failure_line"]
