"""``d2r bench revisitop`` / ``d2r bench gldv2``: run a retrieval benchmark end to end and write its metrics.

Flags override the ``--config FILE.yaml`` (same sections as an engine config: features, regions, codebook, index,
rerank; plus ``verify``, ``codebook_images``, ``top_k``). Metrics JSON: ``OUT/metrics.json`` and ``--json FILE``
(``-`` prints it on stdout).
"""

from __future__ import annotations

import json
import sys
from d2r import _io
from d2r import bench
from d2r._log import muted
from d2r.bench import load_config
from d2r.cli import UsageError
from d2r.config import parse_overrides
from d2r.eval.compare import compare_runs, format_comparison


def _common(p) -> None:
    p.add_argument("--images-root", required=True, metavar="ROOT", help="folder holding the images")
    p.add_argument("--config", metavar="FILE.yaml", help="run config (YAML/JSON); flags override it")
    p.add_argument("--features", choices=("rootsift", "delf", "aliked", "disk"),
                   help="local features (config: features.name; aliked/disk need the [learned] extra)")
    p.add_argument("--model", metavar="PATH", help="DELF SavedModel folder (features.model)")
    p.add_argument("--pca", metavar="PATH", help="PCA parameters folder (features.pca)")
    p.add_argument("--max-features", type=int, metavar="N", help="features per image (features.options)")
    p.add_argument("--detector", metavar="PATH|grid|density|none",
                   help="index-side regions: a detector SavedModel, a proposer, or none (regions.proposer)")
    p.add_argument("--detector-threshold", type=float, metavar="S", help="detector score threshold (0.1)")
    p.add_argument("--max-boxes", type=int, metavar="N", help="boxes per image at most (regions.max_boxes)")
    book = p.add_mutually_exclusive_group()
    book.add_argument("--codebook", metavar="PATH", help="codebook .npz (codebook.path)")
    book.add_argument("--codebook-size", type=int, metavar="K", help="train a K-word codebook (codebook.size)")
    p.add_argument("--codebook-sample", type=int, metavar="N",
                   help="descriptors sampled per image for training (codebook.sample_per_image, 300)")
    p.add_argument("--codebook-iterations", type=int, metavar="N", help="k-means iterations (codebook.iterations)")
    p.add_argument("--codebook-images", metavar="DIR_OR_LIST",
                   help="train the codebook on these images (the OTHER dataset); default: the database images")
    p.add_argument("--kernel", choices=("vlad", "asmk", "asmk_star"), help="aggregation kernel (index.kernel)")
    p.add_argument("--mode", choices=("aggregation", "search"), help="database mode (index.mode)")
    norm = p.add_mutually_exclusive_group()
    norm.add_argument("--normalize", dest="normalize", action="store_true", default=None,
                      help="ASMK score normalisation on (index.normalize)")
    norm.add_argument("--no-normalize", dest="normalize", action="store_false",
                      help="raw ASMK sums (the shipped official R-ASMK* config)")
    gv = p.add_mutually_exclusive_group()
    gv.add_argument("--rerank", dest="rerank", action="store_true", default=None,
                    help="geometric-verification re-ranking (config: verify); metrics before it are kept too")
    gv.add_argument("--no-rerank", dest="rerank", action="store_false")
    p.add_argument("--rerank-distance", type=float, metavar="D",
                   help="putative-match descriptor distance (rerank.descriptor_distance; official 0.9)")
    p.add_argument("--num-to-rerank", type=int, metavar="N", help="candidates verified (rerank.num_to_rerank)")
    p.add_argument("--rerank-method", choices=("official", "usac", "lightglue"),
                   help="verification rule (rerank.method): official = sort by inliers (paper), usac = mutual NN + "
                        "ratio test, MAGSAC++, images with >= rerank.min_inliers move up; lightglue = LightGlue "
                        "matches (aliked/disk features), then as usac")
    p.add_argument("--min-inliers", type=int, metavar="N", help="usac decision threshold (rerank.min_inliers)")
    p.add_argument("--query-expansion", choices=("none", "aqe", "hqe"),
                   help="query expansion after the first search (query_expansion)")
    p.add_argument("--diffusion", action="store_true", default=None,
                   help="revisitop: rank by diffusion on the database's kNN graph (diffusion.enabled; "
                        "Iscen et al. 2017), after verification with --rerank")
    p.add_argument("--qe-top", type=int, metavar="N", help="reliable top images that expand the query (qe.top)")
    p.add_argument("--query-num-assignments", type=int, metavar="M",
                   help="query-side multiple assignment (index.query_num_assignments)")
    p.add_argument("--top-k", type=int, metavar="N", help="search depth (default: whole database / 100)")
    p.add_argument("--workers", type=int, metavar="N", help="threads for extraction and search")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config option by dotted path, e.g. features.options.max_features=300")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (metrics.json, config.yaml, index/)")
    p.add_argument("--cache", metavar="DIR", help="feature/codebook cache shared between runs (default OUT/cache)")
    p.add_argument("--json", metavar="FILE", help="also write the metrics JSON here ('-': stdout)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, info logs or table")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a retrieval benchmark (revisitop, GLDv2)",
                              description="Extract (cached, resumable), train or load the codebook, index, search, "
                                          "optionally re-rank, and evaluate.")
    sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    r = sub.add_parser("revisitop", help="Revisited Oxford/Paris protocol (or any revisitop-style gnd)",
                       description="Easy/Medium/Hard mAP and mP@1,5,10 in percent.")
    r.add_argument("--gnd", required=True, metavar="GND", help="gnd_*.pkl or .mat ground truth")
    qin = r.add_mutually_exclusive_group()
    qin.add_argument("--query-in-database", dest="query_in_database", action="store_true", default=None,
                     help="queries are database images (junk for themselves); default: auto (bbx None and the "
                          "query names in imlist)")
    qin.add_argument("--no-query-in-database", dest="query_in_database", action="store_false")
    _common(r)
    r.add_argument("--no-report", dest="report", action="store_false", help="skip OUT/report.html")
    r.set_defaults(func=run)
    c = sub.add_parser("compare", help="paired per-query comparison of two revisitop runs",
                       description="Mean paired difference of per-query AP (B - A) with a bootstrap 95% interval "
                                   "and wins/losses, Medium and Hard, final stages of both runs.")
    c.add_argument("run_a", metavar="RUN_A", help="run folder (or its metrics.json)")
    c.add_argument("run_b", metavar="RUN_B", help="run folder (or its metrics.json)")
    c.add_argument("--stage-a", metavar="STAGE", help="stage of RUN_A (initial, verified, expanded; default final)")
    c.add_argument("--stage-b", metavar="STAGE", help="stage of RUN_B (default final)")
    c.add_argument("--resamples", type=int, default=10000, metavar="N", help="bootstrap resamples (10000)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", metavar="FILE", help="also write the comparison JSON here ('-': stdout)")
    c.add_argument("--quiet", action="store_true", help="no log lines (the comparison is still printed)")
    c.set_defaults(func=compare)
    g = sub.add_parser("gldv2", help="Google Landmarks v2 retrieval protocol",
                       description="mAP@100 and mP@k (Public / Private) in percent; writes OUT/predictions.csv.")
    g.add_argument("--index-csv", required=True, metavar="CSV")
    g.add_argument("--test-csv", required=True, metavar="CSV")
    g.add_argument("--solution-csv", required=True, metavar="CSV", help="retrieval_solution_v2.1.csv")
    g.add_argument("--index-root", metavar="DIR", help="index images (default --images-root)")
    g.add_argument("--test-root", metavar="DIR", help="test images (default --images-root)")
    _common(g)
    g.set_defaults(func=run)


