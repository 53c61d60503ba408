"""``d2r index check`` of an engine folder: every file it holds, without opening the engine."""

from __future__ import annotations

import os
from pathlib import Path

from d2r import _io
from d2r._lock import LOCK_NAME
from d2r.engine.config import engine_config
from d2r.engine.global_stage import FOLDER as GLOBAL_FOLDER
from d2r.engine.sources import LOG, SourcesTable, read_failures, read_sources, salvage_sources
from d2r.features.store import FeatureStore, check_store
from d2r.globaldesc.index import GlobalIndex
from d2r.index.database import Database
from d2r.index.manifest import check_database


def check_engine(path, digests: bool = True) -> list[dict]:
    """:meth:`Engine.check` of the engine folder ``path`` without opening it (a damaged index cannot be
    opened but can be checked); an engine with no feature store or no index yet has nothing to check there.
    ``engine.json``, ``sources.json``, ``sources.log`` and ``failures.json`` must parse (commands read
    them)."""
    path = Path(path)
    damaged = []
    for name, read in (("engine.json", lambda: engine_config(path)),
                       ("sources.json", lambda: _io.read_json(path / "sources.json", {})),
                       (LOG, lambda: _sources_log_damage(path)),
                       ("failures.json", lambda: read_failures(path))):
        try:
            read()
        except (OSError, ValueError) as exc:
            problem = str(exc)
            damaged.append({"file": name, "problem": problem.split(": ", 1)[-1] if problem.startswith(str(path))
                            else problem})
    if has_store(path):
        damaged += check_store(path / "features", digests=digests)
    if (path / "index").is_dir():
        damaged += [dict(d, file=f"index/{d['file']}")
                    for d in check_database(path / "index", digests=digests)]
    if (path / GLOBAL_FOLDER).is_dir():
        damaged += _global_damage(path / GLOBAL_FOLDER)
    if not damaged:
        damaged += _cross_check(path)
    return damaged


def _global_damage(folder: Path) -> list[dict]:
    """The two-stage search's global vectors (``global/``): every file of its current generation verified. They
    are derived data: removing the folder and running ``d2r index add`` again extracts them anew."""
    hint = f" (remove {folder} and run `d2r index add` to extract the global vectors again)"
    try:
        problems = GlobalIndex.open(folder).check()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems = [str(exc)]
    return [{"file": f"{GLOBAL_FOLDER}/", "problem": problem + hint} for problem in problems]


def has_store(path: Path) -> bool:
    """Whether the engine at ``path`` has a feature store: its commit point, or any file of one but the lock (a
    store whose ``manifest.json`` was lost is damaged, not absent: D13 said "no stored features yet")."""
    features = Path(path) / "features"
    return (features / "manifest.json").exists() or features.is_dir() and any(
        p.name != ".lock" for p in features.iterdir())


def indexed_and_stored(path: Path):
    """(indexed ids as str, the feature store) of the engine at ``path``; None without an index or a store."""
    found = open_index_and_store(path)
    return None if found is None else ([str(i) for i in found[0].ids().tolist()], found[1])


def open_index_and_store(path: Path):
    """(the Database, the FeatureStore) of the engine at ``path``; None without an index or a store."""
    if not (path / "index" / "manifest.json").is_file() or not (path / "features" / "manifest.json").is_file():
        return None
    return Database.open(path / "index"), FeatureStore.open(path / "features")


def _recorded_sources(indexed, store, table) -> dict:
    """{id: file} of the indexed images the sources ``table`` lacks but the feature store records a file for."""
    return {i: f for i in indexed if i not in table and i in store for f in [store.source(i)] if f}


def _not_canonical(table) -> list[str]:
    """Ids whose file in the sources ``table`` is no absolute, normalised path (d2r records each image's
    resolved absolute path; ``../../etc/passwd`` is none, D10)."""
    return [i for i, f in table.items() if not isinstance(f, str) or not os.path.isabs(f)
            or os.path.normpath(f) != f]


def _wrong_sources(indexed, store, table) -> dict:
    """{id: the store's file} of the indexed images whose file in the sources ``table`` is not the one the
    feature store records their features came from, as given or resolved (a table pointing an image at
    ``/etc/passwd``, D10)."""
    return {i: f for i in indexed if i in table and i in store for f in [store.source(i)]
            if f and f != table[i] and os.path.realpath(f) != os.path.realpath(table[i])}


