"""``d2r extract``: extract local features of a folder or list of images into a (resumable) feature store."""

from __future__ import annotations

import json
import sys
from d2r.cli import UsageError
from d2r.distributed import extract
from d2r.features import extract_to_store
from d2r.features.config import FeaturesConfig


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="extract local features (RootSIFT or DELF) into a sharded feature store",
        description="Extract local features of every image of a folder (recursive) or list file into a "
                    "feature store. Resumable: images already in the store are skipped; unreadable images "
                    "are recorded in failures.json and skipped. Image id = path relative to the folder, "
                    "without extension.")
    p.add_argument("--images", required=True, help="image folder or text file with one image path per line")
    p.add_argument("--features", required=True, choices=["rootsift", "delf", "aliked", "disk"],
                   help="extractor (aliked, disk: the [learned] extra)")
    p.add_argument("--model", help="DELF SavedModel folder (official or exported by d2r); aliked/disk: a .pth "
                                   "weights file (default: the packaged one)")
    p.add_argument("--pca", help="PCA folder (mean.datum + pca_proj_mat.datum); DELF default: MODEL/pca or "
                                 "MODEL/../pca")
    p.add_argument("--no-pca", action="store_true", help="DELF: keep the raw L2-normalised descriptors")
    p.add_argument("--out", required=True, help="feature store folder (created or resumed)")
    p.add_argument("--max-features", type=int, help="features per image (default 1000)")
    p.add_argument("--max-side", type=int, help="downscale images to this longer side first")
    p.add_argument("--workers", type=int, help="threads over images (default: 2 for RootSIFT, 1 for DELF)")
    p.add_argument("--shard-mb", type=float, default=256.0,
                   help="a shard is written every this many MiB of features (default 256)")
    p.add_argument("--shard-size", type=int, help="also cap the images per shard (default: no cap)")
    p.add_argument("--lock-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another writer of the store to finish (default 0: fail at once)")
    p.add_argument("--retry-failed", action="store_true", help="re-attempt images listed in failures.json")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="extract on Ray actors (one extractor each; --workers = actors): a cluster address "
                        "('auto', HOST:PORT) or none for a local Ray; images and --out must be reachable "
                        "from every node (pip install -e '.[ray]')")
    p.add_argument("--gpus-per-worker", type=float, metavar="F", help="with --ray: GPU fraction per actor")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path


    if args.model and args.features == "rootsift":
        raise UsageError("--model is only for --features delf, aliked or disk")
    if args.gpus_per_worker is not None and (args.ray is None or args.gpus_per_worker <= 0):
        raise UsageError("--gpus-per-worker needs --ray and a positive fraction")
    if args.ray is not None and args.shard_size is not None:
        raise UsageError("--shard-size is not used with --ray (shards roll over by --shard-mb)")
    if not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images}: no such folder or list file")
    for flag, value in (("--max-features", args.max_features), ("--max-side", args.max_side),
                        ("--workers", args.workers), ("--shard-size", args.shard_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if not 0 < args.shard_mb < float("inf"):  # nan, inf: a late 'cannot convert float NaN to integer'
        raise UsageError(f"--shard-mb must be a positive number, got {args.shard_mb}")
    if not args.lock_timeout >= 0:  # nan waited forever
        raise UsageError(f"--lock-timeout must be >= 0 seconds, got {args.lock_timeout}")
    options = {k: v for k, v in (("max_features", args.max_features), ("max_side", args.max_side)) if v is not None}
    if args.features == "delf" and args.no_pca:
        options["use_pca"] = False
    pca = None if args.no_pca else args.pca
    extractor = FeaturesConfig(args.features, args.model, pca, options).build()  # checked before the store exists
    if args.ray is not None:
        summary = extract(args.images, args.out, args.features, model=args.model, pca=pca, options=options,
                          address=args.ray or None, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                          shard_bytes=max(1, int(args.shard_mb * (1 << 20))), retry_failed=args.retry_failed,
                          lock_timeout=args.lock_timeout, progress=not args.quiet)
        return _report(args, summary)
    summary = extract_to_store(args.images, extractor, args.out, progress=not args.quiet,
                               workers=args.workers, shard_size=args.shard_size,
                               shard_bytes=max(1, int(args.shard_mb * (1 << 20))),
                               retry_failed=args.retry_failed, lock_timeout=args.lock_timeout)
    return _report(args, summary)


def _report(args, summary) -> int:
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    elif not args.quiet:
        print(f"{summary['extracted']} extracted, {summary['skipped']} skipped, {summary['failed']} failed "
              f"of {summary['images']} images in {summary['seconds']:.1f} s -> {summary['store']}")
    if not summary["failed"]:
        return 0
    if summary["extracted"] == 0 and summary["skipped"] == 0:
        print(f"d2r extract: error: none of the {summary['failed']} image(s) could be extracted (reasons in "
              f"{summary['store']}/failures.json)", file=sys.stderr)
        return 1
    print(f"d2r extract: partial failure: {summary['failed']} image(s) failed, {summary['extracted']} "
          "extracted "
          f"(reasons in {summary['store']}/failures.json; retry with --retry-failed)", file=sys.stderr)
    return 3
