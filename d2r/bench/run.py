"""Benchmark runners: revisitop (ROxford5k / RParis6k, our dev set) and GLDv2 retrieval, one call each.

    result = run_revisitop("gnd_roxford5k.pkl", "data/roxford5k/jpg", BenchConfig.from_file("cfg.yaml"), "runs/x")

Steps: database features (whole image + the regions of ``config.regions``, re-extracted on crops) and query
features (cropped to the rounded ``bbx`` when the ground truth gives one, never split into regions) are extracted
into feature stores under the cache folder (resumable: an interrupted run picks up where it stopped); a codebook is
loaded (``codebook.path``) or trained with k-means on ``codebook_images`` (the academic convention: the OTHER
dataset) or, without it, on the database images themselves (recorded as ``codebook_trained_on`` in the output
config), and cached; the :class:`~d2r.index.Database` is built in ``OUT/index``; every query is searched, optionally
re-ranked by geometric verification (``verify``, with each protocol's junk, as the official code), and evaluated.

Cache keys are hashes of what determines the content (extractor config, regions config, image root, ground truth,
codebook options), so several configs sharing one cache folder reuse each other's features and codebooks.
Outputs in ``OUT``: ``metrics.json`` (the result dict), ``config.yaml`` (the resolved config), ``index/``,
``ranks.npy`` (revisitop, database indices best first per query) or ``predictions.csv`` (GLDv2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.codebook import Codebook
from d2r.diffuse import DiffusionConfig
from d2r.engine.config import EngineConfig
from d2r.features.base import LocalFeatures, whole_image  # noqa: F401  (whole_image: part of this API)
from d2r.build import Pipeline, check_setup
from d2r.eval.datasets import gldv2_path, query_box, read_ids, resolve_image
from d2r.query.verify import order_verified
from d2r.aggregate import Aggregator
from d2r.bench.report import write_revisitop_report
from d2r.diffuse import DiffusionGraph
from d2r.diffuse import rank_by_diffusion
from d2r.eval.revisitop import PROTOCOLS
from d2r.eval import gldv2
from d2r.eval.revisitop import PROTOCOLS, GroundTruth, evaluate, load_gnd
from d2r.eval.revisitop import per_query_metrics
from d2r.features.base import RegionFeatures
from d2r.features.image import list_images
from d2r.features.store import FeatureStore
from d2r.query.expand import augment_database
from d2r.query.pipeline import expanded_query, reliable_neighbours
from d2r.query.verify import geometric_verification
from d2r.query.verify import order_verified

log = logging.getLogger(__name__)


@dataclass
class BenchConfig(EngineConfig):
    """An :class:`~d2r.engine.EngineConfig` (same YAML sections: features, regions, codebook, index, rerank,
    batch_size, workers) plus what only a benchmark needs.

    Attributes:
        verify: re-rank the top ``rerank.num_to_rerank`` by geometric verification (off by default here; the
            engine verifies at search time).
        codebook_images: folder / list file of the images a codebook is trained on (academic convention: the
            other dataset); None trains on the database images. Ignored when ``codebook.path`` is set.
        top_k: search depth; None ranks the whole database (revisitop) or the top 100 (GLDv2).
        query_expansion: "none" here (the engine's default is "aqe"): a benchmark expands only when asked.
        diffusion: rank by diffusion on the database's kNN graph (:mod:`d2r.diffuse`; off by default), after
            verification when ``verify`` is on; not combined with query expansion.
    """
    _index_time_dba: typing.ClassVar[bool] = True
    verify: bool = False
    codebook_images: str | None = None
    top_k: int | None = None
    query_expansion: str = "none"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def check(self) -> "BenchConfig":
        super().check()
        self.diffusion.validate()
        if self.diffusion.enabled and self.query_expansion != "none":
            raise ValueError("diffusion.enabled and query_expansion are alternatives; "
                             "set query_expansion: none")
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
            report = self.extract_to_store(self.cache / name, pairs, desc=f"extract {self.extractor.name}")
        self.notes["database_extraction"] = report
        return FeatureStore.open(self.cache / name)

    def query_store(self, items, key_parts):
        """Feature store of the queries: ``items`` = [(query_id, path, bbx or None)]; cropped, no regions."""
        path = self.cache / ("queries-" + _key(_features_key(self.extractor), key_parts))
        boxes = {qid: bbx for qid, _, bbx in items}

        def crop_fn(image_id, source):
            return self.extract_query(source, query_box(boxes[image_id]), name=str(image_id))

        with self.timer("extract_queries"):
            report = self.extract_to_store(path, [(q, p) for q, p, _ in items], fn=crop_fn,
                                           desc="extract queries")
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
                self.extract_to_store(tpath, list_images(source), fn=lambda _, p: self.extract_query(p),
                                      desc="extract codebook images")
            store = FeatureStore.open(tpath)
        with self.timer("train_codebook"):
            book = self.train_codebook(store, train_on)
        self.cache.mkdir(parents=True, exist_ok=True)
        book.save(path)
        return book

    def build_index(self, book: Codebook, db_store, ids):
        """A fresh database in OUT/index holding ``ids`` (in this order) from the store."""
        path = self.out / "index"
        if path.exists():
            shutil.rmtree(path)
        with self.timer("index"):
            db = self.create_database(path, book)
            self.fill_database(db, db_store, ids, save_every=len(ids))
        return db

    def search(self, db, queries: list[np.ndarray], depth: int):
        with self.timer("search"):
            return db.search_batch(queries, top_k=depth, workers=self.workers)


def verify_candidates(query: LocalFeatures, candidate_ids, get_features, config, codebook=None) -> dict:
    """Inlier count of each candidate id (geometric verification, :func:`d2r.rerank.geometric_verification`)."""
    candidate_ids = list(candidate_ids)
    if not candidate_ids:
        return {}
    counts = geometric_verification(query, [get_features(i) for i in candidate_ids], config, codebook)
    return dict(zip(candidate_ids, counts.tolist()))


def augment_index(pipe: _Pipeline, db, book: Codebook, db_store, ids):
    """Database-side augmentation (``qe.dba_top``, :func:`d2r.expand.augment_database`): every image's
    record is averaged with its ``dba_top`` nearest database images (only those with at least
    ``rerank.min_inliers`` inliers when ``verify`` is on), then OUT/index is rebuilt from the augmented
    records. Aggregation mode only.
    Offline cost: one search per database image (quadratic; fine for benchmark-sized databases)."""
    config = pipe.config
    qe, rr = config.qe.validate(), config.rerank.validate()
    if db.mode != "aggregation":
        raise ValueError("qe.dba_top needs index.mode 'aggregation'")
    agg = Aggregator(book, db.kernel, db.config.num_assignments)
    verify = bool(config.verify and rr.num_to_rerank > 0)

    def features(i):
        return whole_image(db_store.get(i))

    with pipe.timer("dba"):
        records, neighbours, kept = {}, {}, []
        for i in ids:
            records[i] = _image_record(agg, db_store.get(i))
        for i in ids:
            found = db.search(records[i], top_k=qe.dba_top + 1).ids.tolist()
            ranked = [n for n in found if n != i][: qe.dba_top]
            if verify and ranked:
                inl = verify_candidates(features(i), ranked, features, rr, book)
                ranked = [n for n in ranked if inl[n] >= rr.min_inliers]
            neighbours[i] = ranked
            kept.append(len(ranked))
        augmented = augment_database(records, neighbours, qe.alpha, db.config.normalize)
        path = pipe.out / "index"
        db.close()
        shutil.rmtree(path)
        db = pipe.create_database(path, book)
        for i in ids:
            db.add_aggregated(i, augmented[i])
        db.save()
    pipe.notes["dba"] = {"top": qe.dba_top, "verified": verify, "mean_neighbours": float(np.mean(kept))}
    return db


def _image_record(agg, features):
    """The aggregation-mode record of a stored image (its regions aggregated together when it has any)."""
    if isinstance(features, RegionFeatures):
        return agg(features.features.descriptors, features.counts)
    return agg(features.descriptors)


def diffusion_graph(pipe: _Pipeline, db, book: Codebook, db_store, imlist):
    """The offline :class:`~d2r.diffuse.DiffusionGraph` of the database: nodes are positions in ``imlist``
    (images missing from the store are isolated nodes), each image's ``diffusion.k`` neighbours found by
    searching the index with the image's own record (one search per database image)."""
    cfg = pipe.config.diffusion.validate()
    agg = Aggregator(book, db.kernel, db.config.num_assignments)
    position = {n: i for i, n in enumerate(imlist)}
    nb = np.full((len(imlist), cfg.k + 1), -1, np.int64)
    sims = np.zeros((len(imlist), cfg.k + 1))
    with pipe.timer("diffusion_graph"):
        for i, name in enumerate(imlist):
            if name not in db_store:
                continue
            found = db.search(_image_record(agg, db_store.get(name)), top_k=cfg.k + 1)
            m = len(found.ids)
            nb[i, :m] = [position[x] for x in found.ids.tolist()]
            sims[i, :m] = found.scores
        graph = DiffusionGraph(cfg).fit(nb, sims)
    pipe.notes["diffusion"] = {"k": cfg.k, "query_k": cfg.query_k, "gamma": cfg.gamma, "alpha": cfg.alpha,
                               "iterations": cfg.iterations,
                               "mean_degree": float(graph.rows_.size / max(len(imlist), 1))}
    return graph


def _finish(pipe: _Pipeline, result: dict, extra_outputs: dict) -> dict:
    config_dict = pipe.config.to_dict()
    config_dict["codebook_trained_on"] = pipe.notes.get("codebook_trained_on")
    result["config"] = config_dict
    result["timing"] = pipe.timer.timing
    result["notes"] = {k: v for k, v in pipe.notes.items() if k != "codebook_trained_on"}
    pipe.out.mkdir(parents=True, exist_ok=True)
    import yaml

    _io.write_bytes(pipe.out / "config.yaml", yaml.safe_dump(config_dict, sort_keys=False).encode())
    for name, (kind, value) in extra_outputs.items():
        if kind == "npy":
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
    "before_rerank": {...} (only with ``verify``), "index": database info, "timing": seconds per step,
    "config": resolved config + ``codebook_trained_on``, "dataset": counts, "notes": extraction reports,
    "failed": {path: reason} of the images that could not be read (database images rank last, queries score 0)}``.
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
    if reuse:
        query_feats = [whole_image(db_store.get(n)) if n in db_store else LocalFeatures.empty(db_store.dim)
                       for n in g.qimlist]
        pipe.notes["queries"] = "whole-image features of the database images"
    else:
        items = [(name, resolve_image(root, name), q.bbx) for name, q in zip(g.qimlist, g.gnd)]
        qstore = pipe.query_store(items, [str(root.resolve()), gnd_key])
        query_feats = [qstore.get(n) if n in qstore else LocalFeatures.empty(qstore.dim) for n in g.qimlist]
        failed.update(_failed(qstore, [(name, p) for name, p, _ in items]))
        pipe.notes["queries"] = "extracted separately, cropped to bbx" if any(
            q.bbx is not None for q in g.gnd) else "extracted separately (whole image)"

    book = pipe.codebook(db_store, root)
    ids = [n for n in g.imlist if n in db_store]
    db = pipe.build_index(book, db_store, ids)
    if config.qe.dba_top > 0:
        db = augment_index(pipe, db, book, db_store, ids)
    graph = diffusion_graph(pipe, db, book, db_store, g.imlist) if config.diffusion.enabled else None
    depth = int(config.top_k) if config.top_k else len(ids)
    rankings = pipe.search(db, [q.descriptors for q in query_feats], max(depth, 1))
    position = {n: i for i, n in enumerate(g.imlist)}
    ranks = [np.array([position[i] for i in r.ids.tolist()], np.int64) for r in rankings]

    with pipe.timer("evaluate"):
        metrics = evaluate(ranks, g, query_in_database=query_in_database)
    result: dict = {}
    extra = {}
    stages = {"initial": {p: ranks for p in PROTOCOLS}}
    if (config.verify and config.rerank.num_to_rerank > 0) or config.query_expansion != "none" or graph:
        stages = _revisitop_stages(pipe, g, db, db_store, query_feats, ranks, rankings, depth, query_in_database,
                                   progress, graph)
        if "verified" in stages:
            result["before_rerank"] = metrics
            extra["ranks_reranked_medium.npy"] = ("npy", _pad(stages["verified"]["medium"], depth))
        if "expanded" in stages:
            extra["ranks_expanded_medium.npy"] = ("npy", _pad(stages["expanded"]["medium"], depth))
        if "diffused" in stages:
            extra["ranks_diffused_medium.npy"] = ("npy", _pad(stages["diffused"]["medium"], depth))
        with pipe.timer("evaluate"):
            final = stages[list(stages)[-1]]
            metrics = {p: evaluate(final[p], g, protocols=[p], query_in_database=query_in_database)[p]
                       for p in PROTOCOLS}
            result["stages"] = {name: {p: evaluate(r[p], g, protocols=[p], query_in_database=query_in_database)[p]
                                       for p in PROTOCOLS} for name, r in stages.items()}
    result["per_query"] = per_query_ap(stages, g, query_in_database)
    result.update({p: metrics[p] for p in PROTOCOLS})
    result["index"] = db.info()
    result["failed"] = failed
    result["dataset"] = {"gnd": gnd_key, "images_root": str(root), "num_db": g.num_db, "indexed": len(ids),
                         "num_queries": g.num_queries, "query_in_database": bool(query_in_database)}
    pipe.timer.timing["total"] = round(time.perf_counter() - t_start, 3)
    pipe.timer.timing["search_ms_per_query"] = round(1000 * pipe.timer.timing["search"] / max(g.num_queries, 1), 3)
    query_time = sum(pipe.timer.timing.get(k, 0.0) for k in ("search", "rerank", "expand", "diffuse"))
    pipe.timer.timing["seconds_per_query"] = round(query_time / max(g.num_queries, 1), 4)
    extra["ranks.npy"] = ("npy", _pad(ranks, depth))
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


