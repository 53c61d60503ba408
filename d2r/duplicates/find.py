"""Groups of near-duplicates among images: Goldberg signatures, pairs by the signature index (candidates by
shared words, exact distance below the threshold), an optional second opinion by an engine's search with
geometric verification for the images the signatures left unpaired (crops, strong edits), connected components
of the pairs as groups, and a results page.

One entry point: :func:`find_duplicates` (a :class:`DuplicatesReport`); :func:`write_page` writes its HTML.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from tqdm import tqdm

from d2r import _io
from d2r.duplicates.index import SignatureIndex
from d2r.duplicates.signature import DEFAULT, SignatureConfig, signature_of_pixels
from d2r.features.image import load_image

log = logging.getLogger(__name__)

THUMB_SIDE = 160


@dataclass
class Pair:
    """Two near-duplicate images: ``a`` and ``b`` their ids (a listed first), ``rule`` what paired them:
    "signature" (``distance``: the normalised signature distance, below the threshold) or "verified" (the
    engine's search found b for a, or a for b, with ``inliers`` >= its ``rerank.min_inliers``)."""
    a: str
    b: str
    rule: str
    distance: float | None = None
    inliers: int | None = None


@dataclass
class DuplicatesReport:
    """images: (id, path) of every image looked at, in order; groups: lists of ids (each ≥ 2, connected by
    pairs), largest first; pairs; failures: (id, path, error) of the images that could not be read;
    parameters: threshold, signature config, second-opinion rule; seconds: wall time per stage."""
    images: list
    groups: list
    pairs: list
    failures: list
    parameters: dict
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        path = dict(self.images)
        return {"parameters": self.parameters, "images": len(self.images),
                "groups": [{"images": [{"id": i, "path": str(path[i])} for i in g],
                            "pairs": [asdict(p) for p in self.pairs if p.a in g]} for g in self.groups],
                "pairs": [asdict(p) for p in self.pairs],
                "failures": [{"id": i, "path": str(p), "error": e} for i, p, e in self.failures],
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def compute_signatures(images, config: SignatureConfig = DEFAULT, progress: bool = True,
                       workers: int | None = None):
    """Signatures of (id, path) ``images``: (ids read, (n, L) int8 signatures, failures as (id, path, error)).
    An unreadable image is a failure, never the end of the run. Threads: decoding releases the GIL."""
    images = list(images)

    def one(item):
        try:
            return signature_of_pixels(load_image(item[1]), config), None
        except (OSError, ValueError, MemoryError) as exc:
            return None, " ".join(str(exc).split()) or type(exc).__name__

    ok, sigs, failures = [], [], []
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(images), desc="signatures", unit="img",
                                                   disable=not progress) as bar:
        for item, (sig, error) in zip(images, pool.map(one, images)):
            bar.update(1)
            if sig is None:
                failures.append((item[0], item[1], error))
            else:
                ok.append(item[0])
                sigs.append(sig)
    return ok, np.stack(sigs) if sigs else np.zeros((0, config.length), np.int8), failures


def group_pairs(ids: list, pairs: list) -> list:
    """Connected components (≥ 2 images) of ``pairs`` over ``ids``: lists of ids in the order of ``ids``,
    largest group first, then by its first image."""
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for p in pairs:
        ra, rb = root(p.a), root(p.b)
        if ra != rb:
            parent[max(ra, rb, key=ids.index)] = min(ra, rb, key=ids.index)
    groups: dict = {}
    for i in ids:
        groups.setdefault(root(i), []).append(i)
    order = {i: k for k, i in enumerate(ids)}
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), order[g[0]]))


