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
from d2r.cli import UsageError, error_line, key_value, positive_int
from d2r.config import parse_overrides
from d2r.engine import Engine
from d2r.engine.check import (check_engine, featureless_indexed, open_index_and_store, reset_damaged_failures,
                              restore_sources, unindexed_stored, writer_running)
from d2r.engine.config import EngineConfig
from d2r.features.store import FORMAT, check_store, repair_store
from d2r.features.store.format import generations as store_generations
from d2r.index.manifest import check_database, repair_database
from d2r.features.extract import failure_line
from d2r.features.image import listed_images
from d2r.features.store import FeatureStore


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("index", help="create an index, add or remove images, show its state",
                              description="Manage a d2r engine folder: its config, features, codebook and database.")
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p.set_defaults(quiet_level=logging.ERROR)  # --quiet: no log lines (failed images are listed by the command)

    c = sub.add_parser("create", help="create an empty index (optionally indexing images right away)",
                       description="Create an engine folder: its config (defaults, --config, flags, --set), "
                                   "and a codebook (--codebook FILE, or K words trained on the first images "
                                   "indexed). Every setting, path, model and codebook is checked before the "
                                   "folder exists. With --images, index them right away (as `index add`); if "
                                   "that fails or is interrupted, the features extracted so far are kept and "
                                   "`d2r index add` resumes.")
    c.add_argument("path", help="engine folder to create")
    c.add_argument("--config", help="EngineConfig YAML/JSON (sections: features, regions, codebook, index, "
                                    "rerank, qe)")
    c.add_argument("--codebook", help="codebook .npz (default: train one on the first images indexed)")
    c.add_argument("--codebook-size", type=positive_int, metavar="K",
                   help="words of the codebook trained on the first images indexed (default 1024; not with "
                        "--codebook)")
    c.add_argument("--features", choices=["rootsift", "delf", "aliked", "disk"],
                   help="local features (default rootsift; aliked, disk: the [learned] extra)")
    c.add_argument("--model", help="DELF SavedModel folder")
    c.add_argument("--regions", help="region proposer: none, grid, density or a detector SavedModel folder")
    c.add_argument("--kernel", choices=["vlad", "asmk", "asmk_star"], help="match kernel (default asmk_star)")
    c.add_argument("--mode", choices=["aggregation", "search"], help="regional aggregation or regional search")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                   help="override a config option by dotted path, e.g. --set rerank.descriptor_distance=0.5")
    c.add_argument("--images", help="index this folder or list file right after creating")
    c.add_argument("--id-prefix", default="", metavar="P", help="prepend P to the image ids (default none)")
    _common(c)
    _lock_timeout(c)
    c.set_defaults(func=run_create)

    a = sub.add_parser("add", help="index images (folder, list file or paths) or a feature store; resumable",
                       description="Index images into an engine: folders (searched recursively), list files "
                                   "(one path a line) or image paths, or the features of a feature store "
                                   "(--store). Resumable: indexed images are skipped, so an interrupted add "
                                   "is simply repeated; images that fail are listed (exit 3) and skipped "
                                   "next time unless --retry-failed. The first add without a codebook "
                                   "trains one.")
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

    r = sub.add_parser("remove", help="remove images by id",
                       description="Remove images from the index by id (as `d2r search` prints them), with "
                                   "their stored features and sources; the space is reclaimed when segments "
                                   "are merged.")
    r.add_argument("path", help="engine folder")
    r.add_argument("ids", nargs="+", help="image ids (as `d2r search` prints them)")
    _common(r)
    _lock_timeout(r)
    r.set_defaults(func=run_remove)

    i = sub.add_parser("info", help="counts, sizes and config",
                       description="Show an engine's counts (images, failures, index items and posting "
                                   "entries), sizes on disk, codebook and config; checks sizes and structure, "
                                   "and that the index and the feature store hold the same images (exit 1 if "
                                   "not; `d2r index check` verifies every checksum).")
    i.add_argument("path", help="engine folder")
    _common(i)
    i.set_defaults(func=run_info)

    k = sub.add_parser("check",
                       help="verify every index file (sizes, checksums, structure); exit 1 if damaged",
                       description="Verify every file of an engine (its index and feature store) or of a "
                                   "database folder: sizes, structure and every BLAKE2 checksum; then that the "
                                   "index, the feature store and the sources table agree. Lists what is damaged "
                                   "and exits 1; `d2r index repair` drops damaged segments and mends the rest.")
    k.add_argument("path", help="engine folder (or a database folder)")
    _common(k)
    k.set_defaults(func=run_check)

    f = sub.add_parser("repair", help="drop damaged segments (their images must be indexed again) and commit",
                       description="Drop the damaged segments of an index and commit a healthy generation. "
                                   "The images of a dropped segment leave the index; --reindex indexes them "
                                   "again from the engine's feature store (no re-extraction).")
    f.add_argument("path", help="engine folder (or a database folder)")
    _lock_timeout(f)
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
    name = f"d2r index {args.action}"
    with muted("d2r.build"), muted("d2r.features.extract"):  # each failed image is listed once, below
        if getattr(args, "store", None):
            report = engine.index_store(args.store, progress=not args.quiet, lock_timeout=args.lock_timeout)
        else:
            sources = images[0] if len(images) == 1 else images
            report = engine.index(sources, progress=not args.quiet,
                                  retry_failed=getattr(args, "retry_failed", False),
                                  lock_timeout=args.lock_timeout, id_prefix=args.id_prefix)
    out = report.to_dict()
    out["images_in_index"] = len(engine)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for path, reason in report.failed.items():
            print(f"failed: {failure_line(path, reason)}", file=sys.stderr)
        if not args.quiet:
            if report.codebook:
                c = report.codebook
                print(f"trained a codebook of K={c['k']} words on {c['descriptors']} descriptors "
                      f"-> {c['path']}")
            print(f"{out['indexed']} indexed, {out['skipped']} skipped, {len(report.failed)} failed "
                  f"in {out['seconds']:.1f} s; {len(engine)} images in {engine.path}")
    if report.featureless and not args.json:
        print(f"{name}: warning: {len(report.featureless)} image(s) have no local features (blank, tiny or "
              f"featureless, e.g. {report.featureless[0]}): indexed, but they can never be found",
              file=sys.stderr)
    if not report.failed:
        return 0
    if not report.indexed and not report.skipped:
        print(f"{name}: error: none of the {len(report.failed)} image(s) could be indexed", file=sys.stderr)
        return 1
    print(f"{name}: partial failure: {len(report.failed)} image(s) failed, {len(report.indexed)} indexed "
          f"(retry them with `d2r index add {engine.path} ... --retry-failed`)", file=sys.stderr)
    return 3


