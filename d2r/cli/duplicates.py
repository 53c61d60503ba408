"""``d2r duplicates``: groups of near-duplicate images in a folder, a list file or an engine's images."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from d2r.cli import FAILURE, OK, PARTIAL, UsageError, positive_int
from d2r.duplicates.find import find_duplicates, write_page
from d2r.duplicates.signature import DEFAULT
from d2r.engine import Engine
from d2r.engine.sources import read_sources
from d2r.features.image import list_images
from d2r.storage import MANIFEST

KEPT = "signatures"  # the kept signature index's folder inside an engine folder


def threshold_value(text: str) -> float:
    """argparse ``type`` of --threshold: a number in (0, 1] (a normalised distance), else a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a normalised signature distance), got {text}")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "duplicates", help="find groups of near-duplicate images",
        description="Group near-duplicate images (resized, re-compressed, slightly cropped or edited copies) by "
                    "the Goldberg image signature (image-match's parameters): pairs whose normalised signature "
                    "distance is below the threshold, found through shared signature words, grouped as "
                    "connected components. FOLDER_OR_ENGINE: an image folder (searched recursively), a list "
                    "file (one path a line), or an engine folder (its indexed images; its ASMK* search with "
                    "geometric verification gives a second opinion on the images the signatures left alone).")
    p.add_argument("source", metavar="FOLDER_OR_ENGINE", help="image folder, list file or engine folder")
    p.add_argument("--threshold", type=threshold_value, default=DEFAULT.threshold, metavar="T",
                   help=f"pair images whose signature distance is below T (default {DEFAULT.threshold}, "
                        "image-match's cutoff; smaller is stricter)")
    second = p.add_mutually_exclusive_group()
    second.add_argument("--second-opinion", dest="second_opinion", action="store_true", default=None,
                        help="search the unpaired images with the engine (ASMK* + verification; the default "
                             "for an engine with an index)")
    second.add_argument("--no-second-opinion", dest="second_opinion", action="store_false",
                        help="signatures only")
    p.add_argument("--keep", action="store_true",
                   help="keep the signatures in the engine folder (ENGINE/signatures, a signature index): later "
                        "runs read only the images it does not hold yet (used whenever it exists)")
    p.add_argument("--page", metavar="FILE", help="also write an HTML results page with thumbnails")
    p.add_argument("--workers", type=positive_int, default=None, help="threads reading images (default: CPU count, ≤ 8)")
    p.add_argument("--json", action="store_true", help="print one JSON document (groups, pairs, parameters)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(func=run, quiet_level=logging.ERROR)


def _is_engine(path: Path) -> bool:
    return (path / "engine.json").is_file()


def run(args) -> int:
    # every option checked before an image is read
    source = Path(args.source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such folder or list file")
    if args.page is not None:
        page = Path(args.page)
        if page.is_dir():
            raise IsADirectoryError(f"--page {page}: is a folder (give a file name, e.g. duplicates.html)")
        if not page.parent.is_dir():
            raise FileNotFoundError(f"--page {page}: folder {page.parent} does not exist")
    engine, keep = None, None
    if source.is_dir() and _is_engine(source):
        if args.keep or (source / KEPT / MANIFEST).exists():
            keep = source / KEPT
        engine = Engine.open(source)
        images = sorted(read_sources(source)[0].items())  # the engine's recorded image files
        if not images:
            raise ValueError(f"{source}: the engine has no images")
        second = bool(engine.database is not None and len(engine)) if args.second_opinion is None \
            else args.second_opinion
        if second and (engine.database is None or not len(engine)):
            raise UsageError(f"--second-opinion: {source} has no index to search")
    else:
        if args.keep:
            raise UsageError(f"--keep keeps signatures in an engine folder; {source} is not one")
        if args.second_opinion:
            raise UsageError("--second-opinion needs an engine folder (FOLDER_OR_ENGINE made by `d2r index "
                             "create`)")
        second = False
        images = list_images(source)  # ValueError naming the folder when it holds no images
    progress = not args.quiet
    report = find_duplicates(images, args.threshold, engine=engine, second_opinion=second, progress=progress,
                             workers=args.workers, keep=keep)
    if args.page is not None:
        write_page(report, args.page)
    for i, path, error in report.failures:
        message = error if str(path) in error else f"{path}: {error}"
        print(f"d2r duplicates: error: {message}", file=sys.stderr)
    if args.json:
        doc = report.to_dict()
        doc["page"] = args.page
        print(json.dumps(doc))
    else:
        _print(report, args)
    if report.failures:
        if len(report.failures) == len(report.images):
            return FAILURE
        print(f"d2r duplicates: partial failure: {len(report.failures)} of {len(report.images)} images could "
              "not be read", file=sys.stderr)
        return PARTIAL
    return OK


def _print(report, args) -> None:
    path = dict(report.images)
    for k, (g, pairs) in enumerate(zip(report.groups, report.pairs_by_group()), 1):
        print(f"# group {k}: {len(g)} images")
        for i in g:
            print(f"  {i}  {path[i]}")
        for p in pairs:
            print(f"    {p.a} ~ {p.b}: {p.describe()}")
    n_img = len(report.images) - len(report.failures)
    tail = f", {len(report.failures)} unreadable" if report.failures else ""
    n = len(report.groups)
    grouped = sum(len(g) for g in report.groups)
    print(f"{n} group{'' if n == 1 else 's'} of near-duplicates ({grouped} images) among "
          f"{n_img} images{tail}; signature distance < {report.parameters['threshold']}"
          + (f"; second opinion: {report.parameters['second_opinion']['rule']}"
             if report.parameters.get("second_opinion") else ""))
    if args.page:
        print(f"page: {args.page}")
