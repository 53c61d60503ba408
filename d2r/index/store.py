"""Persistence of a database folder: manifest generations, tiered merge policy, streaming merges, garbage collection.

Layout: ``manifest.json`` is the commit point (the newest generation); ``manifest-<gen>.json`` keeps the same text
for the last :data:`KEEP_GENERATIONS` generations, so a reader that read generation g finds every file of g even
after the writer committed g+1 (files are deleted only when no kept generation references them). Each manifest lists
its segments with, per file, its size and BLAKE2b-128 digest, and the removal table (bool per image) likewise.

Merges (:func:`merge`) are k-way merges of the segments' CSR posting lists, word by word, over word ranges holding
at most ``chunk_entries`` postings, appended to the output files as they are produced: memory is bounded by the
chunk (plus the per-item tables), never by the postings of the index. :class:`MergePolicy` chooses what to merge:
adjacent segments of one size tier (log_factor of their bytes over a floor), ``factor`` at a time, so every posting
is rewritten once per tier and building by many small saves writes O(n log n) bytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.index.segment import PAYLOAD, Segment, num_blocks
from d2r.storage import DamagedError, NpyWriter, RowReader, save_array
from d2r.kernels.merge import merge_postings

log = logging.getLogger(__name__)

FORMAT = "d2r-database"
FORMAT_VERSION = 3  # 3: posting item ids uint16 in blocks of 65,536 items (2: uint32)
MANIFEST = "manifest.json"
KEEP_GENERATIONS = 3  # the current one and the two before it
_GENERATION_FILE = re.compile(r"^manifest-(\d+)\.json$")


@dataclass
class MergePolicy:
    """When and how segments merge.

    factor: segments of one tier merged at a time (and the size ratio between tiers); floor_bytes: segments smaller
    than this count as this size (tiny segments merge eagerly); max_segments: above this many segments the
    ``factor`` adjacent ones of least total size merge whatever their tiers; chunk_entries: postings per merge
    chunk (bounds merge memory); spill_bytes: pending (unsaved, unsegmented) records above this become a segment.
    """

    factor: int = 10
    floor_bytes: int = 1 << 20
    max_segments: int = 64
    chunk_entries: int = 1 << 20
    spill_bytes: int = 64 << 20

    def __post_init__(self):
        if self.factor < 2 or self.max_segments < self.factor or self.chunk_entries < 1 or self.floor_bytes < 1:
            raise ValueError(f"merge policy: need factor >= 2, max_segments >= factor, chunk_entries >= 1, "
                             f"floor_bytes >= 1; got {self}")

    def tier(self, nbytes: int) -> int:
        return int(math.floor(math.log(max(nbytes, self.floor_bytes) / self.floor_bytes, self.factor) + 1e-9))

    def plan(self, sizes: list[int]) -> tuple[int, int] | None:
        """The next merge as (start, stop) over the segment list, or None. Only adjacent segments merge, so the
        order of images (ties rank by insertion) is kept."""
        f = self.factor
        tiers = [self.tier(s) for s in sizes]
        best = None
        for i in range(len(sizes) - f + 1):
            window = tiers[i:i + f]
            if min(window) == max(window) and (best is None or window[0] <= tiers[best]):
                best = i  # lowest tier, newest window
        if best is None and len(sizes) > self.max_segments:
            totals = [sum(sizes[i:i + f]) for i in range(len(sizes) - f + 1)]
            best = int(np.argmin(totals))
        return None if best is None else (best, best + f)


# ---- manifests ---------------------------------------------------------------------------------------------------
def read_manifest(path: Path, name: str = MANIFEST) -> dict:
    """Parse and check a manifest; old (version 1) manifests are converted (segments without file records)."""
    file = Path(path) / name
    if not file.is_file():
        if name == MANIFEST:
            raise FileNotFoundError(f"{path}: no d2r database here (manifest.json missing)")
        raise DamagedError(file, "missing")
    try:
        m = json.loads(file.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedError(file, f"unreadable manifest ({exc})") from None
    if m.get("format") != FORMAT:
        raise DamagedError(file, "not a d2r database manifest")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{file}: format version {m['format_version']} is newer than this d2r supports "
                         f"({FORMAT_VERSION})")
    try:
        segs = [s if isinstance(s, dict) else {"name": str(s)} for s in m["segments"]]
        for s in segs:
            if not re.fullmatch(r"seg-[0-9a-f-]+", str(s["name"])):
                raise ValueError(f"bad segment name {s['name']!r}")
        m["segments"] = segs
        if isinstance(m.get("removed"), str):
            m["removed"] = {"name": m["removed"]}
        if m.get("removed") is not None and not re.fullmatch(r"removed-[0-9a-f-]+\.npy", m["removed"]["name"]):
            raise ValueError("bad removal table name")
        int(m["generation"]), m["codebook"]["fingerprint"], dict(m["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedError(file, f"malformed manifest ({exc})") from None
    return m


def commit(path: Path, manifest: dict) -> None:
    """Write generation ``manifest["generation"]``: its own file first, then ``manifest.json`` (the commit)."""
    _io.write_json(path / f"manifest-{manifest['generation']:08d}.json", manifest)
    _io.write_json(path / MANIFEST, manifest)


def referenced(manifest: dict) -> set[str]:
    names = {s["name"] for s in manifest["segments"]}
    if manifest.get("removed"):
        names.add(manifest["removed"]["name"])
    return names


def collect_garbage(path: Path, current: dict, protect=()) -> list[str]:
    """Delete segment folders, removal tables and manifest generations that neither ``current`` nor the
    :data:`KEEP_GENERATIONS` - 1 generations before it reference (and that are not in ``protect``: the writer's
    own unsaved segments). Only the lock holder calls this. Returns the names deleted."""
    gen = int(current["generation"])
    keep = set(referenced(current)) | set(protect)
    generations = {}
    for entry in path.iterdir():
        m = _GENERATION_FILE.match(entry.name)
        if m:
            generations[int(m.group(1))] = entry.name
    for g, name in generations.items():
        if gen - KEEP_GENERATIONS < g < gen:
            try:
                keep |= referenced(read_manifest(path, name))
            except (ValueError, OSError):  # a damaged old generation: keep everything this time
                return []
    deleted = []
    for entry in path.iterdir():
        m = _GENERATION_FILE.match(entry.name)
        stale_manifest = m is not None and int(m.group(1)) <= gen - KEEP_GENERATIONS
        ours = entry.name.startswith(("seg-", "removed-", ".seg-"))
        if (ours and entry.name not in keep) or stale_manifest:
            try:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                deleted.append(entry.name)
            except OSError as exc:
                log.debug("could not remove %s: %s", entry, exc)
    return deleted


# ---- streaming merge -----------------------------------------------------------------------------------------------
class _Rows:
    """Row ranges of a segment's posting arrays: read from its files (no mmap) when written, else sliced."""

    def __init__(self, seg: Segment, root: Path | None, kernel: str):
        self.seg = seg
        self.readers = {}
        if seg.name is not None and root is not None:
            keys = (PAYLOAD[kernel],) if kernel == "vlad" else ("items", PAYLOAD[kernel])
            for key in keys:
                self.readers[key] = RowReader(root / seg.name / f"{key}.npy")

    def get(self, key: str, start: int, stop: int) -> np.ndarray:
        if key in self.readers:
            return self.readers[key].read(start, stop)
        return np.asarray((self.seg.items if key == "items" else self.seg.payload)[start:stop])

    def close(self):
        for r in self.readers.values():
            r.close()


