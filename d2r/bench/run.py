"""Benchmark runners: revisitop (ROxford5k / RParis6k, our dev set) and GLDv2 retrieval, one call each.

    result = run_revisitop("gnd_roxford5k.pkl", "data/roxford5k/jpg", BenchConfig.from_file("cfg.yaml"), "runs/x")

Steps: database features (whole image + the regions of ``config.regions``, re-extracted on crops) and query
features (cropped to the rounded ``bbx`` when the ground truth gives one, never split into regions) are extracted
into feature stores under the cache folder (resumable: an interrupted run picks up where it stopped); a codebook is
loaded (``codebook.path``) or trained with k-means on ``codebook_images`` (the academic convention: the OTHER
dataset) or, without it, on the database images themselves (recorded as ``codebook_trained_on`` in the output
config), and cached; the :class:`~d2r.index.Database` is built in ``OUT/index``; every query goes through THE
query path, :func:`d2r.query.pipeline.search_query` (what :meth:`Engine.search <d2r.engine.Engine.search>` runs:
search, verification, expansion as configured), with each protocol's junk as the only addition (junk is never
verified nor used to expand, as the official code); then it is evaluated.

Cache keys are hashes of what determines the content (extractor config, regions config, image root, ground truth,
codebook options), so several configs sharing one cache folder reuse each other's features and codebooks.
Outputs in ``OUT``: ``metrics.json`` (the result dict), ``config.yaml`` (the resolved config and what ran),
``index/``; revisitop: ``ranks.npy`` (the FINAL ranking, database indices best first per query, Medium junk),
``ranks_<stage>.npy`` (each stage's: initial, verified, expanded) and ``scores.npy`` (the final ranking's
scores), padded with -1 / NaN; GLDv2: ``predictions.csv``.

Verified pairs are cached too (``pairs-<key>.json``: per query, database id -> inlier count): a pair's count
depends on the two feature records and the options that say how to match and fit, not on ``min_inliers``,
``num_to_rerank``, fusion or expansion, so runs that differ only in those re-verify nothing they share (a
LightGlue pair costs seconds on a CPU; ``benchmarks/calibrate_inliers.py`` reads the counts of a run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from d2r import _io
from d2r._threads import numba_threads, one_blas_thread, openmp_blas_one_thread
from d2r.bench.report import write_revisitop_report
from d2r.build import Pipeline, check_setup, extract_to_store
from d2r.codebook import Codebook
from d2r.engine.config import EngineConfig
from d2r.eval import gldv2
from d2r.eval.datasets import gldv2_path, query_box, read_ids, resolve_image
from d2r.eval.revisitop import PROTOCOLS, GroundTruth, evaluate, load_gnd, per_query_metrics
from d2r.features.base import LocalFeatures, whole_image  # noqa: F401  (whole_image: part of this API)
from d2r.features.extract import extract_each
from d2r.features.image import crop, load_image
from d2r.features.store import FeatureStore
from d2r.globaldesc import GlobalExtractor, GlobalIndex
from d2r.query.pipeline import STAGES, global_shortlist, prepare_query, search_query

log = logging.getLogger(__name__)


@dataclass
class BenchConfig(EngineConfig):
    """An :class:`~d2r.engine.EngineConfig` (same YAML sections and the same defaults: ``d2r bench`` runs what
    ``d2r search`` ships) plus protocol options only.

    Attributes:
        codebook_images: folder / list file of the images a codebook is trained on (academic convention: the
            other dataset); None trains on the database images. Ignored when ``codebook.path`` is set.
        top_k: search depth; None ranks the whole database (revisitop) or the top 100 (GLDv2).
    """
    codebook_images: str | None = None
    top_k: int | None = None

    def check(self) -> "BenchConfig":
        super().check()
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be a positive integer (or null: the default depth), got {k!r}")
        return self


def load_config(path=None, overrides: dict | None = None) -> BenchConfig:
    """The config of a run: the YAML/JSON file ``path`` (or the defaults), then ``overrides`` applied.

    ``overrides`` maps dotted keys to values (``{"index.kernel": "asmk", "features.options.max_features": 300}``);
    None values are skipped (a command-line flag that was not given). Keys under ``*.options`` may be new.
    """
    config = BenchConfig.from_file(path) if path is not None else BenchConfig()
    return config.override(overrides or {})


# ---- caching -------------------------------------------------------------------------------------------------
def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _regions_key(config: BenchConfig):
    r = config.regions
    return "none" if str(r.proposer).lower() == "none" else r.to_dict()


def _features_key(extractor):
    """What determines the features: the extractor's fingerprint (name, config, PCA, model)."""
    return extractor.fingerprint()