def _stored_images(path: Path) -> int | None:
    """Images in the engine's feature store; None when it cannot be told (a store there, but unreadable)."""
    if not (path / "features" / "manifest.json").exists():
        return 0
    try:
        return len(FeatureStore.open(path / "features"))
    except (OSError, ValueError):
        return None


@_writer
def run_create(args) -> int:
    import shutil

    if args.codebook and args.codebook_size is not None:
        raise UsageError("--codebook FILE and --codebook-size K are alternatives (the size of a given "
                         "codebook is its own)")
    config = build_config(args)
    pairs = None
    if args.images:  # listed before the folder exists: a missing or empty folder is one line, nothing made
        if not Path(args.images).exists():
            raise FileNotFoundError(f"--images {args.images}: no such folder or list file")
        pairs = listed_images(args.images)
    existed = Path(args.path).exists()
    engine = Engine.create(args.path, config, codebook=args.codebook,  # validates everything first
                           images=None if pairs is None else len(pairs))
    if pairs is not None:
        resume = f"`d2r index add {engine.path} {args.images}`"
        try:
            return _index(engine, [pairs], args)
        except KeyboardInterrupt:  # what was saved stays: the same images are resumed with `index add`
            print(f"d2r index create: interrupted; resume with {resume}", file=sys.stderr)
            raise
        except Exception as exc:
            kept = _stored_images(engine.path)
            if kept == 0 and not existed:  # nothing extracted: a failed create leaves no folder behind
                shutil.rmtree(engine.path, ignore_errors=True)
                raise
            print(error_line("d2r index create", exc), file=sys.stderr)
            what = "the features extracted so far are" if kept is None else f"{kept} extracted image(s) are"
            print(f"d2r index create: {what} kept in {engine.path}; fix the problem, then resume with "
                  f"{resume}", file=sys.stderr)
            return 1
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
    path = Path(args.path)
    opened = None if damaged else open_index_and_store(path)  # (db, store): opened once for both lists
    indexed = None if opened is None else [str(i) for i in opened[0].ids().tolist()]
    featureless = [] if opened is None else featureless_indexed(indexed, opened[1])  # searches fail (D13)
    unindexed = ([] if opened is None or writer_running(path) else
                 unindexed_stored(path, indexed, opened[1], opened[0]))
    info["featureless"] = len(featureless)
    info["unindexed"] = len(unindexed)  # stored, not searchable: `repair --reindex` indexes them (D19)
    if args.json:
        print(json.dumps(info, sort_keys=True, default=str))
    else:
        idx = info.get("index", {})
        state = ("DAMAGED" if damaged or featureless else "INCOMPLETE" if unindexed else
                 "healthy (sizes and structure; `d2r index check` verifies checksums)")
        print(f"{info['path']}: {info['images']} images, {info['failures']} failures, {state}")
        if idx:
            cfg = idx["config"]
            print(f"  kernel {cfg['kernel']}, mode {cfg['mode']}, codebook K={idx['codebook']['k']} "
                  f"D={idx['codebook']['dim']} ({idx['codebook']['fingerprint']})")
            removed = idx["counts"].get("images_total", info["images"]) - idx["counts"]["images"]
            gone = (f" ({removed} removed image(s) among them: their items stay on disk, skipped by every "
                    "search, until their segments are merged)") if removed > 0 else ""
            print(f"  {idx['counts']['items']} items{gone}, {idx['counts']['entries']} posting entries, "
                  f"{idx.get('bytes_on_disk', 0) / 1e6:.1f} MB on disk")
        store = info.get("store")
        if store and "images" in store:
            print(f"  feature store: {store['images']} images in {store['shards']} shard(s), "
                  f"{store['bytes'] / 1e6:.1f} MB")
    for d in damaged:
        print(f"d2r index info: damaged: {d['file']}: {d['problem']}", file=sys.stderr)
    if featureless:
        print(f"d2r index info: error: {args.path}: {len(featureless)} indexed image(s) have no stored features "
              f"(e.g. {featureless[0]!r}); `d2r index check {args.path}` names the damage, `d2r index repair "
              f"{args.path}` takes them out of the index", file=sys.stderr)
    elif unindexed:
        print(f"d2r index info: error: {args.path}: {len(unindexed)} image(s) of the feature store are not in "
              f"the index (e.g. {unindexed[0]!r}); {_repair_hint(args.path, [{'file': 'index', 'reindex': 1}])}",
              file=sys.stderr)
    return 1 if damaged or featureless or unindexed else 0


