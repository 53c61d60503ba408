"""A segment: an immutable, memory-mappable slice of the database (CSR inverted file + item and image tables).

Files of a segment directory (all plain ``.npy``):

- ``image_ids.npy``   (I,) unicode  image ids of the segment, in insertion order
- ``item_image.npy``  (M,) int32    local image index of each item (non-decreasing)
- ``item_region.npy`` (M,) int32    region index of the item within its image (0 for a whole-image item)
- ``item_words.npy``  (M,) uint32   |W_i|, visual words the item holds (ASMK kinds)
- ASMK kinds (blocked CSR, ``blocks = max(1, ceil(M / 65536))``): ``offsets.npy`` (K·blocks+1,) int64: the
  postings of word w whose local item id lies in block b = item >> 16 are entries [offsets[w·blocks + b],
  offsets[w·blocks + b + 1]); ``items.npy`` (E,) uint16 item − b·65536, ascending within each (w, b) run (so a
  word's postings, [offsets[w·blocks], offsets[(w+1)·blocks]), are in ascending item order); then ``bits.npy``
  (E, ceil(D/8)) uint8 (ASMK*) or ``residuals.npy`` (E, D) float32 (ASMK) in the same order
- VLAD: ``vectors.npy`` (M, K·D) float32

An ASMK* posting entry costs 2 B (item id) + ceil(D/8) B (signature): 18 B for D = 128. Segments of format
version 2 (``items.npy`` uint32 full ids, (K+1,) offsets) are read as one block of full ids; merges and new
segments always write the blocked layout.

Files on disk are untrusted: :meth:`Segment.read` checks sizes against the manifest record and validates every
structural invariant the numba scans rely on (dtypes, shapes, offsets monotone and within bounds, item ids below the
item count) before an array is used; :class:`DamagedError` names the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r._io import fsync_dir
from d2r.kernels.ivf import BLOCK_BITS, check_postings
from d2r.storage import DamagedError, save_array

PAYLOAD = {"asmk_star": "bits", "asmk": "residuals", "vlad": "vectors"}


def num_blocks(num_items: int) -> int:
    """Item blocks of a segment of ``num_items`` items in the blocked CSR layout."""
    return max(1, -(-int(num_items) >> BLOCK_BITS))


def file_names(kernel: str) -> list[str]:
    """The files of a segment of this kernel."""
    names = ["image_ids", "item_image", "item_region", "item_words"]
    if kernel != "vlad":
        names += ["offsets", "items"]
    return [f"{n}.npy" for n in names + [PAYLOAD[kernel]]]


def expected_layout(kernel: str, num_words: int, dim: int) -> dict:
    """file -> (dtype, trailing shape) of a segment's arrays (leading dimension free)."""
    out = {"item_image.npy": (np.int32, ()), "item_region.npy": (np.int32, ()), "item_words.npy": (np.uint32, ())}
    if kernel == "vlad":
        out["vectors.npy"] = (np.float32, (num_words * dim,))
    else:
        out["offsets.npy"] = (np.int64, ())
        out["items.npy"] = (np.uint16, ())  # uint32 (format version 2, one block) is accepted too
        out[f"{PAYLOAD[kernel]}.npy"] = ((np.uint8, ((dim + 7) // 8,)) if kernel == "asmk_star"
                                         else (np.float32, (dim,)))
    return out


@dataclass
class Segment:
    image_ids: np.ndarray
    item_image: np.ndarray
    item_region: np.ndarray
    item_words: np.ndarray
    offsets: np.ndarray | None
    items: np.ndarray | None
    payload: np.ndarray  # bits / residuals / vectors
    name: str | None = None  # directory name once written
    files: dict = field(default_factory=dict)  # file -> {"size", "blake2b"} once written

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_image.shape[0])

    @property
    def blocks(self) -> int:
        """Item blocks of the posting layout: 1 for the previous format's uint32 full ids."""
        return 1 if self.items is None or self.items.dtype == np.uint32 else num_blocks(self.num_items)

    @property
    def num_entries(self) -> int:
        return 0 if self.items is None else int(self.items.shape[0])

    def nbytes(self) -> int:
        arrays = [self.item_image, self.item_region, self.item_words, self.payload]
        arrays += [a for a in (self.offsets, self.items) if a is not None]
        return int(sum(a.nbytes for a in arrays))

    def record(self) -> dict:
        """The manifest's entry for this (written) segment."""
        return {"name": self.name, "images": self.num_images, "items": self.num_items,
                "entries": self.num_entries, "bytes": self.nbytes(), "files": self.files}

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, kernel: str, num_words: int, dim: int, image_ids, item_image, item_region, records) -> "Segment":
        """Build from aggregated items (``records``: one :class:`~d2r.aggregate.Aggregated` per item). The pending
        images of a database are bounded (they spill), so sorting them here is bounded too."""
        image_ids = np.asarray(image_ids, dtype=str) if len(image_ids) else np.zeros(0, "<U1")
        item_image = np.asarray(item_image, np.int32)
        item_region = np.asarray(item_region, np.int32)
        m = len(records)
        if kernel == "vlad":
            vectors = np.stack([r.vector for r in records]) if m else np.zeros((0, num_words * dim), np.float32)
            return cls(image_ids, item_image, item_region, np.zeros(m, np.uint32), None, None, vectors)
        item_words = np.array([r.words.shape[0] for r in records], np.uint32)
        words = np.concatenate([r.words for r in records]) if m else np.zeros(0, np.uint32)
        item_of_entry = np.repeat(np.arange(m, dtype=np.uint32), item_words.astype(np.int64))
        field_ = "bits" if kernel == "asmk_star" else "descriptors"
        width = (dim + 7) // 8 if kernel == "asmk_star" else dim
        dtype = np.uint8 if kernel == "asmk_star" else np.float32
        payload = (np.concatenate([getattr(r, field_) for r in records]) if m else np.zeros((0, width), dtype))
        order = np.argsort(words, kind="stable")  # by word, items ascending within a word
        blocks = num_blocks(m)
        runs = words.astype(np.int64) * blocks + (item_of_entry >> BLOCK_BITS)  # (word, block) of each entry
        offsets = np.zeros(num_words * blocks + 1, np.int64)
        np.cumsum(np.bincount(runs, minlength=num_words * blocks), out=offsets[1:])
        items = (item_of_entry[order] & 0xFFFF).astype(np.uint16)
        return cls(image_ids, item_image, item_region, item_words, offsets, items,
                   np.ascontiguousarray(payload[order]))

    # ---- files ---------------------------------------------------------------------------------------------
    def write(self, root: Path, name: str, kernel: str) -> None:
        """Write into ``root/name`` via a temporary directory renamed into place (fsynced); records each file's
        size and digest in ``self.files``."""
        tmp = root / f".{name}.tmp"
        tmp.mkdir(parents=True, exist_ok=False)
        arrays = {"image_ids": self.image_ids, "item_image": self.item_image, "item_region": self.item_region,
                  "item_words": self.item_words, PAYLOAD[kernel]: self.payload}
        if self.offsets is not None:
            arrays.update(offsets=self.offsets, items=self.items)
        files = {f"{key}.npy": save_array(tmp / f"{key}.npy", value) for key, value in arrays.items()}
        fsync_dir(tmp)
        os.replace(tmp, root / name)
        fsync_dir(root)
        self.name, self.files = name, files

    @classmethod
    def read(cls, root: Path, record: dict, kernel: str, mode: str, num_words: int, dim: int,
             mmap: bool = True) -> "Segment":
        """Open a written segment, validating it against its manifest ``record`` and the database's K and D."""
        name = record["name"]
        d = Path(root) / name
        files = record.get("files") or {}
        arrays = {}
        for fname in file_names(kernel):
            path = d / fname
            if not path.is_file():
                raise DamagedError(path, "missing")
            if fname in files and path.stat().st_size != files[fname]["size"]:
                raise DamagedError(path, f"{path.stat().st_size} bytes, the manifest says {files[fname]['size']}")
            try:
                arrays[fname] = np.load(path, mmap_mode="r" if mmap and fname != "image_ids.npy" else None,
                                        allow_pickle=False)
            except Exception as exc:  # any unreadable header or short file
                raise DamagedError(path, f"unreadable ({str(exc).splitlines()[0][:120]})") from None
        p = {k[:-4]: v for k, v in arrays.items()}
        seg = cls(p["image_ids"], p["item_image"], p["item_region"], p["item_words"], p.get("offsets"),
                  p.get("items"), p[PAYLOAD[kernel]], name, dict(files))
        seg.validate(d, kernel, mode, num_words, dim, record)
        return seg

    def validate(self, where, kernel: str, mode: str, num_words: int, dim: int, record: dict | None = None) -> None:
        """Check every invariant the scans rely on; raise :class:`DamagedError` naming the first bad file."""
        where = Path(where)
        ids = self.image_ids
        if ids.ndim != 1 or ids.dtype.kind != "U":
            raise DamagedError(where / "image_ids.npy", f"expected (I,) unicode, got {ids.dtype} {ids.shape}")
        arrays = {"item_image.npy": self.item_image, "item_region.npy": self.item_region,
                  "item_words.npy": self.item_words, f"{PAYLOAD[kernel]}.npy": self.payload}
        if kernel != "vlad":
            arrays.update({"offsets.npy": self.offsets, "items.npy": self.items})
        for fname, (dtype, trailing) in expected_layout(kernel, num_words, dim).items():
            a = arrays[fname]
            if fname == "items.npy" and a.dtype == np.uint32:
                dtype = np.uint32  # format version 2: full ids, one block (checked with the offsets below)
            if a.dtype != dtype or a.shape[1:] != trailing or a.ndim != 1 + len(trailing):
                raise DamagedError(where / fname, f"expected {np.dtype(dtype)} (n, {', '.join(map(str, trailing))})"
                                   f" got {a.dtype} {a.shape}".replace(", )", ")"))
            if a.ndim > 1 and not a.flags.c_contiguous:
                raise DamagedError(where / fname, "not C-ordered")
        m, n = self.num_items, self.num_images
        for fname in ("item_region.npy", "item_words.npy"):
            if arrays[fname].shape[0] != m:
                raise DamagedError(where / fname, f"{arrays[fname].shape[0]} rows for {m} items")
        ii = np.asarray(self.item_image)
        if m and (int(ii.min()) < 0 or int(ii.max()) >= n or np.any(np.diff(ii) < 0)):
            raise DamagedError(where / "item_image.npy", f"image indices out of order or outside [0, {n})")
        if mode == "aggregation" and (m != n or (m and not np.array_equal(ii, np.arange(n)))):
            raise DamagedError(where / "item_image.npy", "aggregation mode needs exactly one item per image")
        if m and int(np.asarray(self.item_region).min()) < 0:
            raise DamagedError(where / "item_region.npy", "negative region index")
        if kernel == "vlad":
            if self.payload.shape[0] != m:
                raise DamagedError(where / "vectors.npy", f"{self.payload.shape[0]} vectors for {m} items")
        else:
            off = np.asarray(self.offsets)
            e = self.items.shape[0]
            blocks = self.blocks
            if (self.items.dtype == np.uint32 and num_blocks(m) > 1
                    and off.shape == (num_words * num_blocks(m) + 1,)):
                raise DamagedError(where / "items.npy", f"uint32 item ids (previous format) with "
                                   f"{off.shape[0]} offsets; expected uint16 ids in {num_blocks(m)} blocks "
                                   f"of 65,536 items")
            runs = num_words * blocks
            if off.shape != (runs + 1,) or off[0] != 0 or off[-1] != e or np.any(np.diff(off) < 0):
                raise DamagedError(where / "offsets.npy", f"expected offsets ({runs + 1},) monotone from 0 "
                                   f"to {e} (K={num_words} words x {blocks} item blocks), got {off.shape}")
            if self.payload.shape[0] != e:
                raise DamagedError(where / f"{PAYLOAD[kernel]}.npy", f"{self.payload.shape[0]} rows for {e} "
                                   f"posting entries")
            bad = check_postings(off, self.items, blocks, m) if e else 0
            if bad:
                raise DamagedError(where / "items.npy", f"item ids outside [0, {m})" if bad == 1 else
                                   "item ids not ascending within a (word, item block) posting run")
            if int(np.asarray(self.item_words, np.int64).sum()) != e:
                raise DamagedError(where / "item_words.npy", f"word counts do not add up to {e} entries")
        if record is not None:
            got = {"images": n, "items": m, "entries": self.num_entries}
            for key, value in got.items():
                if key in record and record[key] != value:
                    raise DamagedError(where, f"holds {value} {key}, the manifest says {record[key]}")