def config_from_args(args):
    """The resolved :class:`~d2r.bench.BenchConfig`: the --config file, then the flags that were given."""
    overrides = {
        "features.name": args.features, "features.model": args.model, "features.pca": args.pca,
        "features.options.max_features": args.max_features,
        "regions.proposer": args.detector, "regions.score_threshold": args.detector_threshold,
        "regions.max_boxes": args.max_boxes,
        "codebook.path": args.codebook, "codebook.size": args.codebook_size,
        "codebook.sample_per_image": args.codebook_sample, "codebook.iterations": args.codebook_iterations,
        "codebook_images": args.codebook_images,
        "index.kernel": args.kernel, "index.mode": args.mode, "index.normalize": args.normalize,
        "verify": args.rerank, "rerank.descriptor_distance": args.rerank_distance,
        "rerank.num_to_rerank": args.num_to_rerank, "top_k": args.top_k, "workers": args.workers,
        "rerank.method": args.rerank_method, "rerank.min_inliers": args.min_inliers,
        "query_expansion": args.query_expansion, "qe.top": args.qe_top, "diffusion.enabled": args.diffusion,
        "index.query_num_assignments": args.query_num_assignments,
    }

    overrides.update(parse_overrides(args.set))
    config = load_config(args.config, overrides)
    if args.codebook is not None and config.codebook_images is not None:
        config = config.replace(codebook_images=None)
    return config