def _revisitop_stages(pipe: _Pipeline, g, db, db_store, query_feats, ranks, rankings, depth: int,
                      query_in_database: bool, progress: bool, graph=None) -> dict:
    """Rankings per stage and protocol: {"initial", "verified" (with ``verify``), "expanded" (with query
    expansion), "diffused" (with a diffusion ``graph``: seeded by the initial top ``diffusion.query_k`` and
    the verified images, then verified images first by the same rule)} -> {protocol: [per-query database
    indices]}. Verification works on each protocol's junk-free
    top ``rerank.num_to_rerank`` (the official protocol); expansion neighbours are chosen without ground truth
    (only the query's own image is skipped when queries are database images)."""
    from tqdm.auto import tqdm


    config = pipe.config
    rr = config.rerank.validate()
    verify = bool(config.verify and rr.num_to_rerank > 0)
    method = config.query_expansion
    junk_lists = {p: g.protocol(p, query_in_database=query_in_database)[1] for p in PROTOCOLS}
    self_ids = g.query_db_ids() if query_in_database else None
    stages = {"initial": {p: list(ranks) for p in PROTOCOLS}}

    def features(i):
        return whole_image(db_store.get(g.imlist[i]))

    def verify_missing(qi, ranked, inl: dict) -> int:
        cands: list[int] = []
        for p in PROTOCOLS:
            jk = set(junk_lists[p][qi].tolist())
            cands.extend([x for x in ranked.tolist() if x not in jk][: rr.num_to_rerank])
        cands = [c for c in dict.fromkeys(cands) if c not in inl]
        inl.update(verify_candidates(query_feats[qi], cands, features, rr, db.codebook))
        return len(cands)

    def reorder(qi, ranked, scores, inl):
        return {p: order_verified(ranked, scores, inl, rr, junk_lists[p][qi].tolist())[0] for p in PROTOCOLS}

    inliers = [dict() for _ in range(g.num_queries)]
    pairs = 0
    if verify:
        stages["verified"] = {p: [] for p in PROTOCOLS}
        with pipe.timer("rerank"):
            for qi in tqdm(range(g.num_queries), desc="verifying", unit="query", disable=not progress):
                pairs += verify_missing(qi, ranks[qi], inliers[qi])
                for p, r in reorder(qi, ranks[qi], rankings[qi].scores, inliers[qi]).items():
                    stages["verified"][p].append(r)
    if method != "none":
        qe = config.qe.validate()
        position = {n: i for i, n in enumerate(g.imlist)}
        stages["expanded"] = {p: [] for p in PROTOCOLS}
        used = []
        with pipe.timer("expand"):
            for qi in tqdm(range(g.num_queries), desc=f"expanding ({method})", unit="query", disable=not progress):
                exclude = () if self_ids is None else (int(self_ids[qi]),)
                nb = reliable_neighbours(ranks[qi], rankings[qi].scores, inliers[qi] if verify else None, qe.top,
                                         rr.min_inliers, exclude)
                rec, info = expanded_query(method, db, query_feats[qi].descriptors, nb,
                                           lambda i: features(i).descriptors, qe, verify)
                used.append(info)
                ranking = db.search(rec, top_k=max(depth, 1))
                ranked = np.array([position[i] for i in ranking.ids.tolist()], np.int64)
                if verify:
                    pairs += verify_missing(qi, ranked, inliers[qi])
                    for p, r in reorder(qi, ranked, ranking.scores, inliers[qi]).items():
                        stages["expanded"][p].append(r)
                else:
                    for p in PROTOCOLS:
                        stages["expanded"][p].append(ranked)
        pipe.notes["expansion"] = {"method": method,
                                   "mean_neighbours": float(np.mean([u["neighbours"] for u in used])),
                                   "mean_added": float(np.mean([u.get("added", 0) for u in used]))}
    if graph is not None:
        stages["diffused"] = {p: [] for p in PROTOCOLS}
        with pipe.timer("diffuse"):
            for qi in tqdm(range(g.num_queries), desc="diffusing", unit="query", disable=not progress):
                strong = [c for c, n in inliers[qi].items() if n >= rr.min_inliers] if verify else []
                f = graph.diffuse(graph.seeds(ranks[qi], rankings[qi].scores, strong))
                ranked, fv = rank_by_diffusion(f, ranks[qi])
                if verify:
                    pairs += verify_missing(qi, ranked, inliers[qi])
                    fv = fv / max(float(fv.max(initial=0.0)), 1e-300)  # [0, 1] like the index's scores
                    for p, r in reorder(qi, ranked, fv, inliers[qi]).items():
                        stages["diffused"][p].append(r)
                else:
                    for p in PROTOCOLS:
                        stages["diffused"][p].append(ranked)
    if verify:
        pipe.notes["pairs_verified"] = pairs
    return stages


