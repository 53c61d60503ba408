"""The d2r database: an inverted file over visual words with the paper's two modes, persistent and memory-mapped.

- ``mode="aggregation"``: one item per image. Given regions, the image is aggregated with R-ASMK*/R-ASMK/R-VLAD,
  so the database costs no more than plain ASMK* (the paper's regional aggregation).
- ``mode="search"``: every region of an image is its own item (the whole image when no regions are given); an
  image's score is the maximum over its items (the paper's regional search; memory grows with the regions).

Search scans only the posting lists of the query's words (numba), so its cost follows posting-list length, not
database size; VLAD kinds use exact dense dot products. Scores equal :func:`d2r.similarity` against every image.

On disk (a directory): ``manifest.json`` (format version, config, codebook fingerprint, segment list, counts) is the
commit point; ``codebook.npz``; immutable segment directories (see :mod:`d2r.index.segment`); ``removed-<gen>.npy``
(bool per image). ``save`` writes new files first and renames the manifest last, so a process killed at any moment
leaves the previous state readable. Images added after ``open`` go to a new segment at the next ``save``; many
segments are merged (``compact``), dropping removed images.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2r import _io
from d2r._validate import as_descriptors
from d2r.aggregate import Aggregated, Aggregator, idf_weights
from d2r.codebook import Codebook
from d2r.config import Config
from d2r.index.segment import Segment
from d2r.kernels.binary import as_words64
from d2r.kernels.ivf import document_frequency, item_weight_sums, max_per_image, scan_bits, scan_residuals

log = logging.getLogger(__name__)

FORMAT = "d2r-database"
FORMAT_VERSION = 1
MODES = ("aggregation", "search")
MAX_SEGMENTS = 16  # more than this at save time triggers a merge into one segment
EMPTY_SCORE = -1.0  # an ASMK-kind image (or region) without visual words


@dataclass
class DatabaseConfig(Config):
    """How images are aggregated and compared. Defaults: R-ASMK*/ASMK* with σ_{3,0} (strict τ), MA 1.

    ``normalize`` divides ASMK scores by sqrt(|W_q||W_d|); the shipped official R-ASMK* configuration has it off
    (raw sums: the paper's figures), the classic ASMK has it on. ``idf`` weights words by idf² with
    idf_c = log(N / max(df_c, 1)) over the live items (an extension, off in the official code).
    """

    kernel: str = "asmk_star"
    mode: str = "aggregation"
    alpha: float = 3.0
    tau: float = 0.0
    tau_inclusive: bool = False
    normalize: bool = True
    num_assignments: int = 1
    query_num_assignments: int = 1
    idf: bool = False

    def check(self, codebook: Codebook | None = None) -> None:
        """ValueError naming the option; without ``codebook``, assignments are checked against K later."""
        from d2r.aggregate import get_kernel

        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        kernel = get_kernel(self.kernel)
        for name in ("num_assignments", "query_num_assignments"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if codebook is not None:
            Aggregator(codebook, self.kernel, self.num_assignments)  # validates the assignments against K
            Aggregator(codebook, self.kernel, self.query_num_assignments)
        if self.idf and not kernel.per_word:
            raise ValueError(f"idf applies to the ASMK kernels, not to {self.kernel!r}")


class Ranking:
    """A ranked result: ``ids`` (best first), ``scores`` (float64) and, per image, ``regions``: the region index of
    its best-scoring item (regional search; 0 in aggregation mode). Unpacks as ``ids, scores = ranking``."""

    def __init__(self, ids, scores, regions):
        self.ids, self.scores, self.regions = ids, scores, regions

    def __iter__(self):
        return iter((self.ids, self.scores))

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        head = ", ".join(f"{i}:{s:.4g}" for i, s in zip(self.ids[:5], self.scores[:5]))
        return f"Ranking([{head}{', ...' if len(self) > 5 else ''}])"


class Database:
    """Inverted-file image database. Use :meth:`create` or :meth:`open`, never the constructor."""

    def __init__(self, path, codebook: Codebook, config: DatabaseConfig, segments, removed, generation: int,
                 id_type: str | None):
        self.path = None if path is None else Path(path)
        self.codebook = codebook
        self.config = config
        self._segments: list[Segment] = list(segments)
        self._set_removed(np.asarray(removed, bool))
        self._generation = generation
        self._id_type = id_type
        self._agg = Aggregator(codebook, config.kernel, config.num_assignments)
        self._query_agg = Aggregator(codebook, config.kernel, config.query_num_assignments)
        self._pending_ids: list[str] = []
        self._pending_items: list[tuple[int, int, Aggregated]] = []  # (local image, region, record)
        self._index: dict[str, int] | None = None
        self._cache: dict = {}

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path, codebook, kernel: str = "asmk_star", mode: str = "aggregation", alpha: float = 3.0,
               tau: float = 0.0, tau_inclusive: bool = False, normalize: bool = True, num_assignments: int = 1,
               query_num_assignments: int = 1, idf: bool = False) -> "Database":
        """A new, empty database at ``path`` (a directory that must not hold a database yet), or in memory when
        ``path`` is None. ``codebook`` is a :class:`Codebook` or a path to one; it is copied into the database."""
        book = codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)
        config = DatabaseConfig(kernel=kernel, mode=mode, alpha=float(alpha), tau=float(tau),
                                tau_inclusive=bool(tau_inclusive), normalize=bool(normalize),
                                num_assignments=int(num_assignments),
                                query_num_assignments=int(query_num_assignments), idf=bool(idf))
        config.check(book)
        db = cls(path, book, config, [], np.zeros(0, bool), 0, None)
        if path is not None:
            path = Path(path)
            if (path / "manifest.json").exists():
                raise FileExistsError(f"{path}: a database already exists here (open it, or remove the folder)")
            path.mkdir(parents=True, exist_ok=True)
            book.save(path / "codebook.npz")
            db.save()
        return db

    @classmethod
    def open(cls, path, codebook=None, mmap: bool = True) -> "Database":
        """Open a saved database; arrays are memory-mapped, so this is fast at any size. A ``codebook`` given
        here must be the one the database was built with (same fingerprint)."""
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path}: no d2r database here (manifest.json missing)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: not a d2r database")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: format version {manifest['format_version']} is newer than this "
                             f"d2r supports ({FORMAT_VERSION})")
        stored = manifest["codebook"]["fingerprint"]
        if codebook is None:
            book = Codebook.load(path / "codebook.npz")
        else:
            book = codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)
        if book.fingerprint != stored:
            raise ValueError(f"{path}: the database was indexed with codebook {stored} (K={manifest['codebook']['k']},"
                             f" D={manifest['codebook']['dim']}), but codebook {book.fingerprint} (K={book.size}, "
                             f"D={book.dim}) was given; use the same codebook or re-index")
        config = DatabaseConfig.from_dict(manifest["config"])
        segments = [Segment.read(path, name, config.kernel, mmap) for name in manifest["segments"]]
        total = sum(s.num_images for s in segments)
        removed = (np.load(path / manifest["removed"], allow_pickle=False) if manifest.get("removed")
                   else np.zeros(total, bool))
        if removed.shape != (total,):
            raise ValueError(f"{path}: removal table has {removed.shape[0]} entries for {total} images (damaged)")
        return cls(path, book, config, segments, removed, int(manifest["generation"]), manifest.get("id_type"))

    # ---- contents ----------------------------------------------------------------------------------------------
    @property
    def kernel(self) -> str:
        return self.config.kernel

    @property
    def mode(self) -> str:
        return self.config.mode

    def _num_images_total(self) -> int:
        return sum(s.num_images for s in self._segments) + len(self._pending_ids)

    def __len__(self) -> int:
        return self._num_images_total() - int(self._removed.sum())

    def _all_ids(self) -> np.ndarray:
        if "ids" not in self._cache:
            parts = [s.image_ids for s in self._segments] + [np.asarray(self._pending_ids, dtype=str)]
            self._cache["ids"] = np.concatenate(parts) if parts else np.zeros(0, str)
        return self._cache["ids"]

    def _id_index(self) -> dict[str, int]:
        if self._index is None:
            ids = self._all_ids()
            live = np.flatnonzero(~self._removed)
            self._index = dict(zip(ids[live].tolist(), live.tolist()))
        return self._index

    def _key(self, image_id) -> str:
        if isinstance(image_id, (bool, np.bool_)):
            raise ValueError(f"image id must be a str or an int, got {image_id!r}")
        kind = "int" if isinstance(image_id, (int, np.integer)) else "str" if isinstance(image_id, str) else None
        if kind is None:
            raise ValueError(f"image id must be a str or an int, got {type(image_id).__name__}")
        if self._id_type is not None and kind != self._id_type:
            raise ValueError(f"this database uses {self._id_type} image ids, got {image_id!r}")
        return str(int(image_id)) if kind == "int" else image_id

    def _out_ids(self, keys: np.ndarray) -> np.ndarray:
        return keys.astype(np.int64) if self._id_type == "int" else keys.astype(object)

    def __contains__(self, image_id) -> bool:
        try:
            return self._key(image_id) in self._id_index()
        except ValueError:
            return False

    def __iter__(self):
        ids = self._all_ids()
        return iter(self._out_ids(ids[~self._removed]).tolist())

    def ids(self) -> np.ndarray:
        """Live image ids in insertion order."""
        return self._out_ids(self._all_ids()[~self._removed])

    # ---- adding and removing ------------------------------------------------------------------------------------
    def add(self, image_id, descriptors, regions=None, *, assignments=None) -> None:
        """Index one image. ``descriptors`` (N, D) float32 (or an object with ``.descriptors``), concatenated
        region by region when ``regions`` (per-region counts, whole image first) is given."""
        key = self._key(image_id)
        if key in self._id_index():
            raise ValueError(f"image {image_id!r} is already in the database (remove it first)")
        x = getattr(descriptors, "descriptors", descriptors)
        if self.mode == "aggregation":
            records = [self._agg(x, regions, assignments=assignments)]
        elif regions is None:
            records = [self._agg(x, assignments=assignments)]
        else:
            records = self._agg.per_region(x, regions, assignments=assignments)
        self._append(image_id, key, records)

    def add_aggregated(self, image_id, records) -> None:
        """Index one image from records aggregated elsewhere (e.g. in parallel workers): one
        :class:`Aggregated` in aggregation mode, or a list of them (one per region) in search mode."""
        key = self._key(image_id)
        if key in self._id_index():
            raise ValueError(f"image {image_id!r} is already in the database (remove it first)")
        records = [records] if isinstance(records, Aggregated) else list(records)
        if self.mode == "aggregation" and len(records) != 1:
            raise ValueError(f"aggregation mode takes one record per image, got {len(records)}")
        for r in records:
            self._as_query(r)  # same kernel, K and D
        self._append(image_id, key, records)

    def _append(self, image_id, key, records) -> None:
        local = len(self._pending_ids)
        self._pending_ids.append(key)
        self._pending_items.extend((local, r, rec) for r, rec in enumerate(records))
        if self._num_removed_slots == self._removed_buf.shape[0]:  # grow by doubling: O(1) amortised per add
            self._removed_buf = np.concatenate([self._removed_buf, np.zeros(max(16, self._num_removed_slots), bool)])
        self._removed_buf[self._num_removed_slots] = False
        self._num_removed_slots += 1
        self._id_index()[key] = self._num_images_total() - 1
        if self._id_type is None:
            self._id_type = "int" if isinstance(image_id, (int, np.integer)) else "str"
        self._changed()

    def add_batch(self, images, progress: bool = False, chunk_descriptors: int = 200_000) -> int:
        """Index many images: ``images`` yields ``(image_id, descriptors, regions_or_None)``. Descriptors of
        consecutive images are assigned to words in one GEMM (``chunk_descriptors`` at a time). Returns the count."""
        from tqdm.auto import tqdm

        added = 0
        batch: list = []
        size = 0

        def flush():
            nonlocal added, size
            if not batch:
                return
            xs = [as_descriptors(getattr(b[1], "descriptors", b[1]), self.codebook.dim) for b in batch]
            words = self.codebook.assign(np.concatenate(xs), self.config.num_assignments)
            start = 0
            for (image_id, _, regions), x in zip(batch, xs):
                self.add(image_id, x, regions, assignments=words[start:start + len(x)])
                start += len(x)
                added += 1
            batch.clear()
            size = 0

        for item in tqdm(images, disable=not progress, desc="indexing", unit="img"):
            image_id, x, regions = item if len(item) == 3 else (*item, None)
            batch.append((image_id, x, regions))
            size += len(getattr(x, "descriptors", x))
            if size >= chunk_descriptors:
                flush()
        flush()
        return added

    def remove(self, image_id) -> None:
        """Remove an image; searches exclude it at once, ``save`` persists it, ``compact`` reclaims its space."""
        key = self._key(image_id)
        index = self._id_index().pop(key, None)
        if index is None:
            raise KeyError(f"image {image_id!r} is not in the database")
        self._removed_buf[index] = True
        self._changed()

    def _changed(self) -> None:
        for k in ("item_image", "ids", "idf", "item_weight"):
            self._cache.pop(k, None)

    # ---- search ------------------------------------------------------------------------------------------------
    @property
    def _removed(self) -> np.ndarray:
        """(images,) bool: removed flag of every image, by global index (a view of a growable buffer)."""
        return self._removed_buf[: self._num_removed_slots]

    def _set_removed(self, removed: np.ndarray) -> None:
        self._removed_buf = np.array(removed, bool)
        self._num_removed_slots = self._removed_buf.shape[0]

    def _searchable(self) -> list[Segment]:
        """All segments, after turning images added since the last call into a new (unsaved) segment."""
        if self._pending_ids:
            items = self._pending_items
            local, region, records = zip(*items) if items else ((), (), ())
            self._segments.append(Segment.build(self.kernel, self.codebook.size, self.codebook.dim,
                                                self._pending_ids, local, region, records))
            self._pending_ids, self._pending_items = [], []  # the records now live only in the segment
            unsaved = [i for i, seg in enumerate(self._segments) if seg.name is None]
            if len(unsaved) > MAX_SEGMENTS:  # unsaved segments are always the last ones
                self._merge(unsaved[0])
        return self._segments

    def _item_image(self) -> np.ndarray:
        """Global image index of every item, over all segments."""
        if "item_image" not in self._cache:
            parts, start = [], 0
            for s in self._searchable():
                parts.append(np.asarray(s.item_image, np.int64) + start)
                start += s.num_images
            self._cache["item_image"] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._cache["item_image"]

    def idf(self) -> np.ndarray:
        """(K,) float64 idf_c = log(N / max(df_c, 1)) over live items (N items, df_c of them hold word c)."""
        if "idf" not in self._cache:
            item_live = ~self._removed[self._item_image()]
            df = np.zeros(self.codebook.size, np.int64)
            start = 0
            for s in self._searchable():
                df += document_frequency(s.offsets, s.items, item_live[start:start + s.num_items])
                start += s.num_items
            n = max(int(item_live.sum()), 1)
            self._cache["idf"] = np.log(n / np.maximum(df, 1))
        return self._cache["idf"]

    def _weights(self) -> np.ndarray:
        return idf_weights(self.idf(), self.codebook.size) if self.config.idf else np.zeros(0)

    def _item_weight_sums(self, weights) -> np.ndarray:
        if "item_weight" not in self._cache:
            parts = [item_weight_sums(s.offsets, s.items, weights, s.num_items) for s in self._searchable()]
            self._cache["item_weight"] = np.concatenate(parts) if parts else np.zeros(0)
        return self._cache["item_weight"]

    def _as_query(self, query) -> Aggregated:
        if isinstance(query, Aggregated):
            if (query.kernel, query.num_words, query.dim) != (self.kernel, self.codebook.size, self.codebook.dim):
                raise ValueError(f"query is {query.kernel} with K={query.num_words}, D={query.dim}; the database "
                                 f"is {self.kernel} with K={self.codebook.size}, D={self.codebook.dim}")
            return query
        return self._query_agg(getattr(query, "descriptors", query))

    def item_scores(self, query) -> np.ndarray:
        """Score of every item (over all segments, removed ones included): exactly ``similarity(q, item)``."""
        q = self._as_query(query)
        segments = self._searchable()
        total = sum(s.num_items for s in segments)
        if self.kernel == "vlad":
            v = q.vector
            return np.concatenate([np.asarray(s.payload, np.float32) @ v for s in segments]).astype(np.float64) \
                if segments else np.zeros(0)
        scores = np.zeros(total)
        item_words = np.concatenate([np.asarray(s.item_words) for s in segments]) if segments else np.zeros(0)
        if q.words.shape[0] == 0:
            scores[:] = EMPTY_SCORE
            return scores
        c = self.config
        weights = self._weights()
        start = 0
        for s in segments:
            out = scores[start:start + s.num_items]
            if self.kernel == "asmk_star":
                scan_bits(q.words, as_words64(q.bits), s.offsets, s.items, as_words64(s.payload), q.dim, c.alpha,
                          c.tau, c.tau_inclusive, weights, out)
            else:
                scan_residuals(q.words, q.descriptors, s.offsets, s.items, s.payload, c.alpha, c.tau,
                               c.tau_inclusive, weights, out)
            start += s.num_items
        if c.normalize:
            if weights.shape[0]:
                norm = np.sqrt(weights[q.words].sum() * self._item_weight_sums(weights))
            else:
                norm = np.sqrt(float(q.words.shape[0]) * item_words)
            np.divide(scores, norm, out=scores, where=norm > 0)
        scores[item_words == 0] = EMPTY_SCORE
        return scores

    def image_scores(self, query) -> tuple[np.ndarray, np.ndarray]:
        """(scores, best item) per image (global index); removed images score -inf."""
        items = self.item_scores(query)
        item_image = self._item_image()
        n = self._num_images_total()
        if self.mode == "aggregation":  # exactly one item per image, in image order
            scores = items.copy()
            best = np.arange(n)
        else:
            scores = max_per_image(items, item_image, n, EMPTY_SCORE)
            best = _best_item(items, item_image, scores, n)
        scores[self._removed] = -np.inf
        return scores, best

    def search(self, query, top_k: int = 100) -> Ranking:
        """Rank the database for a query: (N, D) descriptors (aggregated with ``query_num_assignments``, no
        regions), an object with ``.descriptors``, or an :class:`Aggregated` record. Top-k by partial selection;
        equal scores are ordered by insertion."""
        scores, best = self.image_scores(query)
        live = len(self)
        k = min(int(top_k), live)
        if k <= 0:
            return Ranking(self._out_ids(np.zeros(0, str)), np.zeros(0), np.zeros(0, np.int64))
        from d2r.ranking import top_k_stable

        top = top_k_stable(scores, k)
        regions = np.zeros(k, np.int64)
        if self.mode == "search":
            region_of = self._item_regions()
            valid = best[top] >= 0
            regions[valid] = region_of[best[top][valid]]
        return Ranking(self._out_ids(self._all_ids()[top]), scores[top], regions)

    def search_batch(self, queries, top_k: int = 100, workers: int | None = None) -> list[Ranking]:
        """Search several queries; the numba scans release the GIL, so threads run them in parallel."""
        queries = list(queries)
        self._searchable(), self._item_image()  # build shared caches once, before the threads
        if self.config.idf:
            self._item_weight_sums(self._weights())
        workers = workers or min(len(queries), os.cpu_count() or 1)
        if workers <= 1:
            return [self.search(q, top_k) for q in queries]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda q: self.search(q, top_k), queries))

    def _item_regions(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.item_region, np.int64) for s in self._searchable()])

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self) -> None:
        """Persist added and removed images (crash-safe; see the module docstring)."""
        if self.path is None:
            raise ValueError("this database lives in memory (created with path=None); nothing to save to")
        self._searchable()
        if len(self._segments) > MAX_SEGMENTS:
            self.compact()
        generation = self._generation + 1
        for seg in self._segments:
            if seg.name is None:
                seg.write(self.path, f"seg-{generation:06d}-{uuid.uuid4().hex[:8]}", self.kernel)
        removed_name = None
        if self._removed.any():
            removed_name = f"removed-{generation:06d}.npy"
            _io.save_npy(self.path / removed_name, self._removed)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "generation": generation,
            "config": self.config.to_dict(),
            "codebook": {"fingerprint": self.codebook.fingerprint, "k": self.codebook.size, "dim": self.codebook.dim},
            "segments": [s.name for s in self._segments], "removed": removed_name, "id_type": self._id_type,
            "counts": self.info(files=False)["counts"],
        }
        on_disk = self.path / "manifest.json"
        if on_disk.exists() and json.loads(on_disk.read_text()).get("generation") != self._generation:
            raise ValueError(f"{self.path}: the database was saved by another writer since it was opened "
                             f"(generation {self._generation} expected); reopen it and add the images again")
        _io.write_json(on_disk, manifest)  # the commit point
        self._generation = generation
        self._collect_garbage(manifest)

    def _collect_garbage(self, manifest) -> None:
        keep = set(manifest["segments"]) | {manifest["removed"], "manifest.json", "codebook.npz"}
        for entry in self.path.iterdir():
            if entry.name in keep or not (entry.name.startswith(("seg-", "removed-", ".seg-"))):
                continue
            try:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            except OSError as exc:  # a file still in use elsewhere: removed at a later save
                log.debug("could not remove %s: %s", entry, exc)

    def compact(self) -> None:
        """Merge every segment (and pending images) into one, dropping removed images. Written at next ``save``."""
        self._searchable()
        self._merge(0)

    def _merge(self, start: int) -> None:
        """Merge ``segments[start:]`` into one unsaved segment without their removed images; images of earlier
        segments keep their global indices."""
        segments = self._segments[start:]
        if not segments:
            return
        first_image = sum(s.num_images for s in self._segments[:start])
        image_live = ~self._removed[first_image:]
        item_image, offset = [], 0
        for s in segments:
            item_image.append(np.asarray(s.item_image, np.int64) + offset)
            offset += s.num_images
        item_image = np.concatenate(item_image)
        item_live = image_live[item_image]
        new_image = np.cumsum(image_live) - 1  # new local index of each live image
        ids = np.concatenate([s.image_ids for s in segments])[image_live]
        item_image_new = new_image[item_image[item_live]].astype(np.int32)
        item_region = np.concatenate([np.asarray(s.item_region) for s in segments])[item_live].astype(np.int32)
        item_words = np.concatenate([np.asarray(s.item_words) for s in segments])[item_live]
        if self.kernel == "vlad":
            vectors = np.concatenate([np.asarray(s.payload) for s in segments])[item_live]
            merged = Segment(ids, item_image_new, item_region, item_words, None, None, vectors)
        else:
            new_item = np.cumsum(item_live) - 1
            words, items, payload, first = [], [], [], 0
            for s in segments:
                w = np.repeat(np.arange(self.codebook.size, dtype=np.int64), np.diff(np.asarray(s.offsets)))
                local = first + np.asarray(s.items, np.int64)
                keep = item_live[local]
                words.append(w[keep])
                items.append(new_item[local[keep]].astype(np.uint32))
                payload.append(np.asarray(s.payload)[keep])
                first += s.num_items
            words = np.concatenate(words)
            order = np.argsort(words, kind="stable")
            offsets = np.zeros(self.codebook.size + 1, np.int64)
            np.cumsum(np.bincount(words, minlength=self.codebook.size), out=offsets[1:])
            merged = Segment(ids, item_image_new, item_region, item_words, offsets,
                             np.concatenate(items)[order], np.ascontiguousarray(np.concatenate(payload)[order]))
        self._segments = self._segments[:start] + [merged]
        self._set_removed(np.concatenate([self._removed[:first_image], np.zeros(merged.num_images, bool)]))
        self._index = None
        self._changed()

    def info(self, files: bool = True) -> dict:
        """Counts and sizes (JSON-ready)."""
        segments = self._searchable()
        entries = sum(s.num_entries for s in segments)
        nbytes = sum(s.nbytes() for s in segments)
        posting = sum((s.items.nbytes + s.payload.nbytes) for s in segments if s.items is not None)
        out = {
            "path": None if self.path is None else str(self.path),
            "config": self.config.to_dict(),
            "codebook": {"fingerprint": self.codebook.fingerprint, "k": self.codebook.size, "dim": self.codebook.dim},
            "counts": {"images": len(self), "images_total": self._num_images_total(),
                       "items": sum(s.num_items for s in segments), "entries": entries},
            "segments": len(self._segments),
            "bytes": nbytes,
            "bytes_per_entry": (posting / entries) if entries else None,
        }
        if files and self.path is not None:
            out["bytes_on_disk"] = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return out

    def __repr__(self) -> str:
        return (f"Database({self.kernel}, mode={self.mode}, images={len(self)}, "
                f"path={None if self.path is None else str(self.path)!r})")


def _best_item(item_scores, item_image, image_scores, n) -> np.ndarray:
    """Index of an item reaching each image's score (first in order), -1 for images without items."""
    best = np.full(n, -1, np.int64)
    hit = item_scores == image_scores[item_image]
    idx = np.flatnonzero(hit)[::-1]  # reversed so the first item wins the assignment below
    best[item_image[idx]] = idx
    return best