def _table(result: dict, keys) -> str:
    lines = [f"{'':<10}" + "".join(f"{k:>10}" for k in keys)]
    for name in ("easy", "medium", "hard", "public", "private"):
        if name in result:
            lines.append(f"{name:<10}" + "".join(f"{result[name].get(k, float('nan')):>10.2f}" for k in keys))
    return "\n".join(lines)


def run(args) -> int:
    if args.top_k is not None and args.top_k < 1:  # was: a late "negative dimensions" error, or 0 = default
        raise UsageError(f"--top-k must be at least 1 (omit it for the default depth), got {args.top_k}")
    from pathlib import Path

    for flag, folder in (("--out", args.out), ("--cache", args.cache)):  # was found after the CSVs were read
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise FileExistsError(f"{flag} {folder}: exists and is not a folder")
    config = config_from_args(args)
    progress = not args.quiet

    with muted("d2r.build"):  # each unreadable image is listed once, below (not as a WARNING too)
        if args.protocol == "revisitop":
            result = bench.run_revisitop(args.gnd, args.images_root, config, args.out, cache=args.cache,
                                         query_in_database=args.query_in_database, progress=progress,
                                         write_report=args.report)
            keys = ("mAP", "mP@1", "mP@5", "mP@10")
        else:
            result = bench.run_gldv2(args.index_csv, args.test_csv, args.solution_csv, args.images_root,
                                     config, args.out, cache=args.cache, progress=progress,
                                     index_root=args.index_root, test_root=args.test_root)
            keys = ("mAP@100", "mP@1", "mP@5", "mP@10")
    text = json.dumps(result, indent=2, default=str)
    if args.json == "-":
        print(text)
    elif args.json:
        _io.write_bytes(args.json, (text + "\n").encode())
    if not args.quiet and args.json != "-":
        print(_table(result, keys))
        print(f"total {result['timing'].get('total', 0):.1f} s; metrics in {args.out}/metrics.json",
              file=sys.stderr)
    failed = result.get("failed") or {}
    for path, reason in failed.items():
        print(f"failed: {path}: {reason}", file=sys.stderr)
    if failed:  # the run is scored without them: a partial failure, as `d2r index add`
        print(f"d2r bench: partial failure: {len(failed)} image(s) could not be read (scored without them; "
              f"metrics in {args.out}/metrics.json)", file=sys.stderr)
        return 3
    return 0


def compare(args) -> int:
    if args.resamples < 1:
        raise UsageError(f"--resamples must be at least 1, got {args.resamples}")
    res = compare_runs(args.run_a, args.run_b, stage_a=args.stage_a, stage_b=args.stage_b,
                       resamples=args.resamples, seed=args.seed)
    text = json.dumps(res, indent=2)
    if args.json == "-":
        print(text)
        return 0
    if args.json:
        _io.write_bytes(args.json, (text + "\n").encode())
    print(format_comparison(res))
    return 0
