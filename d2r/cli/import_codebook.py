"""``d2r import-codebook``: convert a released official codebook (TF checkpoint) into a d2r .npz."""

from __future__ import annotations

import json
from pathlib import Path
from d2r.codebook.official import import_official_codebook


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "import-codebook", help="import an official TF-checkpoint codebook",
        description="Read the 'clusters' variable of an official Detect-to-Retrieve codebook checkpoint "
                    "(e.g. k65536_codebook_tfckpt/codebook) and write a d2r codebook .npz with metadata.")
    p.add_argument("checkpoint", help="checkpoint prefix (…/codebook) or the folder holding it")
    p.add_argument("--out", required=True, metavar="FILE", help="output codebook .npz")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--variable", help="checkpoint key to read (default: the one named 'clusters')")
    p.add_argument("--feature", default="delf", help="feature type recorded in the metadata (delf)")
    p.add_argument("--dim", type=int, help="expected D (checked)")
    p.add_argument("--size", "-k", type=int, help="expected K (checked)")
    p.add_argument("--trainset", help="training set recorded in the metadata (e.g. 'rparis6k')")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no info logs")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    extra = {"trainset": args.trainset} if args.trainset else None
    book = import_official_codebook(args.checkpoint, variable=args.variable, feature=args.feature,
                                    dim=args.dim, k=args.size, metadata=extra)
    book.save(out)
    summary = {"out": str(out), "k": book.size, "D": book.dim, "fingerprint": book.fingerprint,
               "variable": book.metadata["checkpoint_variable"], "source": str(args.checkpoint)}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    elif not args.quiet:
        print(f"{out}: K={book.size} D={book.dim} fingerprint={book.fingerprint} "
              f"(from {args.checkpoint}:{summary['variable']})")
    return 0