def _pad(rows, depth: int) -> np.ndarray:
    """Rows of (possibly) different lengths as one int64 array padded with -1."""
    out = np.full((len(rows), depth), -1, np.int64)
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
    image (whole image), optionally verify, write ``OUT/predictions.csv`` (top 100) and evaluate it with the
    official metric (:func:`d2r.eval.gldv2.evaluate`). Images at ``ROOT/a/b/c/<id>.jpg`` (``index_root`` /
    ``test_root`` default to ``images_root``). Returns ``{"public": {...}, "private": {...}, "timing",
    "failed": {path: reason} of the images that could not be read (index images not indexed, test images
    with no features), ...}``."""
    t_start = time.perf_counter()
    config = config or BenchConfig()
    if config.diffusion.enabled:
        raise ValueError("diffusion.enabled: the GLDv2 runner does not diffuse (revisitop only)")
    solution = gldv2.read_solution(solution_csv)
    index_ids = read_ids(index_csv)
    test_ids = read_ids(test_csv)
    iroot = Path(index_root or images_root)
    troot = Path(test_root or images_root)
    pipe = _Pipeline(config, out, cache, progress)
    db_pairs = [(i, gldv2_path(iroot, i)) for i in index_ids]
    q_pairs = [(i, gldv2_path(troot, i)) for i in test_ids]
    db_store = pipe.database_store(db_pairs, iroot)
    qstore = pipe.query_store([(i, p, None) for i, p in q_pairs],
                              [str(troot.resolve()), str(Path(test_csv).resolve())])
    failed = {**_failed(db_store, db_pairs), **_failed(qstore, q_pairs)}
    book = pipe.codebook(db_store, iroot)
    ids = [i for i in index_ids if i in db_store]
    db = pipe.build_index(book, db_store, ids)
    depth = int(config.top_k) if config.top_k else 100
    query_feats = [qstore.get(i) if i in qstore else LocalFeatures.empty(qstore.dim) for i in test_ids]
    rankings = pipe.search(db, [q.descriptors for q in query_feats], max(depth, 1))
    ranked = [[str(x) for x in r.ids.tolist()] for r in rankings]
    result: dict = {}
    if config.verify and config.rerank.num_to_rerank > 0:
        rr = config.rerank.validate()
        scored = set(solution.public) | set(solution.private)
        result["before_rerank"] = gldv2.evaluate({t: r for t, r in zip(test_ids, ranked) if t in scored}, solution)
        with pipe.timer("rerank"):
            for qi, q in enumerate(query_feats):
                cands = ranked[qi][: rr.num_to_rerank]
                inl = verify_candidates(q, cands, lambda i: whole_image(db_store.get(i)), rr, db.codebook)
                new_ids, _, _ = order_verified(np.array(ranked[qi], dtype=object), rankings[qi].scores, inl, rr)
                ranked[qi] = [str(x) for x in new_ids.tolist()]
    pipe.out.mkdir(parents=True, exist_ok=True)
    gldv2.write_predictions(pipe.out / "predictions.csv", test_ids, ranked, max_predictions=100)
    # The CSV keeps every test id (a submission); metrics use the ids the solution knows.
    known = set(solution.public) | set(solution.private) | set(solution.ignored)
    unknown = sum(t not in known for t in test_ids)
    if unknown:
        log.warning("%d test ids are not in the solution: written to predictions.csv, not scored", unknown)
    with pipe.timer("evaluate"):
        result.update(gldv2.evaluate({t: r for t, r in zip(test_ids, ranked) if t in known}, solution))
    result["index"] = db.info()
    result["dataset"] = {"index_csv": str(index_csv), "test_csv": str(test_csv), "solution_csv": str(solution_csv),
                         "num_index": len(index_ids), "indexed": len(ids), "num_test": len(test_ids)}
    result["failed"] = failed
    pipe.timer.timing["total"] = round(time.perf_counter() - t_start, 3)
    return _finish(pipe, result, {})
