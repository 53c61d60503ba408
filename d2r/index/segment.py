"""A segment: an immutable, memory-mappable slice of the database (CSR inverted file + item and image tables).

Files of a segment directory (all plain ``.npy``):

- ``image_ids.npy``   (I,) unicode  image ids of the segment, in insertion order
- ``item_image.npy``  (M,) int32    local image index of each item
- ``item_region.npy`` (M,) int32    region index of the item within its image (0 for a whole-image item)
- ``item_words.npy``  (M,) uint32   |W_i|, visual words the item holds (ASMK kinds)
- ASMK kinds: ``offsets.npy`` (K+1,) int64 word offsets, ``items.npy`` (E,) uint32 local item ids sorted by word,
  then ``bits.npy`` (E, ceil(D/8)) uint8 (ASMK*) or ``residuals.npy`` (E, D) float32 (ASMK)
- VLAD: ``vectors.npy`` (M, K·D) float32

An ASMK* posting entry costs 4 B (item id) + ceil(D/8) B (signature): 20 B for D = 128.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2r._io import fsync_dir

ASMK_FILES = ("offsets", "items")
PAYLOAD = {"asmk_star": "bits", "asmk": "residuals", "vlad": "vectors"}


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

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.item_image.shape[0])

    @property
    def num_entries(self) -> int:
        return 0 if self.items is None else int(self.items.shape[0])

    def nbytes(self) -> int:
        arrays = [self.item_image, self.item_region, self.item_words, self.payload]
        arrays += [a for a in (self.offsets, self.items) if a is not None]
        return int(sum(a.nbytes for a in arrays))

    # ---- building ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, kernel: str, num_words: int, dim: int, image_ids, item_image, item_region, records) -> "Segment":
        """Build from aggregated items (``records``: one :class:`~d2r.aggregate.Aggregated` per item)."""
        image_ids = np.asarray(image_ids, dtype=str)
        item_image = np.asarray(item_image, np.int32)
        item_region = np.asarray(item_region, np.int32)
        m = len(records)
        if kernel == "vlad":
            vectors = np.stack([r.vector for r in records]) if m else np.zeros((0, num_words * dim), np.float32)
            return cls(image_ids, item_image, item_region, np.zeros(m, np.uint32), None, None, vectors)
        item_words = np.array([r.words.shape[0] for r in records], np.uint32)
        words = np.concatenate([r.words for r in records]) if m else np.zeros(0, np.uint32)
        item_of_entry = np.repeat(np.arange(m, dtype=np.uint32), item_words.astype(np.int64))
        field = "bits" if kernel == "asmk_star" else "descriptors"
        width = (dim + 7) // 8 if kernel == "asmk_star" else dim
        dtype = np.uint8 if kernel == "asmk_star" else np.float32
        payload = (np.concatenate([getattr(r, field) for r in records]) if m else np.zeros((0, width), dtype))
        order = np.argsort(words, kind="stable")  # by word, items ascending within a word
        offsets = np.zeros(num_words + 1, np.int64)
        np.cumsum(np.bincount(words, minlength=num_words), out=offsets[1:])
        return cls(image_ids, item_image, item_region, item_words, offsets, item_of_entry[order],
                   np.ascontiguousarray(payload[order]))

    # ---- files ---------------------------------------------------------------------------------------------
    def write(self, root: Path, name: str, kernel: str) -> None:
        """Write into ``root/name`` via a temporary directory renamed into place (fsynced)."""
        tmp = root / f".{name}.tmp"
        tmp.mkdir(parents=True, exist_ok=False)
        arrays = {"image_ids": self.image_ids, "item_image": self.item_image, "item_region": self.item_region,
                  "item_words": self.item_words, PAYLOAD[kernel]: self.payload}
        if self.offsets is not None:
            arrays.update(offsets=self.offsets, items=self.items)
        for key, value in arrays.items():
            with open(tmp / f"{key}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(value), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.replace(tmp, root / name)
        fsync_dir(root)
        self.name = name

    @classmethod
    def read(cls, root: Path, name: str, kernel: str, mmap: bool = True) -> "Segment":
        d = root / name
        mode = "r" if mmap else None

        def load(key, required=True):
            path = d / f"{key}.npy"
            if not path.is_file():
                if required:
                    raise ValueError(f"{d}: missing {key}.npy (database damaged)")
                return None
            return np.load(path, mmap_mode=mode, allow_pickle=False)

        asmk = kernel != "vlad"
        seg = cls(np.load(d / "image_ids.npy", allow_pickle=False), load("item_image"), load("item_region"),
                  load("item_words"), load("offsets", asmk), load("items", asmk), load(PAYLOAD[kernel]), name)
        seg.check(kernel, d)
        return seg

    def check(self, kernel: str, where) -> None:
        m = self.num_items
        if self.item_region.shape != (m,) or self.item_words.shape != (m,):
            raise ValueError(f"{where}: item tables disagree in length (database damaged)")
        if m and int(self.item_image.max()) >= self.num_images:
            raise ValueError(f"{where}: item refers to a missing image (database damaged)")
        if kernel == "vlad":
            if self.payload.shape[0] != m:
                raise ValueError(f"{where}: {self.payload.shape[0]} vectors for {m} items (database damaged)")
            return
        e = self.items.shape[0]
        if self.offsets[-1] != e or self.payload.shape[0] != e or int(self.item_words.sum()) != e:
            raise ValueError(f"{where}: posting lists are inconsistent (database damaged)")
