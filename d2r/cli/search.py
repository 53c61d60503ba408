"""``d2r search``: query an index with a photo."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("search", help="search an index with a photo",
                              description="Rank the images of an index by how well they show the same instance "
                                          "as the query photo (optionally cropped to a box).")
    p.add_argument("image", help="query image file")
    p.add_argument("--index", required=True, action="append",
                   help="engine folder (made by `d2r index create`); repeat it for the shards of a sharded "
                        "index (each indexes a block of the images, same config and codebook)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="search the shards on Ray actors: a cluster address ('auto', HOST:PORT) or none for "
                        "a local Ray; a shard NODE_IP:/path is opened on that node (pip install -e '.[ray]')")
    p.add_argument("--bbox", help="crop the query to x1,y1,x2,y2 (pixels)")
    p.add_argument("--top-k", type=int, default=10, help="results to show (default 10)")
    p.add_argument("--no-rerank", action="store_true", help="skip geometric-verification re-ranking")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=run)


def parse_bbox(text: str):
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"--bbox expects x1,y1,x2,y2 (four numbers), got {text!r}")
    return values


def run(args) -> int:
    import time

    from d2r.engine import Engine

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    bbox = parse_bbox(args.bbox) if args.bbox else None
    if len(args.index) > 1 or args.ray is not None:
        from d2r.distributed import ShardedEngine

        engine = ShardedEngine(args.index, ray=args.ray is not None, address=args.ray or None)
    else:
        engine = Engine.open(args.index[0])
    t0 = time.perf_counter()
    hits = engine.search(args.image, bbox=bbox, top_k=args.top_k, rerank=not args.no_rerank)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"query": args.image, "bbox": bbox, "seconds": round(seconds, 4),
                          "hits": [h.to_dict() for h in hits]}))
        return 0
    print(f"{'rank':>4}  {'score':>9}  {'inliers':>7}  image")
    for h in hits:
        inl = "-" if h.inliers < 0 else str(h.inliers)
        print(f"{h.rank:>4}  {h.score:>9.4f}  {inl:>7}  {h.image_id}")
    if not args.quiet:
        print(f"({seconds * 1000:.0f} ms)")
    return 0