class _ArraySink:
    """In-memory twin of :class:`NpyWriter` (merges of a database that lives in memory)."""

    def __init__(self, shape, dtype):
        self.array = np.empty(shape, dtype)
        self.rows = 0

    def write(self, rows):
        self.array[self.rows:self.rows + rows.shape[0]] = rows
        self.rows += rows.shape[0]

    def close(self):
        return {}


def merge(segments: list[Segment], removed: list[np.ndarray], kernel: str, num_words: int, dim: int,
          mode: str, chunk_entries: int, root: Path | None = None, name: str | None = None,
          stats: dict | None = None) -> Segment:
    """Merge ``segments`` (in order) into one, dropping the images flagged in ``removed`` (one (I_s,) bool per
    segment). Written to ``root/name`` (temp folder renamed into place) when ``root`` is given, else in memory.
    ``stats["max_chunk_entries"]`` receives the largest posting chunk held at once."""
    item_maps, ids, ii, ir, iw = [], [], [], [], []
    next_item = next_image = 0
    for s, rem in zip(segments, removed):
        live_img = ~np.asarray(rem, bool)
        item_img = np.asarray(s.item_image, np.int64)
        live_item = live_img[item_img]
        nlive = int(live_item.sum())
        m = np.full(s.num_items, -1, np.int64)
        m[live_item] = np.arange(next_item, next_item + nlive)
        item_maps.append(m)
        new_img = np.cumsum(live_img) - 1 + next_image
        ii.append(new_img[item_img[live_item]].astype(np.int32))
        ir.append(np.asarray(s.item_region)[live_item])
        iw.append(np.asarray(s.item_words)[live_item])
        ids.append(np.asarray(s.image_ids)[live_img])
        next_item += nlive
        next_image += int(live_img.sum())
    tables = {"image_ids": _concat(ids, "<U1"), "item_image": _concat(ii, np.int32),
              "item_region": _concat(ir, np.int32), "item_words": _concat(iw, np.uint32)}
    payload_key = PAYLOAD[kernel]
    tmp = None
    if root is not None:
        tmp = root / f".{name}.tmp"
        tmp.mkdir(parents=True, exist_ok=False)

    def sink(key, shape, dtype):
        return NpyWriter(tmp / f"{key}.npy", shape, dtype) if tmp is not None else _ArraySink(shape, dtype)

    sources = [_Rows(s, root, kernel) for s in segments]
    files, arrays = {}, dict(tables)
    biggest = 0
    try:
        for key, value in tables.items():
            if tmp is not None:
                files[f"{key}.npy"] = save_array(tmp / f"{key}.npy", value)
        width = (dim + 7) // 8 if kernel == "asmk_star" else dim if kernel == "asmk" else num_words * dim
        pdtype = np.uint8 if kernel == "asmk_star" else np.float32
        if kernel == "vlad":
            out = sink(payload_key, (next_item, width), pdtype)
            step = max(1, chunk_entries // max(1, width // 16))
            for src, m in zip(sources, item_maps):
                for a in range(0, m.shape[0], step):
                    keep = m[a:a + step] >= 0
                    rows = src.get(payload_key, a, min(a + step, m.shape[0]))
                    biggest = max(biggest, rows.shape[0])
                    out.write(rows[keep])
            outs = {payload_key: out}
        else:
            total_entries = int(tables["item_words"].astype(np.int64).sum())
            seg_blocks = np.array([s.blocks for s in segments], np.int64)
            offs = [np.asarray(s.offsets) for s in segments]  # memory maps: only chunks are read
            word_offs = [np.asarray(off[::nb], np.int64) for off, nb in zip(offs, seg_blocks)]  # (K+1,) each
            total = np.sum(word_offs, axis=0) if word_offs else np.zeros(num_words + 1, np.int64)
            item_map = _concat(item_maps, np.int64)
            item_base = np.cumsum([0] + [m.shape[0] for m in item_maps[:-1]]).astype(np.int64)
            out_blocks = num_blocks(next_item)
            wide = any(s.items.dtype == np.uint32 for s in segments)  # a segment of format version 2
            ids_dtype = np.uint32 if wide else np.uint16
            outs = {"items": sink("items", (total_entries,), np.uint16),
                    payload_key: sink(payload_key, (total_entries, width), pdtype)}
            counts = np.zeros(num_words * out_blocks + 1, np.int64)
            w0 = 0
            while w0 < num_words:
                w1 = int(np.searchsorted(total, total[w0] + chunk_entries, side="right")) - 1
                w1 = min(max(w1, w0 + 1), num_words)
                seg_off, seg_start, items, payload, base, start = [], [], [], [], 0, 0
                for src, off, woff, nb in zip(sources, offs, word_offs, seg_blocks):
                    a, b = int(woff[w0]), int(woff[w1])
                    seg_off.append(np.asarray(off[w0 * nb:w1 * nb + 1], np.int64) - a + base)
                    seg_start.append(start)
                    start += seg_off[-1].shape[0]
                    items.append(src.get("items", a, b))
                    payload.append(src.get(payload_key, a, b))
                    base += b - a
                seg_off = _concat(seg_off, np.int64)
                items = _concat([i.astype(ids_dtype, copy=False) for i in items], ids_dtype)
                payload = np.concatenate(payload) if payload else np.zeros((0, width), pdtype)
                biggest = max(biggest, base)
                out_items = np.empty(base, np.uint16)
                out_payload = np.empty((base, width), pdtype)
                n = merge_postings(seg_off, np.array(seg_start, np.int64), seg_blocks, items, payload,
                                   item_map, item_base, out_items, out_payload,
                                   counts[w0 * out_blocks + 1:w1 * out_blocks + 1], out_blocks)
                outs["items"].write(out_items[:n])
                outs[payload_key].write(out_payload[:n])
                w0 = w1
            offsets = np.cumsum(counts)
            if offsets[-1] != total_entries:
                raise DamagedError(root or "<memory>", f"merge: {offsets[-1]} postings of live items, but their "
                                   f"word counts say {total_entries} (a segment's item_words.npy is wrong)")
            arrays["offsets"] = offsets
            if tmp is not None:
                files["offsets.npy"] = save_array(tmp / "offsets.npy", offsets)
        for key, out in outs.items():
            if tmp is not None:
                files[f"{key}.npy"] = out.close()
            else:
                arrays[key] = out.array
    except BaseException:
        if tmp is not None:
            for w in locals().get("outs", {}).values():
                if isinstance(w, NpyWriter) and not w._f.closed:
                    w._f.close()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for src in sources:
            src.close()
    if stats is not None:
        stats["max_chunk_entries"] = max(stats.get("max_chunk_entries", 0), biggest)
    if tmp is None:
        return Segment(arrays["image_ids"], arrays["item_image"], arrays["item_region"], arrays["item_words"],
                       arrays.get("offsets"), arrays.get("items"), arrays[payload_key])
    _io.fsync_dir(tmp)
    os.replace(tmp, root / name)
    _io.fsync_dir(root)
    record = {"name": name, "images": next_image, "items": next_item,
              "entries": 0 if kernel == "vlad" else int(arrays["offsets"][-1]), "files": files}
    return Segment.read(root, record, kernel, mode, num_words, dim)


def _concat(parts, dtype) -> np.ndarray:
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return np.zeros(0, dtype)
    return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
