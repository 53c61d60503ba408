"""``d2r index create|add|remove|info|check|repair``: manage an engine folder (features, codebook, database, config)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from d2r._lock import LockedError
from d2r._lock import WriterLock
from d2r._log import muted
from d2r.cli import UsageError
from d2r.config import parse_overrides
from d2r.engine import Engine
from d2r.engine.check import check_engine
from d2r.engine.config import EngineConfig
from d2r.features.store import FORMAT
from d2r.index.database import check
from d2r.index.database import repair


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("index", help="create an index, add or remove images, show its state",
                              description="Manage a d2r engine folder: its config, features, codebook and database.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p.set_defaults(quiet_level=logging.ERROR)  # --quiet: no log lines (failed images are listed by the command)

    c = sub.add_parser("create", help="create an empty index (optionally indexing images right away)")
    c.add_argument("path", help="engine folder to create")
    c.add_argument("--config", help="EngineConfig YAML/JSON (sections: features, regions, codebook, index, "
                                    "rerank, query_expansion, qe)")
    c.add_argument("--codebook", help="codebook .npz (default: train one on the first images indexed)")
    c.add_argument("--codebook-size", type=int, help="words of the codebook trained when none is given")
    c.add_argument("--features", choices=["rootsift", "delf", "aliked", "disk"],
                   help="local features (default rootsift; aliked, disk: the [learned] extra)")
    c.add_argument("--model", help="DELF SavedModel folder")
    c.add_argument("--regions", help="region proposer: none, grid, density or a detector SavedModel folder")
    c.add_argument("--kernel", choices=["vlad", "asmk", "asmk_star"], help="match kernel (default asmk_star)")
    c.add_argument("--mode", choices=["aggregation", "search"], help="regional aggregation or regional search")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config option by dotted path, e.g. --set rerank.descriptor_distance=0.5")
    c.add_argument("--images", help="index this folder or list file right after creating")
    c.add_argument("--id-prefix", default="", metavar="P", help="prepend P to the image ids (default none)")
    _common(c)
    _lock_timeout(c)
    c.set_defaults(func=run_create)

    a = sub.add_parser("add", help="index images (folder, list file or paths) or a feature store; resumable")
    a.add_argument("path", help="engine folder")
    a.add_argument("images", nargs="*", help="folders, list files or image paths (ids: relative to each folder "
                                              "or list file's folder)")
    a.add_argument("--store", help="index the features of this feature store (made by `d2r extract` with the "
                                   "engine's features config) instead of extracting images")
    a.add_argument("--retry-failed", action="store_true", help="re-attempt images that failed before")
    a.add_argument("--id-prefix", default="", metavar="P",
                   help="prepend P to the image ids (e.g. to add a second folder with the same file names)")
    _common(a)
    _lock_timeout(a)
    a.set_defaults(func=run_add)

    r = sub.add_parser("remove", help="remove images by id")
    r.add_argument("path", help="engine folder")
    r.add_argument("ids", nargs="+", help="image ids (as `d2r search` prints them)")
    _common(r)
    _lock_timeout(r)
    r.set_defaults(func=run_remove)

    i = sub.add_parser("info", help="counts, sizes and config")
    i.add_argument("path", help="engine folder")
    _common(i)
    i.set_defaults(func=run_info)

    k = sub.add_parser("check", help="verify every index file (sizes, checksums, structure); exit 1 if damaged")
    k.add_argument("path", help="engine folder (or a database folder)")
    _common(k)
    k.set_defaults(func=run_check)

    f = sub.add_parser("repair", help="drop damaged segments (their images must be indexed again) and commit")
    f.add_argument("path", help="engine folder (or a database folder)")
    f.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for another writer")
    f.add_argument("--reindex", action="store_true",
                   help="then index the dropped images again from the engine's feature store "
                        "(no re-extraction)")
    _common(f)
    f.set_defaults(func=run_repair)


def _locked_is_an_error(func):
    """Another writer holding the lock is an ordinary failure: one line, exit 1."""
    @functools.wraps(func)
    def run(args):
        try:
            return func(args)
        except LockedError as exc:
            print(f"d2r index {args.action}: error: {exc}", file=sys.stderr)
            return 1
    return run


def _common(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _lock_timeout(p) -> None:
    p.add_argument("--lock-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another writer of the index to finish (default 0: fail at once)")


def _writer(run):
    """Check --lock-timeout before any work (another writer holding the lock is a one-line error in main)."""
    def wrapped(args):
        if getattr(args, "lock_timeout", 0) is not None and not args.lock_timeout >= 0:  # nan: forever
            raise UsageError(f"--lock-timeout must be >= 0 seconds, got {args.lock_timeout}")
        return run(args)
    return wrapped


def build_config(args):
    """The --config file, then the flags, then the --set overrides (d2r.config.parse_overrides)."""
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


    with muted("d2r.build"):  # each failed image is listed once, below (not also as a WARNING line)
        if getattr(args, "store", None):
            report = engine.index_store(args.store, progress=not args.quiet, on_done=done,
                                        lock_timeout=args.lock_timeout)
        else:
            sources = images[0] if len(images) == 1 else images
            report = engine.index(sources, progress=not args.quiet, on_done=done,
                                  retry_failed=getattr(args, "retry_failed", False),
                                  lock_timeout=args.lock_timeout, id_prefix=args.id_prefix)
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


@_writer
def run_create(args) -> int:
    import shutil
    from pathlib import Path


    config = build_config(args)
    if args.images and not Path(args.images).exists():
        raise FileNotFoundError(f"--images {args.images}: no such folder or list file")
    existed = Path(args.path).exists()
    engine = Engine.create(args.path, config, codebook=args.codebook)  # validates everything first
    if args.images:
        try:
            return _index(engine, [args.images], args)
        except KeyboardInterrupt:  # what was saved stays: the same images are resumed with `index add`
            print(f"d2r index create: interrupted; resume with `d2r index add {engine.path} {args.images}`",
                  file=sys.stderr)
            raise
        except Exception:
            if not existed:  # a failed create leaves no folder behind (nothing was indexed there before)
                shutil.rmtree(engine.path, ignore_errors=True)
            raise
    if args.json:
        print(json.dumps(engine.info(), sort_keys=True))
    elif not args.quiet:
        print(f"created {engine.path}")
    return 0


@_writer
def run_add(args) -> int:

    if bool(args.images) == bool(args.store):
        raise UsageError("give images or --store STORE (one of them)")
    if args.store and (args.id_prefix or args.retry_failed):  # a store's ids are its own, none failed there
        flag = "--id-prefix" if args.id_prefix else "--retry-failed"
        raise UsageError(f"{flag} applies to images, not to --store (its image ids are indexed as they are)")
    return _index(Engine.open(args.path), args.images, args)


@_writer
def run_remove(args) -> int:
    engine = Engine.open(args.path)
    ids = list(dict.fromkeys(args.ids))  # engine image ids: paths relative to the indexed folder, no extension
    missing = [i for i in ids if i not in engine]
    if missing:
        print(f"d2r index remove: error: {args.path}: not in the index: {', '.join(map(str, missing))}",
              file=sys.stderr)
        return 1
    engine.remove(ids, lock_timeout=args.lock_timeout)
    if args.json:
        print(json.dumps({"removed": len(ids), "images_in_index": len(engine)}))
    elif not args.quiet:
        print(f"removed {len(ids)}; {len(engine)} images in {engine.path}")
    return 0


def run_info(args) -> int:
    if not (Path(args.path) / "engine.json").is_file():  # a database or feature store is not "damaged"
        if not Path(args.path).exists():
            raise FileNotFoundError(f"{args.path}: no such folder")
        _not_a_feature_store(args.path)
        raise FileNotFoundError(f"{args.path}: no d2r engine here (engine.json missing)")
    damage = _database_damage(args.path, quick=True)
    if damage:
        return _report_damage(args, damage, "info")
    info = Engine.open(args.path).info()
    damaged = info.get("store", {}).get("damaged", [])
    info["healthy"] = not damaged  # sizes and structure; `d2r index check` also verifies every checksum
    if args.json:
        print(json.dumps(info, sort_keys=True, default=str))
    else:
        idx = info.get("index", {})
        state = "DAMAGED" if damaged else "healthy (sizes and structure; `d2r index check` verifies checksums)"
        print(f"{info['path']}: {info['images']} images, {info['failures']} failures, {state}")
        if idx:
            cfg = idx["config"]
            print(f"  kernel {cfg['kernel']}, mode {cfg['mode']}, codebook K={idx['codebook']['k']} "
                  f"D={idx['codebook']['dim']} ({idx['codebook']['fingerprint']})")
            print(f"  {idx['counts']['items']} items, {idx['counts']['entries']} posting entries, "
                  f"{idx.get('bytes_on_disk', 0) / 1e6:.1f} MB on disk")
        store = info.get("store")
        if store and "images" in store:
            print(f"  feature store: {store['images']} images in {store['shards']} shard(s), "
                  f"{store['bytes'] / 1e6:.1f} MB")
    for d in damaged:
        print(f"d2r index info: damaged: {d['problem']}", file=sys.stderr)
    return 1 if damaged else 0


def _database_dir(path) -> Path:
    path = Path(path)
    if (path / "manifest.json").is_file() or not (path / "index").is_dir():
        return path
    return path / "index"


def _not_a_feature_store(path) -> None:
    """ValueError when ``path`` is a feature store (`d2r extract`, an engine's ``features/``): its manifest is
    not a damaged index manifest."""
    try:
        store = json.loads((Path(path) / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return
    if store:
        raise ValueError(f"{path}: a feature store, not an engine or index folder (`d2r index check ENGINE` "
                         "also checks the engine's feature store)")


def _database_damage(path, quick: bool = False) -> list[dict]:
    """Damaged files of the engine's (or database folder's) index; ``quick``: structure and sizes only."""
    db = _database_dir(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such folder")
    _not_a_feature_store(path)
    if quick and not (db / "manifest.json").exists() and not any(db.glob("manifest-*.json")):
        return []  # an engine without an index yet
    return [dict(d, file=str(Path(db.name) / d["file"]) if db != Path(path) else d["file"])
            for d in check(db, digests=not quick)]


def _report_damage(args, damage, action) -> int:
    if args.json:
        print(json.dumps({"healthy": False, "damaged": damage}, sort_keys=True))
    else:
        hint = (f"`d2r index repair {args.path}` drops damaged segments (`--reindex`: indexes their images "
                "again from the feature store)")
        if len(damage) == 1:  # one damaged file: one line naming it
            d = damage[0]
            print(f"d2r index {action}: error: {args.path}: damaged {d['file']}: {d['problem']}; {hint}",
                  file=sys.stderr)
            return 1
        for d in damage:
            print(f"damaged: {d['file']}: {d['problem']}", file=sys.stderr)
        print(f"d2r index {action}: {args.path}: {len(damage)} damaged file(s); {hint}", file=sys.stderr)
    return 1


def run_check(args) -> int:
    path = Path(args.path)
    engine = (path / "engine.json").is_file()
    damage = check_engine(path) if engine else _database_damage(path)  # an engine: its feature store too
    if damage:
        return _report_damage(args, damage, "check")
    no_index = engine and not (path / "index" / "manifest.json").exists()
    if args.json:
        print(json.dumps({"healthy": True, "damaged": [], "index": not no_index}, sort_keys=True))
    elif not args.quiet:
        print(f"{args.path}: healthy" + (" (no index yet: nothing indexed)" if no_index else ""))
    return 0


@_writer
@_locked_is_an_error
def run_repair(args) -> int:
    import contextlib


    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder")
    _not_a_feature_store(path)
    is_engine = (path / "engine.json").is_file()
    if args.reindex and not is_engine:
        raise UsageError(f"{args.path}: --reindex needs an engine folder (its feature store holds the features)")
    # an engine folder: its writer lock first, as every other writer of the engine takes it
    engine_lock = WriterLock(path, args.lock_timeout, what="index") if is_engine else contextlib.nullcontext()
    with engine_lock:
        report = repair(_database_dir(path), lock_timeout=args.lock_timeout)
    if args.reindex and not report["unrepairable"]:
        engine = Engine.open(args.path)
        done = engine.reindex_from_store(progress=not args.quiet, lock_timeout=args.lock_timeout)
        report["reindexed"] = len(done.indexed)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    elif not args.quiet:
        if not report["dropped_segments"] and not report["removal_table_reset"]:
            print(f"{args.path}: nothing to repair")
        for seg in report["dropped_segments"]:
            print(f"dropped {seg['name']} ({seg['images']} images lost: index them again)")
        if "reindexed" in report:
            print(f"indexed {report['reindexed']} image(s) again from the feature store")
        if report["removal_table_reset"]:
            print("removal table was damaged: removed images are back in the index (remove them again)")
    return 1 if report["unrepairable"] else 0