def _cross_check(path: Path) -> list[dict]:
    """The side tables against the index and the store, once every file is sound (D13): every live index id
    has stored features (else every search reaching it fails to verify) and, where the store records the
    image's file, a row in the sources table naming that file (else hits lose their paths, or name, and serve
    reads, another file); and, unless a writer is running, every stored image is indexed (else searches
    silently miss it)."""
    table = read_sources(path)[0]
    odd = _not_canonical(table)
    damaged = [{"file": "sources.json", "problem": f"{len(odd)} image file(s) are not absolute paths (e.g. "
                f"{table[odd[0]]!r} for {odd[0]!r}): `d2r index repair` takes them out of the sources table, "
                "or sets them to the file the feature store records"}] if odd else []
    found = open_index_and_store(path)
    if found is None:
        return damaged
    db, store = found
    indexed = [str(i) for i in db.ids().tolist()]
    wrong = [i for i in _wrong_sources(indexed, store, table) if i not in odd]
    if wrong:
        damaged.append({"file": "sources.json", "problem": f"{len(wrong)} indexed image(s) name another file "
                        f"than the one their features came from (e.g. {table[wrong[0]]!r} for {wrong[0]!r}, the "
                        f"feature store says {store.source(wrong[0])!r}): `d2r index repair` sets them back"})
    featureless = featureless_indexed(indexed, store)
    if featureless:
        damaged.append({"file": "index", "problem": f"{len(featureless)} indexed image(s) have no stored "
                        f"features (e.g. {featureless[0]!r}): `d2r index repair` takes them out of the index"})
    unsourced = list(_recorded_sources(indexed, store, table))
    if unsourced:
        damaged.append({"file": "sources.json", "problem": f"{len(unsourced)} indexed image(s) lost their file "
                        f"(e.g. {unsourced[0]!r}) although the feature store records it: `d2r index repair` "
                        "restores them"})
    if writer_running(path):  # while `index add` or `remove` runs, the store and the index differ: no damage
        return damaged
    left = removed_with_features(db, store)
    if left:
        damaged.append({"file": "features", "problem": f"{len(left)} removed image(s) still have stored "
                        f"features (e.g. {left[0]!r}: an interrupted `index remove`): `d2r index repair` deletes "
                        "them"})
    unindexed = unindexed_stored(path, indexed, store, db)
    if unindexed:
        damaged.append({"file": "index", "reindex": True, "problem": f"{len(unindexed)} image(s) of the feature "
                        f"store are not in the index (e.g. {unindexed[0]!r}: a repair that dropped segments, or "
                        "an interrupted `index add` or `repair --reindex`)"})
    return damaged


def removed_with_features(db, store) -> list[str]:
    """Ids the index ``db`` lists as removed, not indexed again, whose features ``store`` still holds (a
    `remove` killed between committing the index and the store): to delete, never to index again."""
    live = {str(i) for i in db.ids().tolist()}
    return [i for i in dict.fromkeys(str(i) for i in db.removed_ids().tolist()) if i not in live and i in store]


def featureless_indexed(indexed, store) -> list[str]:
    """The ``indexed`` ids ``store`` holds no features for (every search reaching one fails to verify)."""
    return [i for i in indexed if i not in store]


def unindexed_stored(path, indexed=None, store=None, db=None) -> list[str]:
    """Ids the engine's feature store holds but its index does not, removed images left aside (D19: a
    `repair` that dropped segments, or a `repair --reindex` killed before it reindexed them, left a healthy
    index missing them, and `check` and `info` said nothing): what ``d2r index repair --reindex`` indexes
    again. [] without an index or a store."""
    if db is None:
        found = open_index_and_store(Path(path))
        if found is None:
            return []
        db, store = found
        indexed = [str(i) for i in db.ids().tolist()]
    skip = set(indexed) | {str(i) for i in db.removed_ids().tolist()}
    return [i for i in store.ids() if i not in skip]


def writer_running(path) -> bool:
    """Whether a live process holds the engine's writer lock, told without taking it (a writer that
    fails at once on a held lock must never fail because of a check): the pid the holder wrote in ``.lock``,
    which a writer that ended clears and a killed one leaves behind. While ``index add`` runs, stored images
    wait to be indexed: no damage."""
    try:
        pid = int((Path(path) / LOCK_NAME).read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def restore_sources(path) -> dict:
    """Repair the sources table of the engine at ``path``: a damaged one (a garbled ``sources.log`` line, an
    unreadable ``sources.json``) is rebuilt from what can be read of it (:func:`salvage_sources`), then every
    indexed image missing from it gets the file its feature store records (a truncated ``sources.log``, a lost
    ``sources.json``); an entry naming another file than the store records is set back to it, and one that
    is no absolute path (D10) is set likewise or dropped. Returns ``{"restored": n, "corrected": n,
    "dropped": n}``, plus, when it was damaged, ``"lost"`` (what could not be read) and ``"without_file"``:
    the indexed images left with no known file (their hits show no path). The caller holds the engine's
    writer lock."""
    path = Path(path)
    sources = SourcesTable(path)
    try:
        sources.load()
        lost = None
    except ValueError:
        table, lost = salvage_sources(path)
        sources.rewrite(table)
    found = indexed_and_stored(path)
    restored = {} if found is None else _recorded_sources(*found, sources)
    corrected = {} if found is None else _wrong_sources(*found, sources)
    odd = _not_canonical(sources)
    for image_id in odd:
        del sources[image_id]
    corrected.update(found and _recorded_sources(*found, sources) or {})  # an odd one the store knows
    corrected = {i: f for i, f in corrected.items() if i not in restored}
    for image_id, file in {**restored, **corrected}.items():
        sources[image_id] = file
    if restored or corrected or odd:
        sources.save()
    out = {"restored": len(restored), "corrected": len(corrected),
           "dropped": len([i for i in odd if i not in corrected])}
    if lost is not None:
        out["lost"] = lost
        out["without_file"] = 0 if found is None else sum(i not in sources for i in found[0])
    return out


def _sources_log_damage(path: Path) -> None:
    """ValueError naming ``sources.log`` when it is damaged (a damaged ``sources.json`` is reported apart)."""
    try:
        read_sources(path)
    except ValueError as exc:
        if str(exc).startswith(str(path / LOG)):
            raise


def reset_damaged_failures(path) -> bool:
    """Replace a damaged ``failures.json`` of the engine at ``path`` by an empty table (it only remembers which
    files failed, so that ``index add`` skips them); True when it was reset. The caller holds the writer
    lock."""
    path = Path(path)
    try:
        read_failures(path)
        return False
    except ValueError:
        _io.write_json(path / "failures.json", {})
        return True
