"""``d2r extract``: extract local features of a folder or list of images into a (resumable) feature store."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "extract", help="extract local features (RootSIFT or DELF) into a sharded feature store",
        description="Extract local features of every image of a folder (recursive) or list file into a "
                    "feature store. Resumable: images already in the store are skipped; unreadable images "
                    "are recorded in failures.json and skipped. Image id = path relative to the folder, "
                    "without extension.")
    p.add_argument("--images", required=True, help="image folder or text file with one image path per line")
    p.add_argument("--features", required=True, choices=["rootsift", "delf"], help="extractor")
    p.add_argument("--model", help="DELF SavedModel folder (official or exported by d2r)")
    p.add_argument("--pca", help="PCA folder (mean.datum + pca_proj_mat.datum); DELF default: MODEL/pca or "
                                 "MODEL/../pca")
    p.add_argument("--no-pca", action="store_true", help="DELF: keep the raw L2-normalised descriptors")
    p.add_argument("--out", required=True, help="feature store folder (created or resumed)")
    p.add_argument("--max-features", type=int, help="features per image (default 1000)")
    p.add_argument("--max-side", type=int, help="downscale images to this longer side first")
    p.add_argument("--workers", type=int, help="threads over images (default: 2 for RootSIFT, 1 for DELF)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--retry-failed", action="store_true", help="re-attempt images listed in failures.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from d2r.cli import UsageError
    from d2r.engine import FeaturesConfig
    from d2r.features import extract_to_store

    if args.model and args.features != "delf":
        raise UsageError("--model is only for --features delf")
    if not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images}: no such folder or list file")
    for flag, value in (("--max-features", args.max_features), ("--max-side", args.max_side),
                        ("--workers", args.workers), ("--shard-size", args.shard_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    options = {k: v for k, v in (("max_features", args.max_features), ("max_side", args.max_side))
               if v is not None}
    if args.features == "delf" and args.no_pca:
        options["use_pca"] = False
    pca = None if args.no_pca else args.pca
    extractor = FeaturesConfig(args.features, args.model, pca, options).build()  # checked before the store
    summary = extract_to_store(args.images, extractor, args.out, progress=not args.quiet,
                               workers=args.workers, shard_size=args.shard_size,
                               retry_failed=args.retry_failed)
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
