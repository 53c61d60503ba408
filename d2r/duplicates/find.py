"""Groups of near-duplicates among images: Goldberg signatures, pairs by the signature index (candidates by
shared words, exact distance below the threshold), an optional second opinion by an engine's search with
geometric verification for the images the signatures left unpaired (crops, strong edits), connected components
of the pairs as groups, and a results page.

One entry point: :func:`find_duplicates` (a :class:`DuplicatesReport`); :func:`write_page` writes its HTML.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from d2r import _io
from d2r.duplicates.index import SignatureIndex
from d2r.duplicates.signature import DEFAULT, SignatureConfig, signature_of_pixels
from d2r.features.image import load_image
from d2r.storage import MANIFEST

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

    def describe(self) -> str:
        """What joined the pair, in words: "distance 0.123 (signature)" or "57 inliers (verified)"."""
        how = f"distance {self.distance:.3f}" if self.rule == "signature" else f"{self.inliers} inliers"
        return f"{how} ({self.rule})"


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

    def pairs_by_group(self) -> list[list[Pair]]:
        """The pairs of each group (in ``groups`` order), each list in ``pairs`` order: both ids of a pair are
        in one group, so one pass over the pairs."""
        group_of = {i: k for k, g in enumerate(self.groups) for i in g}
        out: list[list[Pair]] = [[] for _ in self.groups]
        for p in self.pairs:
            out[group_of[p.a]].append(p)
        return out

    def to_dict(self) -> dict:
        path = dict(self.images)
        return {"parameters": self.parameters, "images": len(self.images),
                "groups": [{"images": [{"id": i, "path": str(path[i])} for i in g],
                            "pairs": [asdict(p) for p in pairs]}
                           for g, pairs in zip(self.groups, self.pairs_by_group())],
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
    order = {i: k for k, i in enumerate(ids)}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for p in pairs:
        ra, rb = root(p.a), root(p.b)
        if ra != rb:
            parent[max(ra, rb, key=order.get)] = min(ra, rb, key=order.get)  # the first image is the root
    groups: dict = {}
    for i in ids:
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), order[g[0]]))


def id_key(image_id: str, path=None) -> int:
    """The int64 key of an image in a kept signature index: BLAKE2b-64 of its id's UTF-8 bytes and, with
    ``path``, of the file's size and modification time, so a file replaced under the same id is a new key (its
    old signature leaves the index as unlisted, the new file is read)."""
    text = str(image_id)
    if path is not None:
        try:
            st = os.stat(path)
            text += f"\0{st.st_size}\0{st.st_mtime_ns}"
        except OSError:  # unreadable: keyed by the id alone, its read fails and is reported
            pass
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _keys(images) -> np.ndarray:
    keys = np.array([id_key(i, path) for i, path in images], np.int64)
    if np.unique(keys).size != keys.size:  # 2**-64 per pair: refuse rather than mix two images up
        raise ValueError("two image ids share a signature-index key; run without a kept index")
    return keys


def kept_pairs(path, images, threshold: float, config: SignatureConfig = DEFAULT, progress: bool = True,
               workers: int | None = None):
    """Signature pairs among (id, path) ``images`` through the signature index kept at ``path`` (created when
    absent; its writer lock held meanwhile): only the images it does not hold yet (by id, file size and mtime:
    :func:`id_key`) are read, those no longer listed are removed, the result is saved, then its pairs are searched. Returns (ids read or held, in the
    order of ``images``; pairs as (id_a, id_b, distance); failures; number of images read)."""
    images = list(images)
    keys = _keys(images)
    path = Path(path)
    index = (SignatureIndex.open(path, writable=True) if (path / MANIFEST).exists()
             else SignatureIndex.create(path, config, metadata={"ids": "BLAKE2b-64 of the image id, file size and mtime"}))
    try:
        if index.config != config:
            raise ValueError(f"{path}: kept signatures were computed with other parameters ({index.config})")
        held = index.ids()
        listed = set(keys.tolist())
        stale = [k for k in held.tolist() if k not in listed]
        if stale:
            index.remove(stale)
        have = set(held.tolist()) - set(stale)
        todo = [(item, k) for item, k in zip(images, keys.tolist()) if k not in have]
        new_ids, new_sigs, failures = compute_signatures([item for item, _ in todo], config, progress, workers)
        key_of = {item[0]: k for item, k in todo}
        index.add(np.array([key_of[i] for i in new_ids], np.int64), new_sigs)
        if stale or new_ids:
            index.save()
        a, b, d = index.pairs(threshold)
    finally:
        index.close()
    id_of = dict(zip(keys.tolist(), (i for i, _ in images)))
    failed = {i for i, _, _ in failures}
    pairs = [(id_of[x], id_of[y], z) for x, y, z in zip(a.tolist(), b.tolist(), d.tolist())]
    return [i for i, _ in images if i not in failed], pairs, failures, len(todo)


def find_duplicates(images, threshold: float | None = None, config: SignatureConfig = DEFAULT,
                    engine=None, second_opinion: bool = False, progress: bool = True,
                    workers: int | None = None, keep=None) -> DuplicatesReport:
    """Near-duplicate groups among (id, path) ``images``.

    threshold: pairs with a normalised signature distance below it (default: the config's, image-match's 0.45);
    engine, second_opinion: with an :class:`~d2r.engine.Engine` whose index holds these ids, each image no
    signature pair reached is searched (ASMK* + geometric verification) and paired with the images of this set
    it finds with at least ``rerank.min_inliers`` inliers; keep: a folder for a kept signature index
    (:func:`kept_pairs`: later runs read only new images)."""
    threshold = config.threshold if threshold is None else float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    images = list(images)
    seconds = {}
    t = time.perf_counter()
    if keep is not None:  # the kept index: signatures of new images only, its own search
        ids, found, failures, read = kept_pairs(keep, images, threshold, config, progress, workers)
        seconds["signatures_and_pairs"] = time.perf_counter() - t
    else:
        ids, sigs, failures = compute_signatures(images, config, progress, workers)
        read = len(images)
        seconds["signatures"] = time.perf_counter() - t
        t = time.perf_counter()
        index = SignatureIndex(config)
        index.add(np.arange(len(ids), dtype=np.int64), sigs)
        a, b, d = index.pairs(threshold)
        found = [(ids[i], ids[j], x) for i, j, x in zip(a.tolist(), b.tolist(), d.tolist())]
        seconds["pairs"] = time.perf_counter() - t
    order = {i: k for k, i in enumerate(ids)}
    pairs = [Pair(*sorted((x, y), key=order.get), "signature", distance=round(float(z), 6)) for x, y, z in found]
    parameters = {"threshold": threshold, "signature": asdict(config), "second_opinion": None,
                  "kept_index": None if keep is None else str(keep), "images_read": read}
    if engine is not None and second_opinion:
        t = time.perf_counter()
        min_inliers = int(engine.config.rerank.min_inliers)
        parameters["second_opinion"] = {"engine": str(engine.path), "rule": f"verified inliers >= {min_inliers}",
                                        "min_inliers": min_inliers}
        pairs += _verified_pairs(engine, images, ids, pairs, min_inliers, progress)
        seconds["second_opinion"] = time.perf_counter() - t
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
    for k, (g, pairs) in enumerate(zip(report.groups, report.pairs_by_group()), 1):
        cells = "".join(f'<figure><img src="{_thumbnail(source[i])}"><figcaption>{html.escape(i)}</figcaption>'
                        f'</figure>' for i in g)
        lines = "".join(f"<li>{html.escape(p.a)} ~ {html.escape(p.b)}: {p.describe()}</li>" for p in pairs)
        rows.append(f"<h2>group {k}: {len(g)} images</h2><div class='row'>{cells}</div><ul>{lines}</ul>")
    fails = "".join(f"<li>{html.escape(str(p))}: {html.escape(e)}</li>" for _, p, e in report.failures)
    th = report.parameters["threshold"]
    page = f"""<!doctype html><meta charset="utf-8"><title>d2r duplicates</title>
<style>body{{font-family:sans-serif}} .row{{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0}}
figure{{margin:0;width:{THUMB_SIDE}px;border:2px solid #888}} img{{width:100%;display:block}}
figcaption{{font-size:11px;word-break:break-all}} li{{font-size:12px}}</style>
<h1>d2r duplicates</h1>
<p>{len(report.groups)} group(s) of near-duplicates among {len(report.images)} images (Goldberg signature,
normalised distance below {th}{"; second opinion: " + html.escape(report.parameters["second_opinion"]["rule"])
                               if report.parameters.get("second_opinion") else ""}).</p>
{''.join(rows) or '<p>No near-duplicates.</p>'}
{f'<h2>unreadable images</h2><ul>{fails}</ul>' if fails else ''}"""
    _io.write_bytes(path, page.encode())
