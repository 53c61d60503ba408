"""``d2r demo``: index and search photos bundled with installed packages, fully offline."""

from __future__ import annotations

import json
from pathlib import Path
from d2r.cli import UsageError
from d2r.demo import print_summary, run as run_demo


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole engine offline on bundled photos",
                              description="Build a small database from photos shipped inside scikit-image and "
                                          "scikit-learn (with synthetic viewpoint, scale, light and occlusion "
                                          "changes, and distractors), train a codebook, index with R-ASMK*, "
                                          "search, and write an HTML summary.")
    p.add_argument("--out", default="d2r-demo", help="output folder (default ./d2r-demo; reused if present)")
    p.add_argument("--top-k", type=int, default=5, help="hits shown per query")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out}: exists and is not a folder")
    summary = run_demo(Path(args.out), top_k=args.top_k, progress=not args.quiet and not args.json)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        print_summary(summary)
    return 0 if summary["indexed"] or not summary["failed"] else 1