def _repair_hint(path, damage) -> str:
    """What to do about ``damage``: ``engine.json`` holds the settings and only a copy restores it; stored
    images missing from the index need ``repair --reindex``; the rest ``repair`` handles."""
    if all(d["file"] == "engine.json" for d in damage):
        return ("engine.json holds the engine's settings: restore it from a copy (nothing else can tell the "
                "options its index was built with)")
    if all(d.get("reindex") for d in damage):
        return (f"`d2r index repair {path} --reindex` indexes them again from the feature store "
                "(no re-extraction)")
    return (f"`d2r index repair {path}` repairs it (damaged segments and shards are dropped; `--reindex` "
            "indexes their images again)")


def _is_engine(path: Path) -> bool:
    """An engine folder: its ``engine.json``, or an index beside a feature store (an engine whose engine.json
    was lost is a damaged engine, not a healthy database: D13)."""
    return (path / "engine.json").is_file() or (path / "index").is_dir() and (path / "features").is_dir()


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


def _is_feature_store(path) -> bool:
    """A feature store folder: its manifest says so, or (manifest lost) its generation files do."""
    path = Path(path)
    files = [path / "manifest.json"] + sorted(store_generations().files(path).values())
    for file in files:
        try:
            return json.loads(file.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _print_store_repair(args, report: dict) -> int:
    if args.json and "features" not in report:
        print(json.dumps(report, sort_keys=True))
    elif not args.quiet:
        if "manifest_restored_from" in report:
            print(f"{report['path']}: manifest.json restored from {report['manifest_restored_from']}")
        for shard in report["dropped_shards"]:
            print(f"dropped {shard['name']} ({shard['images']} images' features lost: extract them again)")
        if not (report["dropped_shards"] or "manifest_restored_from" in report or report["unrepairable"]):
            print(f"{report['path']}: nothing to repair")
    return 1 if report["unrepairable"] else 0


def _database_damage(path, quick: bool = False) -> list[dict]:
    """Damaged files of the engine's (or database folder's) index; ``quick``: structure and sizes only."""
    db = _database_dir(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such folder")
    _not_a_feature_store(path)
    if quick and not (db / "manifest.json").exists() and not any(db.glob("manifest-*.json")):
        return []  # an engine without an index yet
    return [dict(d, file=str(Path(db.name) / d["file"]) if db != Path(path) else d["file"])
            for d in check_database(db, digests=not quick)]


def _report_damage(args, damage, action) -> int:
    if args.json:
        print(json.dumps({"healthy": False, "damaged": damage}, sort_keys=True))
    else:
        hint = _repair_hint(args.path, damage)
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
    engine = _is_engine(path)
    if engine:
        damage = check_engine(path)  # its feature store too
    else:
        damage = check_store(path) if _is_feature_store(path) else _database_damage(path)
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
    is_engine = (path / "engine.json").is_file()
    if args.reindex and not is_engine:
        raise UsageError(f"{args.path}: --reindex needs an engine folder (its feature store holds the features)")
    if _is_feature_store(path):  # `d2r extract`'s output (or an engine's features/ given directly)
        return _print_store_repair(args, repair_store(path, lock_timeout=args.lock_timeout))
    # an engine folder: its writer lock first, as every other writer of the engine takes it
    engine_lock = WriterLock(path, args.lock_timeout, what="index") if is_engine else contextlib.nullcontext()
    with engine_lock:
        report = repair_database(_database_dir(path), lock_timeout=args.lock_timeout)
        features = path / "features"
        if is_engine and _is_feature_store(features) and check_store(features):
            report["features"] = repair_store(features, lock_timeout=args.lock_timeout)
            report["unrepairable"] += [f"features/{u}" for u in report["features"]["unrepairable"]]
        if is_engine and not report["unrepairable"]:
            sources = restore_sources(path)
            report["sources_restored"] = sources["restored"]
            report["sources_corrected"], report["sources_dropped"] = sources["corrected"], sources["dropped"]
            if "lost" in sources:
                report["sources_rebuilt"] = {**sources["lost"], "without_file": sources["without_file"]}
            report["failures_reset"] = reset_damaged_failures(path)
    if is_engine and not report["unrepairable"] and (path / "index" / "manifest.json").exists():
        # indexed without stored features (a dropped shard, a reset removal table): out of the index
        engine = Engine.open(path)
        report["unindexed"] = engine.unindex_featureless(lock_timeout=args.lock_timeout)
        report["features_deleted"] = engine.delete_removed_features(lock_timeout=args.lock_timeout)
        report["lost"] = len(unindexed_stored(path))  # images stored but no longer indexed
    if args.reindex and not report["unrepairable"]:
        engine = Engine.open(args.path)
        done = engine.reindex_from_store(progress=not args.quiet, lock_timeout=args.lock_timeout)
        report["reindexed"] = len(done.indexed)
        # images whose features were lost: extracted again from their files, where the sources table has one
        files = engine.lost_sources()
        if files:
            again = engine.index(files, progress=not args.quiet, lock_timeout=args.lock_timeout)
            report["reextracted"] = len(again.indexed)
            report["unindexed"] = [i for i in report["unindexed"] if i not in set(again.indexed)]
    if args.json:
        print(json.dumps(report, sort_keys=True))
    elif not args.quiet:
        mended = ("dropped_segments", "removal_table_reset", "unindexed", "sources_restored", "failures_reset",
                  "sources_rebuilt", "sources_corrected", "sources_dropped", "features_deleted",
                  "manifest_restored_from", "features")
        if not any(report.get(key) for key in mended):
            print(f"{args.path}: nothing to repair")
        if "manifest_restored_from" in report:
            print(f"manifest.json restored from {report['manifest_restored_from']}")
        if "features" in report:
            _print_store_repair(args, report["features"])
        for seg in report["dropped_segments"]:  # a segment's count includes its removed images
            print(f"dropped {seg['name']} (it held {seg['images']} image record(s), removed ones included)")
        if report.get("lost") and "reindexed" not in report:
            print(f"{report['lost']} image(s) of the feature store are no longer in the index: "
                  f"`d2r index repair {args.path} --reindex` indexes them again from the feature store "
                  "(no re-extraction)")
        if "reindexed" in report:
            print(f"indexed {report['reindexed']} image(s) again from the feature store")
        if report.get("failures_reset"):
            print("failures.json was damaged: reset (failed images are tried again by the next `index add`)")
        if "sources_rebuilt" in report:
            r = report["sources_rebuilt"]
            what = ", ".join(filter(None, ["sources.json unreadable" if r.get("snapshot") else "",
                                           f"line(s) {', '.join(map(str, r['log_lines']))} of sources.log "
                                           "unreadable" if r["log_lines"] else ""]))
            print(f"the sources table was damaged ({what}): rebuilt from what was readable and the feature "
                  "store" + (f"; {r['without_file']} indexed image(s) have no known file left (their hits show "
                             "no path; `d2r index add` of their files records them again)"
                             if r["without_file"] else ""))
        if report.get("sources_restored"):
            print(f"restored the files of {report['sources_restored']} image(s) in the sources table from the "
                  "feature store")
        if report.get("features_deleted"):
            print(f"deleted the stored features of {len(report['features_deleted'])} removed image(s) (an "
                  "interrupted `index remove`)")
        if report.get("sources_corrected"):
            print(f"set the files of {report['sources_corrected']} image(s) in the sources table back to those "
                  "their features came from (as the feature store records them)")
        if report.get("sources_dropped"):
            print(f"dropped {report['sources_dropped']} entry(ies) of the sources table that were no absolute "
                  "path (and unknown to the feature store)")
        if report.get("reextracted"):
            print(f"extracted and indexed {report['reextracted']} image(s) again from their files")
        if report["removal_table_reset"]:
            print("removal table was damaged: images removed before had no features left and stay removed; "
                  "removed images whose features were kept are back in the index (remove them again)")
        if report.get("unindexed"):
            print(f"{len(report['unindexed'])} indexed image(s) had no stored features (a dropped feature shard, "
                  "or removed before): taken out of the index" +
                  ("" if args.reindex else f"; `d2r index repair {args.path} --reindex` extracts those whose "
                                           "files still exist again"))
    return 1 if report["unrepairable"] else 0
