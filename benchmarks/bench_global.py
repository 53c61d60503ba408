"""Global descriptors on the dev photos and the global index at 1M synthetic vectors (issue 22, deliverable
5a).

Steps (each builds its inputs; outputs under RUNS, results printed as markdown and written as JSON), from the
repository root with ``PYTHONPATH=.``:

    # 1. backbone feature maps of every database image at scales 1, 1/sqrt(2), 1/2 (cached, timed)
    python benchmarks/bench_global.py extract --data ../shared/data/instance_bench_dev --runs runs/global \
        --backbone mobilenet_v2
    # 2. every pooling x backbone x scales x whitening row: mAP Medium / Hard (revisitop protocol, the query
    # is    junk for itself), paired bootstrap against an ASMK* run of `d2r bench revisitop` (its
    # metrics.json)
    python benchmarks/bench_global.py evaluate --data ../shared/data/instance_bench_dev --runs runs/global \
        --asmk runs/asmk_star_k8192
    # 3. search ms and recall@100 at 1M synthetic vectors: exact (float32, float16) and faiss IVF-PQ
    python benchmarks/bench_global.py scale --runs runs/global --rows 1000000 --dim 512

Whitening is learned without the ground truth: PCA-whitening on the database vectors (the usual unsupervised
protocol; the queries are database images here, so they are part of that training set) and, separately, on the
201 distractor images only (no query, positive or junk image of any query). PWA's channels are chosen on the
database GAP vectors (unsupervised too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from d2r.codebook import _one_blas_thread
from d2r.eval.compare import paired_difference
from d2r.eval.revisitop import load_gnd, per_query_metrics
from d2r.globaldesc import pooling as P
from d2r.globaldesc.postprocess import Whitening, alpha_qe, dba, k_reciprocal, l2_normalize

SCALES = (1.0, 1 / math.sqrt(2), 0.5)
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
POOLS = ("gap", "gmp", "spoc", "crow", "scda", "gem", "rmac", "pwa", "pcb_gem")


def pool_fns(pwa_channels):
    return {"gap": P.gap, "gmp": P.gmp, "spoc": P.spoc, "crow": P.crow, "scda": P.scda,
            "gem": lambda x: P.gem(x, 3.0), "rmac": lambda x: P.rmac(x, 3),
            "pwa": lambda x: P.pwa(x, pwa_channels),
            "pcb_gem": lambda x: P.pcb(x, lambda m: P.gem(m, 3.0), 2)}


def image_path(data: Path, name: str) -> Path:
    p = data / name
    return p if p.is_file() else next(data.glob(name + ".*"))


# ---- 1. extraction -----------------------------------------------------------------------------------------
def cmd_extract(a) -> None:
    from d2r.globaldesc import GlobalConfig, GlobalExtractor

    g = load_gnd(a.data / "gnd.pkl")
    out = a.runs / f"maps-{a.backbone}"
    out.mkdir(parents=True, exist_ok=True)
    ex = GlobalExtractor(GlobalConfig(backbone=a.backbone, size=a.size, scales=SCALES, device=a.device,
                                      threads=a.threads))
    ex.feature_maps(image_path(a.data, g.imlist[0]))  # warm-up (not timed)
    total, done = 0.0, 0
    for i, name in enumerate(g.imlist):
        f = out / f"{i:04d}.npz"
        if f.exists():
            continue
        t = time.perf_counter()
        maps = ex.feature_maps(image_path(a.data, name))
        total += time.perf_counter() - t
        done += 1
        np.savez(f, *maps)
        if done % 50 == 0:
            print(f"{a.backbone}: {i + 1}/{len(g.imlist)} {done / total:.2f} img/s", flush=True)
    info = {"backbone": a.backbone, "size": a.size, "scales": list(SCALES), "threads": a.threads,
            "device": ex.device, "images": done, "seconds": round(total, 2),
            "images_per_s": round(done / total, 3) if total else None, "load": os.getloadavg()}
    prev = out / "timing.json"
    if done or not prev.exists():
        prev.write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


# ---- 2. evaluation -----------------------------------------------------------------------------------------
def pooled_vectors(a, backbone, n):
    """(pooling -> (n, len(SCALES), D) raw pooled vectors), cached; PWA channels from the database GAP."""
    cache = a.runs / f"pooled-{backbone}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}, json.loads((a.runs / f"pooled-{backbone}.json").read_text())
    maps_dir = a.runs / f"maps-{backbone}"
    gap_s1 = []
    for i in range(n):
        with np.load(maps_dir / f"{i:04d}.npz") as z:
            gap_s1.append(P.gap(z["arr_0"]))
    channels = P.select_pwa_channels(np.stack(gap_s1), 25)
    fns = pool_fns(channels)
    out = {k: [] for k in POOLS}
    with _one_blas_thread():
        secs = _pool_all(maps_dir, n, fns, out)
    arrays = {k: np.stack(v).astype(np.float32) for k, v in out.items()}
    np.savez(cache, **arrays)
    info = {"pool_ms_per_image_3_scales": {k: round(1000 * s / n, 2) for k, s in secs.items()},
            "pwa_channels": channels.tolist()}
    (a.runs / f"pooled-{backbone}.json").write_text(json.dumps(info))
    return arrays, info


def _pool_all(maps_dir, n, fns, out):
    secs = {k: 0.0 for k in POOLS}
    for i in range(n):
        with np.load(maps_dir / f"{i:04d}.npz") as z:
            maps = [z[f"arr_{j}"] for j in range(len(SCALES))]
        for k, fn in fns.items():
            t = time.perf_counter()
            out[k].append(np.stack([fn(m) for m in maps]))
            secs[k] += time.perf_counter() - t
    return secs


def aggregate(raw: np.ndarray, multi: bool) -> np.ndarray:
    """(n, S, D) → (n, D): scale 1 only, or the mean of the L2-normalised scales; then L2."""
    v = raw[:, :1] if not multi else raw
    return l2_normalize(l2_normalize(v).mean(axis=1))


def per_query_ap(ranks, g):
    out = {}
    for p in ("medium", "hard"):
        pos, junk = g.protocol(p, query_in_database=True)
        ap = per_query_metrics(ranks, pos, junk, g.num_db)["ap"]
        out[p] = [None if np.isnan(x) else 100.0 * float(x) for x in ap]
    return out


def mean_ap(v):
    v = [x for x in v if x is not None]
    return float(np.mean(v))


def cmd_evaluate(a) -> None:
    g = load_gnd(a.data / "gnd.pkl")
    n = g.num_db
    qidx = np.array([g.imlist.index(q) for q in g.qimlist])
    used = set(qidx.tolist())
    for q in g.gnd:
        used |= set(q.easy.tolist()) | set(q.hard.tolist()) | set(q.junk.tolist())
    distractors = np.array(sorted(set(range(n)) - used))
    asmk = None
    if a.asmk:
        m = json.loads((a.asmk / "metrics.json").read_text())
        asmk = {st: {p: m["per_query"][p][st] for p in ("medium", "hard")} for st in m["per_query"]["stages"]}
    rows, extra = [], {}
    for backbone in BACKBONES:
        if not (a.runs / f"maps-{backbone}").exists():
            continue
        raw, info = pooled_vectors(a, backbone, n)
        extra[backbone] = info
        for pooling in POOLS:
            for multi in (False, True):
                x = aggregate(raw[pooling], multi)
                for wname in ("none", "pcaw-db", "pcaw-distractors"):
                    if wname == "none":
                        y = x
                        wdim = x.shape[1]
                    else:
                        train = x if wname == "pcaw-db" else x[distractors]
                        w = Whitening("pca_whiten").fit(train, {"trained_on": wname})
                        y = w.transform(x)
                        wdim = w.dim
                    ranks = np.argsort(-(y[qidx] @ y.T), axis=1, kind="stable")
                    pq = per_query_ap(ranks, g)
                    row = {"backbone": backbone, "pooling": pooling, "scales": "1,0.71,0.5" if multi else "1",
                           "whitening": wname, "dim": int(wdim), "medium": mean_ap(pq["medium"]),
                           "hard": mean_ap(pq["hard"]), "per_query": pq}
                    if asmk:
                        for st in asmk:
                            row[f"vs_asmk_{st}"] = {p: paired_difference(asmk[st][p], pq[p]) for p in
                                                    ("medium", "hard")}
                    rows.append(row)
                    print(f"{backbone:18s} {pooling:8s} ms={int(multi)} {wname:17s} D={wdim:5d} "
                          f"M {row['medium']:6.2f} H {row['hard']:6.2f}", flush=True)
    post = post_rows(a, g, qidx, rows, asmk)
    result = {"rows": rows, "post": post, "pooling_info": extra, "asmk_run": str(a.asmk) if a.asmk else None,
              "asmk": {st: {p: mean_ap(v[p]) for p in v} for st, v in asmk.items()} if asmk else None,
              "num_queries": len(qidx), "distractors": int(distractors.size), "load": os.getloadavg()}
    (a.runs / "evaluate.json").write_text(json.dumps(result))
    print_tables(result)


def post_rows(a, g, qidx, rows, asmk):
    """PyRetri's post-processing with its default parameters on the GeM multi-scale rows (no tuning here):
    αQE (k 10, α 3), DBA (k 10, uniform), k-reciprocal (k1 20, k2 6, λ 0.3)."""
    out = []
    for backbone in BACKBONES:
        if not (a.runs / f"pooled-{backbone}.npz").exists():
            continue
        raw, _ = pooled_vectors(a, backbone, g.num_db)
        x = aggregate(raw["gem"], True)
        y = Whitening("pca_whiten").fit(x).transform(x)
        for name in ("none", "aqe", "dba", "dba+aqe", "k-reciprocal"):
            db = dba(y, 10) if name.startswith("dba") else y
            q = db[qidx] if name.startswith("dba") else y[qidx]
            s = q @ db.T
            if name.endswith("aqe"):
                ids = np.argsort(-s, axis=1, kind="stable")[:, :10]
                q = alpha_qe(q, db, ids, np.take_along_axis(s, ids, 1), k=10, alpha=3.0)
                s = q @ db.T
            if name == "k-reciprocal":
                s = -k_reciprocal(q, db, 20, 6, 0.3)
            ranks = np.argsort(-s, axis=1, kind="stable")
            pq = per_query_ap(ranks, g)
            row = {"backbone": backbone, "post": name, "medium": mean_ap(pq["medium"]),
                   "hard": mean_ap(pq["hard"]), "per_query": pq}
            if asmk:
                row["vs_asmk_initial"] = {p: paired_difference(asmk["initial"][p], pq[p])
                                          for p in ("medium", "hard")}
            out.append(row)
    return out


def fmt_ci(r):
    return f"{r['diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"


def print_tables(res) -> None:
    print("\n| backbone | pooling | scales | whitening | D | Medium | Hard | Medium − ASMK* | Hard − ASMK* |")
    print("|---|---|---|---|---:|---:|---:|---|---|")
    for r in res["rows"]:
        vs = r.get("vs_asmk_initial")
        cm = fmt_ci(vs["medium"]) if vs else ""
        ch = fmt_ci(vs["hard"]) if vs else ""
        print(f"| {r['backbone']} | {r['pooling']} | {r['scales']} | {r['whitening']} | {r['dim']} | "
              f"{r['medium']:.2f} | {r['hard']:.2f} | {cm} | {ch} |")
    print("\n| backbone | post-processing | Medium | Hard | Medium − ASMK* | Hard − ASMK* |")
    print("|---|---|---:|---:|---|---|")
    for r in res["post"]:
        vs = r.get("vs_asmk_initial")
        print(f"| {r['backbone']} | {r['post']} | {r['medium']:.2f} | {r['hard']:.2f} | "
              f"{fmt_ci(vs['medium']) if vs else ''} | {fmt_ci(vs['hard']) if vs else ''} |")


# ---- 3. search at scale ------------------------------------------------------------------------------------
def synthetic(rng, n, dim, centres):
    """Clustered unit vectors: a centre (of ``centres`` random unit directions) plus isotropic noise."""
    c = rng.integers(0, centres.shape[0], n)
    x = centres[c] + rng.normal(scale=0.6 / math.sqrt(dim), size=(n, dim)).astype(np.float32)
    return l2_normalize(x)


def cmd_scale(a) -> None:
    from d2r.globaldesc.index import GlobalIndex

    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.normal(size=(a.rows // 50, a.dim)).astype(np.float32))
    queries = synthetic(np.random.default_rng(1), 100, a.dim, centres)
    res = {"rows": a.rows, "dim": a.dim, "queries": 100, "load_start": os.getloadavg()}
    for dtype in ("float32", "float16"):
        path = a.runs / f"scale-{dtype}"
        if not (path / "manifest.json").exists():
            t = time.perf_counter()
            idx = GlobalIndex.create(path, a.dim, dtype)
            gen = np.random.default_rng(2)
            for start in range(0, a.rows, 100_000):
                m = min(100_000, a.rows - start)
                idx.add(np.arange(start, start + m), synthetic(gen, m, a.dim, centres))
                idx.save()
            idx.close()
            res[f"build_s_{dtype}"] = round(time.perf_counter() - t, 1)
        idx = GlobalIndex.open(path)
        t = time.perf_counter()
        idx.search(queries[:1], 100)  # first query: the file comes into the page cache
        res[f"exact_{dtype}_ms_first_query"] = round(1000 * (time.perf_counter() - t), 1)
        times = []
        for q in queries[:10]:
            t = time.perf_counter()
            idx.search(q, 100)
            times.append(1000 * (time.perf_counter() - t))
        res[f"exact_{dtype}_ms_one_query_median"] = round(float(np.median(times)), 1)
        t = time.perf_counter()
        exact_ids, _ = idx.search(queries, 100)
        res[f"exact_{dtype}_ms_per_query_batch100"] = round(10 * (time.perf_counter() - t), 2)
        res[f"bytes_per_vector_{dtype}"] = int(np.dtype(dtype).itemsize * a.dim + 8)
        if dtype == "float32":
            truth = exact_ids
        else:
            res["float16_recall@100_vs_float32"] = float(np.mean([len(set(x) & set(y)) / 100
                                                                   for x, y in zip(exact_ids, truth)]))
        print(json.dumps(res), flush=True)
    try:
        import faiss  # noqa: F401
    except ImportError:
        res["faiss"] = "faiss-cpu not installed"
        print(json.dumps(res))
        return
    path = a.runs / "scale-float32"
    idx = GlobalIndex.open(path, writable=True)
    if idx._ann is None:
        t = time.perf_counter()
        idx.build_ann(nlist=a.nlist, m=a.pq_m, nbits=8, train_size=100_000, threads=a.threads)
        idx.save()
        res["ivfpq_build_s"] = round(time.perf_counter() - t, 1)
    res["ivfpq"] = {"nlist": a.nlist, "m": a.pq_m, "nbits": 8, "bytes_per_vector": a.pq_m + 8}
    res["ivfpq"]["runs"] = []
    for nprobe, refine in ((4, 4), (16, 4), (64, 4), (64, 16), (256, 16)):
        t = time.perf_counter()
        for q in queries[:20]:
            idx.search(q, 100, nprobe=nprobe, refine=refine)
        one = 1000 * (time.perf_counter() - t) / 20
        ann_ids, _ = idx.search(queries, 100, nprobe=nprobe, refine=refine)
        run = {"nprobe": nprobe, "refine": refine, "ms_one_query": round(one, 2)}
        for k in (10, 100):
            run[f"recall@{k}"] = round(float(np.mean([len(set(x[:k]) & set(y[:k])) / k
                                                      for x, y in zip(ann_ids, truth)])), 4)
        res["ivfpq"]["runs"].append(run)
        print(json.dumps(run), flush=True)
    idx.close()
    res["load_end"] = os.getloadavg()
    (a.runs / "scale.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("extract", "evaluate", "scale"):
        p = sub.add_parser(name)
        p.add_argument("--runs", type=Path, default=Path("runs/global"))
        p.add_argument("--data", type=Path, default=Path("../shared/data/instance_bench_dev"))
        p.add_argument("--threads", type=int, default=1, help="torch / faiss threads (1: best on a busy box)")
    sub.choices["extract"].add_argument("--backbone", choices=BACKBONES, required=True)
    sub.choices["extract"].add_argument("--size", type=int, default=1024)
    sub.choices["extract"].add_argument("--device", default="auto")
    sub.choices["evaluate"].add_argument("--asmk", type=Path, help="a `d2r bench revisitop` run folder")
    sub.choices["scale"].add_argument("--rows", type=int, default=1_000_000)
    sub.choices["scale"].add_argument("--dim", type=int, default=512)
    sub.choices["scale"].add_argument("--nlist", type=int, default=1024)
    sub.choices["scale"].add_argument("--pq-m", type=int, default=64)
    a = ap.parse_args(argv)
    a.runs.mkdir(parents=True, exist_ok=True)
    {"extract": cmd_extract, "evaluate": cmd_evaluate, "scale": cmd_scale}[a.cmd](a)


if __name__ == "__main__":
    main()