def find_duplicates(images, threshold: float | None = None, config: SignatureConfig = DEFAULT,
                    engine=None, second_opinion: bool = False, progress: bool = True,
                    workers: int | None = None) -> DuplicatesReport:
    """Near-duplicate groups among (id, path) ``images``.

    threshold: pairs with a normalised signature distance below it (default: the config's, image-match's 0.45);
    engine, second_opinion: with an :class:`~d2r.engine.Engine` whose index holds these ids, each image no
    signature pair reached is searched (ASMK* + geometric verification) and paired with the images of this set
    it finds with at least ``rerank.min_inliers`` inliers."""
    threshold = config.threshold if threshold is None else float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    images = list(images)
    seconds = {}
    t = time.perf_counter()
    ids, sigs, failures = compute_signatures(images, config, progress, workers)
    seconds["signatures"] = time.perf_counter() - t
    t = time.perf_counter()
    index = SignatureIndex(config)
    index.add(np.arange(len(ids), dtype=np.int64), sigs)
    a, b, d = index.pairs(threshold)
    pairs = [Pair(ids[i], ids[j], "signature", distance=round(float(x), 6)) for i, j, x in
             zip(a.tolist(), b.tolist(), d.tolist())]
    seconds["pairs"] = time.perf_counter() - t
    parameters = {"threshold": threshold, "signature": asdict(config), "second_opinion": None}
    if engine is not None and second_opinion:
        t = time.perf_counter()
        min_inliers = int(engine.config.rerank.min_inliers)
        parameters["second_opinion"] = {"engine": str(engine.path), "rule": f"verified inliers >= {min_inliers}",
                                        "min_inliers": min_inliers}
        pairs += _verified_pairs(engine, images, ids, pairs, min_inliers, progress)
        seconds["second_opinion"] = time.perf_counter() - t
    order = {i: k for k, i in enumerate(ids)}
    groups = group_pairs(ids, pairs)
    pairs.sort(key=lambda p: (order[p.a], order[p.b]))
    return DuplicatesReport(images, groups, pairs, failures, parameters, seconds)


def _verified_pairs(engine, images, ids, pairs, min_inliers, progress) -> list:
    """Pairs found by the engine's verified search for the images no signature pair reached."""
    paired = {p.a for p in pairs} | {p.b for p in pairs}
    path = dict(images)
    order = {i: k for k, i in enumerate(ids)}
    alone = [i for i in ids if i not in paired and i in engine]
    found: dict = {}
    results = []
    with tqdm(total=len(alone), desc="second opinion", unit="img", disable=not progress) as bar:
        for k in range(0, len(alone), 16):  # batches: the bar moves while the threads search
            results += engine.search_batch([path[i] for i in alone[k:k + 16]], top_k=10)
            bar.update(len(alone[k:k + 16]))
    for i, hits in zip(alone, results):
        if isinstance(hits, Exception):
            log.warning("%s: second opinion failed: %s", path[i], hits)
            continue
        for h in hits:
            if h.image_id != i and h.image_id in order and h.inliers >= min_inliers:
                a, b = sorted((i, h.image_id), key=order.get)
                found[(a, b)] = max(found.get((a, b), 0), int(h.inliers))
    return [Pair(a, b, "verified", inliers=n) for (a, b), n in found.items()]


# ---- results page ------------------------------------------------------------------------------------------
def _thumbnail(path) -> str:
    """A data: URI of a small JPEG of the image ('' when unreadable): the page needs no other file."""
    try:
        a = load_image(path, max_side=THUMB_SIDE)
    except (OSError, ValueError):
        return ""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(a, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def write_page(report: DuplicatesReport, path) -> None:
    """An HTML page of the groups (thumbnails embedded, each pair's rule and distance or inliers) and the
    failures, written atomically to ``path``."""
    source = dict(report.images)
    rows = []
    for k, g in enumerate(report.groups, 1):
        cells = "".join(f'<figure><img src="{_thumbnail(source[i])}"><figcaption>{html.escape(i)}</figcaption>'
                        f'</figure>' for i in g)
        members = set(g)
        lines = "".join(f"<li>{html.escape(p.a)} ~ {html.escape(p.b)}: "
                        + (f"distance {p.distance:.3f} (signature)" if p.rule == "signature"
                           else f"{p.inliers} inliers (verified)") + "</li>"
                        for p in report.pairs if p.a in members)
        rows.append(f"<h2>group {k}: {len(g)} images</h2><div class='row'>{cells}</div><ul>{lines}</ul>")
    fails = "".join(f"<li>{html.escape(str(p))}: {html.escape(e)}</li>" for _, p, e in report.failures)
    th = report.parameters["threshold"]
    page = f"""<!doctype html><meta charset="utf-8"><title>d2r duplicates</title>
<style>body{{font-family:sans-serif}} .row{{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}}
figure{{margin:0;width:{THUMB_SIDE}px;border:2px solid #888}} img{{width:100%;display:block}}
figcaption{{font-size:11px;word-break:break-all}} li{{font-size:12px}}</style>
<h1>d2r duplicates</h1>
<p>{len(report.groups)} groups of near-duplicates among {len(report.images)} images (Goldberg signature,
normalised distance below {th}{"; second opinion: " + html.escape(report.parameters["second_opinion"]["rule"])
                               if report.parameters.get("second_opinion") else ""}).</p>
{''.join(rows) or '<p>No near-duplicates.</p>'}
{f'<h2>unreadable images</h2><ul>{fails}</ul>' if fails else ''}"""
    _io.write_bytes(path, page.encode())
