"""``d2r search``: query an index with one or many photos."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from d2r._log import muted
from d2r.cli import UsageError
from d2r.distributed import ShardedEngine
from d2r.engine import Engine
from d2r.features.image import IMAGE_EXTENSIONS, list_images, read_list_file


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("search", help="search an index with photos",
                              description="Rank the images of an index by how well they show the same instance "
                                          "as each query photo (optionally cropped to a box). Queries: image "
                                          "files, folders (searched recursively) or list files (one path a line); "
                                          "several are searched in one process, in parallel threads.")
    p.add_argument("image", nargs="+", help="query image file(s), folder(s) or list file(s)")
    p.add_argument("--index", required=True, action="append",
                   help="engine folder (made by `d2r index create`); repeat it for the shards of a sharded "
                        "index (each indexes a block of the images, same config and codebook)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="search the shards on Ray actors: a cluster address ('auto', HOST:PORT) or none for a "
                        "local Ray; a shard NODE_IP:/path is opened on that node (pip install -e '.[ray]')")
    p.add_argument("--bbox", help="crop the query to x1,y1,x2,y2 (pixels; a single query image only)")
    p.add_argument("--top-k", type=int, default=10, help="results to show (default 10)")
    p.add_argument("--no-rerank", action="store_true", help="skip geometric-verification re-ranking")
    p.add_argument("--workers", type=int, default=None, help="query threads (default: CPU count)")
    p.add_argument("--query-num-assignments", type=int, metavar="M",
                   help="query-side multiple assignment (default: the index's index.query_num_assignments)")
    p.add_argument("--query-expansion", choices=("none", "aqe", "hqe"),
                   help="query expansion (default: the index's query_expansion when re-ranking, none with "
                        "--no-rerank; given with --no-rerank, it expands over the unverified top images)")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.add_argument("--json", action="store_true", help="print one JSON line per query")
    p.set_defaults(func=run, quiet_level=logging.ERROR)  # --quiet: failed queries are listed by the command


def parse_bbox(text: str):
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--bbox expects x1,y1,x2,y2 (four numbers), got {text!r}")
    return values


def _queries(sources) -> list[str]:
    """Expand image files, folders and list files into query paths, in the order given."""
    out = []
    for source in sources:
        p = Path(source)
        if p.is_file() and p.suffix.lower() in {e.lower() for e in IMAGE_EXTENSIONS}:
            out.append(source)
        elif p.is_dir() or p.is_file():
            if p.is_dir():
                found = sorted(str(path) for _, path in list_images(p))
            else:  # a list file, in its own order; relative paths are relative to its folder
                lines = [line.strip() for line in read_list_file(p)]
                found = [str(p.parent / line) for line in lines if line and not line.startswith("#")]
            if not found:
                raise ValueError(f"{source}: no images found")
            out.extend(found)
        else:  # a missing path stays a query, so its error names it
            out.append(source)
    return out


def run(args) -> int:
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if args.query_num_assignments is not None and args.query_num_assignments < 1:
        raise UsageError(f"--query-num-assignments must be at least 1, got {args.query_num_assignments}")
    # Run as a program, the process may end without the interpreter's slow finalization once the results are
    # printed (nothing to clean up), except with Ray, whose shutdown runs at exit.
    args.exit_now = args.ray is None
    bbox = parse_bbox(args.bbox) if args.bbox else None
    options = dict(query_num_assignments=args.query_num_assignments, query_expansion=args.query_expansion)
    queries = _queries(args.image)
    if bbox is not None and len(queries) > 1:
        raise UsageError(f"--bbox applies to a single query image, got {len(queries)} queries")
    if len(args.index) > 1 or args.ray is not None:
        engine = ShardedEngine(args.index, ray=args.ray is not None, address=args.ray or None)
    else:
        engine = Engine.open(args.index[0])
        if engine.database is not None and len(engine) == 0:  # as `d2r serve`: no empty table, exit 0
            raise ValueError(f"{args.index[0]}: the index is empty (every image removed, or none indexed yet)")
    from threadpoolctl import threadpool_limits

    # This process only searches: BLAS at one thread throughout. A query's GEMMs are small (the re-ranking and
    # batches already run BLAS single-threaded in their own threads); with two, OpenBLAS's second thread spins
    # (measured: 0.26 s more CPU per query; on a loaded box 64 ms instead of 4 ms for the index search).
    with threadpool_limits(limits=1, user_api="blas"):
        # numba's one-time start-up (≈ 0.3 s: its registries, scipy.linalg) in a thread while the query is
        # decoded and its features extracted (OpenCV runs without the GIL): a fresh process answers sooner.
        warming = engine.warm_up() if isinstance(engine, Engine) else None
        try:
            with muted("d2r.engine"):  # a featureless query is listed once (not also as a WARNING line)
                return _report(args, engine, queries, bbox, options)
        finally:
            if warming is not None:
                warming.join()


def _report(args, engine, queries, bbox, options) -> int:
    import time

    if len(queries) == 1:  # a single query: errors are the command's own (exit 1, one line)
        t0 = time.perf_counter()
        results = [engine.search(queries[0], bbox=bbox, top_k=args.top_k, rerank=not args.no_rerank,
                                 **options)]
        seconds = [time.perf_counter() - t0]
    else:
        t0 = time.perf_counter()
        results = engine.search_batch(queries, top_k=args.top_k, rerank=not args.no_rerank, workers=args.workers,
                                       **options)
        seconds = [(time.perf_counter() - t0) / len(queries)] * len(queries)
    failed = 0
    for query, hits, sec in zip(queries, results, seconds):
        if not isinstance(hits, Exception) and not hits and len(engine):
            hits = ValueError(f"{query}: the query has no local features (blank, tiny or featureless image); "
                              "nothing to search with")
        if isinstance(hits, Exception):
            failed += 1
            message = hits.args[0] if isinstance(hits, KeyError) and hits.args else str(hits)
            if str(query) not in message:
                message = f"{query}: {message}"
            print(f"d2r search: error: {message}", file=sys.stderr)
            if args.json and len(queries) > 1:  # one line per query; a single query's error is the exit code
                print(json.dumps({"query": str(query), "error": message}), flush=True)
            continue
        if args.json:
            print(json.dumps({"query": str(query), "bbox": bbox, "seconds": round(sec, 4),
                              "hits": [h.to_dict() for h in hits]}), flush=True)
            continue
        if len(queries) > 1:
            print(f"# {query}")
        print(f"{'rank':>4}  {'score':>9}  {'inliers':>7}  image")
        for h in hits:
            inl = "-" if h.inliers < 0 else str(h.inliers)
            print(f"{h.rank:>4}  {h.score:>9.4f}  {inl:>7}  {h.image_id}")
        if not args.quiet:
            print(f"({sec * 1000:.0f} ms)" if len(queries) == 1 else f"({sec * 1000:.0f} ms per query, batch)")
    if failed and failed < len(queries):
        print(f"d2r search: partial failure: {failed} of {len(queries)} queries failed", file=sys.stderr)
        return 3  # partial failure
    return 1 if failed else 0
