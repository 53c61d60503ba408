"""``d2r index create|add|remove|info``: manage an engine folder (features, codebook, database, config)."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("index", help="create an index, add or remove images, show its state",
                              description="Manage a d2r engine folder: its config, features, codebook and database.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    c = sub.add_parser("create", help="create an empty index (optionally indexing images right away)")
    c.add_argument("path", help="engine folder to create")
    c.add_argument("--config", help="EngineConfig YAML/JSON (sections: features, regions, codebook, index, rerank)")
    c.add_argument("--codebook", help="codebook .npz (default: train one on the first images indexed)")
    c.add_argument("--codebook-size", type=int, help="words of the codebook trained when none is given")
    c.add_argument("--features", choices=["rootsift", "delf"], help="local features (default rootsift)")
    c.add_argument("--model", help="DELF SavedModel folder")
    c.add_argument("--regions", help="region proposer: none, grid, density or a detector SavedModel folder")
    c.add_argument("--kernel", choices=["vlad", "asmk", "asmk_star"], help="match kernel (default asmk_star)")
    c.add_argument("--mode", choices=["aggregation", "search"], help="regional aggregation or regional search")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config option by dotted path, e.g. --set rerank.descriptor_distance=0.5")
    c.add_argument("--images", help="index this folder or list file right after creating")
    c.add_argument("--id-prefix", default="", metavar="P", help="prepend P to the image ids (default none)")
    _common(c)
    c.set_defaults(func=run_create)

    a = sub.add_parser("add", help="index images (a folder, list file or paths); resumable")
    a.add_argument("path", help="engine folder")
    a.add_argument("images", nargs="+", help="folder, list file, or image paths")
    a.add_argument("--retry-failed", action="store_true", help="re-attempt images that failed before")
    a.add_argument("--id-prefix", default="", metavar="P",
                   help="prepend P to the image ids (e.g. to add a second folder with the same file names)")
    _common(a)
    a.set_defaults(func=run_add)

    r = sub.add_parser("remove", help="remove images by id")
    r.add_argument("path", help="engine folder")
    r.add_argument("ids", nargs="+", help="image ids (as `d2r search` prints them)")
    _common(r)
    r.set_defaults(func=run_remove)

    i = sub.add_parser("info", help="counts, sizes and config")
    i.add_argument("path", help="engine folder")
    _common(i)
    i.set_defaults(func=run_info)


def _common(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_config(args):
    """The --config file, then the flags, then the --set overrides (d2r.config.parse_overrides)."""
    from d2r.config import parse_overrides
    from d2r.engine import EngineConfig

    config = EngineConfig.from_file(args.config) if args.config else EngineConfig()
    overrides = {key: getattr(args, flag, None)
                 for flag, key in [("features", "features.name"), ("model", "features.model"),
                                   ("regions", "regions.proposer"), ("kernel", "index.kernel"),
                                   ("mode", "index.mode"), ("codebook_size", "codebook.size")]}
    overrides.update(parse_overrides(args.set))
    return config.override(overrides)


def _index(engine, images, args) -> int:
    """Index and report; exit 0 when every image is indexed or skipped, 3 when some failed (summary printed),
    1 when none could be indexed."""
    def done(ids):
        if not args.quiet and not args.json:
            print(f"indexed {len(ids)} image(s), saved ({len(engine)} in the index)", flush=True)

    sources = images[0] if len(images) == 1 else images
    report = engine.index(sources, progress=not args.quiet, on_done=done,
                          retry_failed=getattr(args, "retry_failed", False), id_prefix=args.id_prefix)
    out = report.to_dict()
    out["images_in_index"] = len(engine)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for path, reason in report.failed.items():
            print(f"failed: {path}: {reason}", file=sys.stderr)
        if not args.quiet:
            print(f"{out['indexed']} indexed, {out['skipped']} skipped, {len(report.failed)} failed "
                  f"in {out['seconds']:.1f} s; {len(engine)} images in {engine.path}")
    if not report.failed:
        return 0
    if not report.indexed and not report.skipped:
        print(f"d2r index: error: none of the {len(report.failed)} image(s) could be indexed",
              file=sys.stderr)
        return 1
    print(f"d2r index: partial failure: {len(report.failed)} image(s) failed, {len(report.indexed)} indexed "
          f"(retry them with `d2r index add {engine.path} ... --retry-failed`)", file=sys.stderr)
    return 3


def run_create(args) -> int:
    import shutil
    from pathlib import Path

    from d2r.engine import Engine

    config = build_config(args)
    if args.images and not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images}: no such folder or list file")
    existed = Path(args.path).exists()
    engine = Engine.create(args.path, config, codebook=args.codebook)  # validates everything first
    if args.images:
        try:
            return _index(engine, [args.images], args)
        except BaseException:
            if not existed:  # a failed create leaves no folder behind (nothing was indexed there before)
                shutil.rmtree(engine.path, ignore_errors=True)
            raise
    if args.json:
        print(json.dumps(engine.info(), sort_keys=True))
    elif not args.quiet:
        print(f"created {engine.path}")
    return 0


def run_add(args) -> int:
    from d2r.engine import Engine

    return _index(Engine.open(args.path), args.images, args)


def run_remove(args) -> int:
    from d2r.engine import Engine

    engine = Engine.open(args.path)
    ids = list(dict.fromkeys(args.ids))  # engine image ids: paths relative to the indexed folder, no extension
    missing = [i for i in ids if i not in engine]
    if missing:
        print(f"d2r index remove: not in the index: {', '.join(map(str, missing))}", file=sys.stderr)
        return 1
    engine.remove(ids)
    if args.json:
        print(json.dumps({"removed": len(ids), "images_in_index": len(engine)}))
    elif not args.quiet:
        print(f"removed {len(ids)}; {len(engine)} images in {engine.path}")
    return 0


def run_info(args) -> int:
    from d2r.engine import Engine

    info = Engine.open(args.path).info()
    if args.json:
        print(json.dumps(info, sort_keys=True, default=str))
    else:
        idx = info.get("index", {})
        print(f"{info['path']}: {info['images']} images, {info['failures']} failures")
        if idx:
            cfg = idx["config"]
            print(f"  kernel {cfg['kernel']}, mode {cfg['mode']}, codebook K={idx['codebook']['k']} "
                  f"D={idx['codebook']['dim']} ({idx['codebook']['fingerprint']})")
            print(f"  {idx['counts']['items']} items, {idx['counts']['entries']} posting entries, "
                  f"{idx.get('bytes_on_disk', 0) / 1e6:.1f} MB on disk")
    return 0