# Options of ``rerank`` a pair's inlier count does not depend on (the decision rule and how many are verified).
PAIR_FREE = ("enabled", "num_to_rerank", "min_inliers", "fusion_weight", "fusion_cap", "workers")


def _verification_key(rerank) -> dict:
    """What determines a pair's inlier count besides the two feature records: the rerank options minus
    :data:`PAIR_FREE`, a LightGlue weights file by its content."""
    key = {k: v for k, v in rerank.to_dict().items() if k not in PAIR_FREE}
    if key.get("method") == "lightglue" and Path(str(key["lightglue"])).is_file():
        key["lightglue"] = _io.file_digest(key["lightglue"])
    return key


class PairCounts:
    """The cached inlier counts of verified pairs, ``{query name: {database id: count}}`` in one JSON file.

    A cache, so a damaged or foreign file is ignored (a warning) and rewritten; :meth:`save` merges with what
    another run wrote since this one loaded, then replaces the file atomically. Database ids are strings (the
    benchmarks' image names); other ids are not cached."""
    def __init__(self, path: Path):
        self.path = Path(path)
        self.pairs: dict[str, dict] = self._read()
        self.added = 0

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            data = _io.read_json(self.path, {})
            pairs = data.get("pairs", {}) if data.get("format") == 1 else None
            if not isinstance(pairs, dict) or not all(
                    isinstance(q, dict) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                for n in q.values()) for q in pairs.values()):
                raise ValueError(f"{self.path}: not a pair-count cache (format 1)")
            return pairs
        except (OSError, ValueError) as exc:
            log.warning("%s; verified pairs are recomputed", exc)
            return {}

    def known(self, query: str) -> dict:
        """A fresh ``{id: count}`` of the cached pairs of ``query`` (for :func:`search_query`'s ``known``)."""
        return dict(self.pairs.get(str(query), {}))

    def update(self, query: str, known: dict) -> None:
        if not all(isinstance(i, str) for i in known):
            return
        row = self.pairs.setdefault(str(query), {})
        new = {i: int(n) for i, n in known.items() if i not in row}
        self.added += len(new)
        row.update(new)

    def save(self) -> None:
        if not self.added:
            return
        merged = self._read() if self.path.exists() else {}
        for query, row in self.pairs.items():
            merged.setdefault(query, {}).update(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _io.write_json(self.path, {"format": 1, "pairs": merged})
        self.pairs, self.added = merged, 0


class _Timer:
    def __init__(self):
        self.timing: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.timing[name] = round(timer.timing.get(name, 0.0) + time.perf_counter() - self.t0, 3)

        return _Ctx()


class _Pipeline(Pipeline):
    """The shared :class:`~d2r.pipeline.Pipeline` plus what a benchmark run adds: the run folder, a cache of
    feature stores and codebooks keyed by content, step timings and notes."""
    def __init__(self, config: BenchConfig, out, cache=None, progress: bool = True):
        if config.codebook_images is not None and not Path(config.codebook_images).exists():
            raise FileNotFoundError(f"codebook_images: {config.codebook_images} not found")
        extractor, self._codebook = check_setup(config)  # before any image is read or folder made
        super().__init__(config, extractor, progress)
        self.out = Path(out)
        self.cache = Path(cache) if cache is not None else self.out / "cache"
        self.timer = _Timer()
        self.notes: dict = {}

    def _workers(self) -> int:
        return self.workers

    def database_store(self, pairs, root):
        """Feature store of the database images (with regions when configured); extracted when missing."""
        name = "db-" + _key(_features_key(self.extractor), _regions_key(self.config), str(Path(root).resolve()))
        with self.timer("extract_database"):
            report = extract_to_store(pairs, self.extractor, self.cache / name, fn=self.image_worker,
                                      workers=self.workers, batch_size=self.batch_size,
                                      progress=self.progress, desc=f"extract {self.extractor.name}")
        self.notes["database_extraction"] = report
        return FeatureStore.open(self.cache / name)

    def query_store(self, items, key_parts):
        """Feature store of the queries: ``items`` = [(query_id, path, bbx or None)]; cropped, no regions."""
        path = self.cache / ("queries-" + _key(_features_key(self.extractor), key_parts))
        boxes = {qid: bbx for qid, _, bbx in items}

        def crop_fn(image_id, source):
            return self.extract_query(source, query_box(boxes[image_id]), name=str(image_id))

        with self.timer("extract_queries"):
            report = extract_to_store([(q, p) for q, p, _ in items], self.extractor, path, fn=crop_fn,
                                      workers=self.workers, batch_size=self.batch_size,
                                      progress=self.progress, desc="extract queries")
        self.notes["query_extraction"] = report
        return FeatureStore.open(path)

    def codebook(self, db_store, db_root) -> Codebook:
        """The configured codebook file, or one trained (and cached) on ``codebook_images`` / the database."""
        c = self.config.codebook
        if self._codebook is not None:
            self.notes["codebook_trained_on"] = f"given: {c.path}"
            return self._codebook
        source = self.config.codebook_images
        train_on = str(Path(source).resolve()) if source else f"database images ({Path(db_root).resolve()})"
        self.notes["codebook_trained_on"] = train_on
        params = {k: v for k, v in c.to_dict().items() if k != "path"}
        path = self.cache / f"codebook-k{c.size}-{_key(_features_key(self.extractor), params, train_on)}.npz"
        if path.is_file():
            self.notes["codebook_cached"] = str(path)
            return Codebook.load(path)
        store = db_store
        if source:
            tpath = self.cache / ("train-" + _key(_features_key(self.extractor), train_on))
            with self.timer("extract_codebook_images"):
                extract_to_store(source, self.extractor, tpath, fn=lambda _, p: self.extract_query(p),
                                 workers=self.workers, batch_size=self.batch_size, progress=self.progress,
                                 desc="extract codebook images")
            store = FeatureStore.open(tpath)
        with self.timer("train_codebook"):
            book = self.train_codebook(store, train_on)
        self.cache.mkdir(parents=True, exist_ok=True)
        book.save(path)
        return book

    def global_shortlists(self, db_pairs, query_items, reuse: bool) -> list:
        """The global stage of every query (``global`` enabled): ``[(ids, scores)]`` in query order, from an
        in-memory :class:`~d2r.globaldesc.GlobalIndex` of the database images' vectors. Vectors are cached
        (``global-<key>.npy``, by the extractor's fingerprint and the image list); ``query_items`` =
        [(query_id, path, bbx or None)], ``reuse``: the queries are database images (their vectors reused)."""
        g = self.config.global_
        ex = GlobalExtractor(g.extractor_config())

        def vectors(kind, pairs, fn):
            """(len(pairs), D) float32 by the one extraction loop; an unreadable image gets a zero vector."""
            path = self.cache / f"global-{kind}-{_key(ex.fingerprint(), [str(p) for _, p in pairs])}.npy"
            if path.is_file():
                return np.load(path)
            out = np.zeros((len(pairs), ex.dim), np.float32)
            with self.timer(f"global_{kind}"):
                each = extract_each(list(enumerate(p for _, p in pairs)), fn, 1, self.progress,
                                    f"global vectors ({kind})")
                for k, source, vector, error in each:
                    if error is None:
                        out[k] = vector
                    else:
                        log.warning("%s: no global vector: %s", source, error)
            self.cache.mkdir(parents=True, exist_ok=True)
            _io.save_npy(path, out)
            return out

        names = [n for n, _ in db_pairs]
        db_vecs = vectors("database", db_pairs, lambda _, path: ex.extract(path))
        if reuse:
            at = {n: i for i, n in enumerate(names)}
            q_vecs = db_vecs[[at[q] for q, _, _ in query_items]]
        else:
            boxes = [bbx for _, _, bbx in query_items]

            def crop_extract(k, path):
                pixels = load_image(path)
                return ex.extract(pixels if boxes[k] is None else crop(pixels, query_box(boxes[k]), name=str(path)))
            q_vecs = vectors("queries", [(q, p) for q, p, _ in query_items], crop_extract)
        index = GlobalIndex(ex.dim)
        index.add(np.arange(len(names), dtype=np.int64), db_vecs)
        out = []
        with self.timer("global_search"):
            for v in q_vecs:
                rows, scores = global_shortlist(index, v, g.shortlist)
                out.append((np.array([names[r] for r in rows.tolist()], object), scores))
        return out

    def pair_counts(self, book: Codebook, query_key) -> PairCounts | None:
        """The pair-count cache of this run's verification (None when verification is off); ``query_key``
        names the query features (their store's key)."""
        if not self.config.rerank.enabled:
            return None
        key = _key(_features_key(self.extractor), query_key, book.fingerprint,
                   _verification_key(self.config.rerank))
        counts = PairCounts(self.cache / f"pairs-{key}.json")
        self.notes["pair_counts"] = str(counts.path)
        return counts

    def build_index(self, book: Codebook, db_store, ids):
        """A fresh database in OUT/index holding ``ids`` (in this order) from the store."""
        path = self.out / "index"
        if path.exists():
            shutil.rmtree(path)
        with self.timer("index"):
            db = self.create_database(path, book)
            self.fill_database(db, db_store, ids, save_every=len(ids))
        return db

    def query_all(self, db, db_store, query_feats: list, depth: int, junk_lists=None,
                  shortlists=None, query_names=None, pairs: PairCounts | None = None) -> list[dict]:
        """THE query path (:func:`~d2r.query.pipeline.search_query`) for every query: one
        :class:`~d2r.query.pipeline.QueryResult` per junk list (``junk_lists``: {name: per-query lists of database
        ids}; None: one run named "" with no junk), ``[{name: QueryResult}]`` in query order. Each query is
        assigned and aggregated once and each pair verified once, whatever the junk lists. Queries run on
        ``workers`` threads, each with numba and BLAS at one thread (as ``Engine.search_batch``); results do not
        depend on the thread count. ``shortlists``: per query, the global stage's ``(ids, scores)``. ``pairs``:
        the cached counts of verified pairs, by ``query_names`` (read before a query, extended after)."""
        config = self.config
        junk_lists = junk_lists or {"": [()] * len(query_feats)}

        def features(image_id):
            return whole_image(db_store.get(image_id))

        def one(qi):
            t0 = time.perf_counter()
            q = prepare_query(query_feats[qi], db, config.rerank)
            prepared = time.perf_counter() - t0
            known = pairs.known(query_names[qi]) if pairs is not None else {}  # shared by its junk lists
            cached = set(known)
            shortlist = None if shortlists is None else shortlists[qi]
            out = {name: search_query(q, db, features, config.rerank, config.qe, depth, junk=lists[qi],
                                      known=known, shortlist=shortlist, global_weight=config.global_.weight)
                   for name, lists in junk_lists.items()}
            next(iter(out.values())).timings["search"] += prepared
            if pairs is not None:
                pairs.update(query_names[qi], known)  # dict updates are atomic under the GIL
                used = {i for r in out.values() for st in r.stages.values() for i in st.ids[st.inliers >= 0].tolist()}
                reused[qi] = len(used & cached)
            return out

        reused = [0] * len(query_feats)  # per query: cached counts it read (not verified again)
        workers = max(1, min(int(self.workers), len(query_feats)))
        db.search_batch([], top_k=1)  # shared caches built once, before the threads
        bar = dict(total=len(query_feats), desc="searching", unit="query", disable=not self.progress)
        try:
            if workers == 1:
                results = [one(qi) for qi in tqdm(range(len(query_feats)), **bar)]
            else:
                def threaded(qi):
                    with numba_threads(1), openmp_blas_one_thread():
                        return one(qi)

                with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
                    results = list(tqdm(pool.map(threaded, range(len(query_feats))), **bar))
        finally:  # an interrupted run keeps the pairs it verified
            if pairs is not None:
                pairs.save()
                self.notes["pairs_reused"] = sum(reused)
        for key in ("search", "rerank", "expand"):
            total = sum(r.timings[key] for out in results for r in out.values())
            self.timer.timing[key] = round(self.timer.timing.get(key, 0.0) + total, 3)
        return results


def _ran(config: BenchConfig, notes: dict, db, stages) -> dict:
    """What a run did, in words a reader of two reports can tell apart (config.yaml, metrics.json, report)."""
    r, qe = config.rerank, config.qe
    verification = "off"
    if r.enabled:
        how = {"usac": f"usac, {r.correspondences} correspondences",
               "lightglue": f"lightglue ({r.lightglue} weights) + usac fit"}.get(r.method, r.method)
        verification = f"{how}, top {r.num_to_rerank}" + (f", >= {r.min_inliers} inliers move up"
                                                          if r.method != "official" else "")
    expansion = "none" if qe.method == "none" else (
        f"{qe.method}, top {qe.top} {'verified' if r.enabled else 'top-ranked'} images")
    book = db.codebook
    return {"stages": list(stages), "verification": verification, "expansion": expansion,
            "kernel": db.config.kernel, "mode": db.config.mode, "features": config.features.name,
            "codebook": {"k": book.size, "dim": book.dim, "fingerprint": book.fingerprint,
                         "path": config.codebook.path, "trained_on": notes.get("codebook_trained_on")}}


def _finish(pipe: _Pipeline, result: dict, extra_outputs: dict) -> dict:
    config_dict = pipe.config.to_dict()
    config_dict["codebook_trained_on"] = pipe.notes.get("codebook_trained_on")
    result["config"] = config_dict
    result["timing"] = pipe.timer.timing
    result["notes"] = {k: v for k, v in pipe.notes.items() if k != "codebook_trained_on"}
    pipe.out.mkdir(parents=True, exist_ok=True)
    shown = dict(config_dict, ran=result.get("ran"))  # the resolved config, then what ran
    _io.write_bytes(pipe.out / "config.yaml", yaml.safe_dump(shown, sort_keys=False).encode())
    for name, value in extra_outputs.items():
        _io.save_npy(pipe.out / name, value)
    _io.write_json(pipe.out / "metrics.json", result)
    return result


# ---- revisitop -----------------------------------------------------------------------------------------------
def run_revisitop(gnd, images_root, config: BenchConfig | None = None, out="bench-run", cache=None,
                  query_in_database: bool | None = None, progress: bool = True,
                  write_report: bool = True) -> dict:
    """Run the revisitop protocol end to end; returns (and writes to OUT/metrics.json) the result dict.

    Args:
        gnd: ``gnd_*.pkl`` / ``.mat`` path (or a loaded :class:`~d2r.eval.revisitop.GroundTruth`).
        images_root: folder holding ``imlist`` / ``qimlist`` images (names with or without extension).
        query_in_database: queries are database images, each junk for itself; None: auto (every ``bbx`` is None
            and every query name is in ``imlist``, as in our dev data).
        cache: feature/codebook cache folder (default OUT/cache); share it between configs.

    Returns ``{"easy"|"medium"|"hard": {"mAP", "mP@1", "mP@5", "mP@10", "mR@k", "num_queries"} (percent),
    the final stage's, "stages": {stage: the same per protocol}, "before_rerank": the initial stage's (when
    verification ran), "per_query": per-query AP (:func:`per_query_ap`), "ran": what ran (verification,
    expansion, kernel, codebook), "index": database info, "timing": seconds per step, "config": resolved
    config + ``codebook_trained_on``, "dataset": counts, "notes": extraction reports, "failed": {path: reason}
    of the images that could not be read (database images rank last, queries score 0)}``.
    """
    t_start = time.perf_counter()
    config = config or BenchConfig()
    g = gnd if isinstance(gnd, GroundTruth) else load_gnd(gnd)
    gnd_key = str(Path(gnd).resolve()) if not isinstance(gnd, GroundTruth) else _key(g.qimlist)
    root = Path(images_root)
    if query_in_database is None:
        names = set(g.imlist)
        query_in_database = all(q.bbx is None for q in g.gnd) and all(n in names for n in g.qimlist)
    pipe = _Pipeline(config, out, cache, progress)

    db_pairs = [(name, resolve_image(root, name)) for name in g.imlist]
    db_store = pipe.database_store(db_pairs, root)
    missing = [n for n in g.imlist if n not in db_store]
    failed = _failed(db_store, db_pairs)
    if missing:
        log.warning("%d database image(s) could not be extracted (ranked last), e.g. %s", len(missing), missing[0])

    # Queries: a query that is itself a database image with no box reuses its whole-image database features.
    reuse = query_in_database and all(q.bbx is None for q in g.gnd)
    query_key = ["db", _regions_key(config), str(root.resolve())]
    if reuse:
        query_feats = [whole_image(db_store.get(n)) if n in db_store else LocalFeatures.empty(db_store.dim)
                       for n in g.qimlist]
        pipe.notes["queries"] = "whole-image features of the database images"
    else:
        items = [(name, resolve_image(root, name), q.bbx) for name, q in zip(g.qimlist, g.gnd)]
        query_key = [str(root.resolve()), gnd_key]
        qstore = pipe.query_store(items, query_key)
        query_feats = [qstore.get(n) if n in qstore else LocalFeatures.empty(qstore.dim) for n in g.qimlist]
        failed.update(_failed(qstore, [(name, p) for name, p, _ in items]))
        pipe.notes["queries"] = "extracted separately, cropped to bbx" if any(
            q.bbx is not None for q in g.gnd) else "extracted separately (whole image)"

    book = pipe.codebook(db_store, root)
    ids = [n for n in g.imlist if n in db_store]
    db = pipe.build_index(book, db_store, ids)
    depth = max(int(config.top_k) if config.top_k else len(ids), 1)
    # Each protocol's junk (the query itself when queries are database images): never verified nor expanding.
    junk = {p: [[g.imlist[j] for j in row.tolist()] for row in g.protocol(p, query_in_database)[1]]
            for p in PROTOCOLS}
    shortlists = None
    if config.global_.enabled:
        query_items = [(name, resolve_image(root, name), q.bbx) for name, q in zip(g.qimlist, g.gnd)]
        shortlists = pipe.global_shortlists(db_pairs, query_items, reuse)
    results = pipe.query_all(db, db_store, query_feats, depth, junk, shortlists, g.qimlist,
                             pipe.pair_counts(book, query_key))
    position = {n: i for i, n in enumerate(g.imlist)}
    stages = {name: {p: [np.array([position[i] for i in r[p].stages[name].ids.tolist()], np.int64)
                         for r in results] for p in PROTOCOLS}
              for name in STAGES if name in results[0]["medium"].stages}
    final = list(stages)[-1]
    medium = [r["medium"] for r in results]
    pipe.notes["pairs_verified"] = int(sum(x.info["verified"] for r in results for x in r.values()))
    if config.qe.method != "none":
        pipe.notes["expansion"] = {"method": config.qe.method,
                                   "mean_neighbours": float(np.mean([r.info["neighbours"] for r in medium])),
                                   "mean_added": float(np.mean([r.info["added"] for r in medium]))}
    with pipe.timer("evaluate"):
        result: dict = {"stages": {name: {p: evaluate(rows[p], g, protocols=[p],
                                                      query_in_database=query_in_database)[p]
                                          for p in PROTOCOLS} for name, rows in stages.items()}}
    result.update(result["stages"][final])
    if "verified" in stages:
        result["before_rerank"] = result["stages"]["initial"]
    result["per_query"] = per_query_ap(stages, g, query_in_database)
    result["ran"] = _ran(config, pipe.notes, db, stages)
    result["index"] = db.info()
    result["failed"] = failed
    result["dataset"] = {"gnd": gnd_key, "images_root": str(root), "num_db": g.num_db, "indexed": len(ids),
                         "num_queries": g.num_queries, "query_in_database": bool(query_in_database)}
    timing = pipe.timer.timing
    timing["total"] = round(time.perf_counter() - t_start, 3)
    timing["search_ms_per_query"] = round(1000 * timing["search"] / max(g.num_queries, 1), 3)
    query_time = sum(timing.get(k, 0.0) for k in ("search", "rerank", "expand"))
    timing["seconds_per_query"] = round(query_time / max(g.num_queries, 1), 4)
    extra = {"ranks.npy": _pad(stages[final]["medium"], depth),
             "scores.npy": _pad([r.final.scores for r in medium], depth, np.nan)}
    extra.update({f"ranks_{name}.npy": _pad(rows["medium"], depth) for name, rows in stages.items()})
    out = _finish(pipe, result, extra)
    if write_report:
        write_revisitop_report(pipe.out, out, g, stages, root, query_in_database, progress=progress)
    return out


def per_query_ap(stages: dict, g, query_in_database: bool) -> dict:
    """Per-query AP in percent for Medium and Hard at every stage: {"queries": names, "medium": {stage: [AP or
    None (no positives)]}, "hard": {...}} (stages in order: initial, verified, expanded)."""
    out: dict = {"queries": list(g.qimlist), "stages": list(stages)}
    for p in ("medium", "hard"):
        pos, junk = g.protocol(p, query_in_database=query_in_database)
        out[p] = {}
        for name, rows in stages.items():
            ap = per_query_metrics(rows[p], pos, junk, g.num_db)["ap"]
            out[p][name] = [None if np.isnan(a) else 100.0 * float(a) for a in ap]
    return out


def _pad(rows, depth: int, fill=-1) -> np.ndarray:
    """Rows of (possibly) different lengths as one array padded with ``fill`` (int64 for -1, else float64)."""
    out = np.full((len(rows), depth), fill, np.int64 if fill == -1 else np.float64)
    for i, r in enumerate(rows):
        out[i, :min(depth, len(r))] = r[:depth]
    return out


def _failed(store, pairs) -> dict:
    """``{path: reason}`` of the ``(id, path)`` pairs missing from ``store``: the images not read."""
    failures = store.failures
    return {str(p): failures.get(i, "not extracted") for i, p in pairs if i not in store}


def run_gldv2(index_csv, test_csv, solution_csv, images_root, config: BenchConfig | None = None,
              out="bench-run", cache=None, progress: bool = True, index_root=None, test_root=None) -> dict:
    """Run the GLDv2 retrieval protocol end to end: index the ``index.csv`` images, search every ``test.csv``
    image (whole image) through THE query path (no junk in this protocol), write ``OUT/predictions.csv`` (top
    100 of the final stage) and evaluate it with the official metric (:func:`d2r.eval.gldv2.evaluate`). Images at
    ``ROOT/a/b/c/<id>.jpg`` (``index_root`` / ``test_root`` default to ``images_root``). Returns ``{"public":
    {...}, "private": {...}, "stages": {stage: {"public", "private"}}, "before_rerank" (when verification ran),
    "timing", "failed": {path: reason} of the images that could not be read (index images not indexed, test
    images with no features), ...}``."""
    t_start = time.perf_counter()
    config = config or BenchConfig()
    solution = gldv2.read_solution(solution_csv)
    index_ids = read_ids(index_csv)
    test_ids = read_ids(test_csv)
    iroot = Path(index_root or images_root)
    troot = Path(test_root or images_root)
    pipe = _Pipeline(config, out, cache, progress)
    db_pairs = [(i, gldv2_path(iroot, i)) for i in index_ids]
    q_pairs = [(i, gldv2_path(troot, i)) for i in test_ids]
    db_store = pipe.database_store(db_pairs, iroot)
    query_key = [str(troot.resolve()), str(Path(test_csv).resolve())]
    qstore = pipe.query_store([(i, p, None) for i, p in q_pairs], query_key)
    failed = {**_failed(db_store, db_pairs), **_failed(qstore, q_pairs)}
    book = pipe.codebook(db_store, iroot)
    ids = [i for i in index_ids if i in db_store]
    db = pipe.build_index(book, db_store, ids)
    depth = int(config.top_k) if config.top_k else 100
    query_feats = [qstore.get(i) if i in qstore else LocalFeatures.empty(qstore.dim) for i in test_ids]
    results = [r[""] for r in pipe.query_all(db, db_store, query_feats, max(depth, 1), query_names=test_ids,
                                             pairs=pipe.pair_counts(book, query_key))]
    names = [n for n in STAGES if n in results[0].stages]
    ranked = {n: [[str(x) for x in r.stages[n].ids.tolist()] for r in results] for n in names}
    pipe.out.mkdir(parents=True, exist_ok=True)
    gldv2.write_predictions(pipe.out / "predictions.csv", test_ids, ranked[names[-1]], max_predictions=100)
    # The CSV keeps every test id (a submission); metrics use the ids the solution knows.
    known = set(solution.public) | set(solution.private) | set(solution.ignored)
    unknown = sum(t not in known for t in test_ids)
    if unknown:
        log.warning("%d test ids are not in the solution: written to predictions.csv, not scored", unknown)
    with pipe.timer("evaluate"):
        result: dict = {"stages": {n: gldv2.evaluate({t: r for t, r in zip(test_ids, ranked[n]) if t in known},
                                                     solution) for n in names}}
    result.update(result["stages"][names[-1]])
    if "verified" in names:
        result["before_rerank"] = result["stages"]["initial"]
    result["ran"] = _ran(config, pipe.notes, db, names)
    result["index"] = db.info()
    result["dataset"] = {"index_csv": str(index_csv), "test_csv": str(test_csv), "solution_csv": str(solution_csv),
                         "num_index": len(index_ids), "indexed": len(ids), "num_test": len(test_ids)}
    result["failed"] = failed
    pipe.timer.timing["total"] = round(time.perf_counter() - t_start, 3)
    return _finish(pipe, result, {})
