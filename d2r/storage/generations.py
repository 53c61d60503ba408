"""Manifest generations: the commit point of a store folder, what lock-free readers read, what garbage
collection keeps.

A folder holds immutable data parts (index segments and removal tables, feature-store shards) and manifests.
``manifest-<gen>.json`` is written first, then the same text as ``manifest.json``: the rename of the latter is
the commit. Readers read ``manifest.json`` and never lock; the writer keeps every part that the current
generation or one of the :attr:`Generations.keep` − 1 before it (or one superseded less than ``retire_grace``
seconds ago) references, so a reader of an older generation finds its files. A part that no generation ever
listed (a worker's shard before its commit) is kept for ``orphan_grace`` seconds; temporary files a killed
writer left behind are collected too (D19).

A folder whose ``manifest.json`` is missing while generations or parts are there is damaged, not empty: no
writer starts a new store over it (D1); :meth:`Generations.restore` makes the newest readable generation the
commit point again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from d2r import _io
from d2r.storage.files import DamagedError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_GENERATION = re.compile(r"^manifest-(\d{1,18})\.json$")


def generation_file(generation: int) -> str:
    return f"manifest-{int(generation):08d}.json"


@dataclass(frozen=True)
class Generations:
    """The generation log of one kind of store.

    store: ``"index"`` or ``"features"`` (the hint of its damage errors); what: its name in messages;
    read_file: parses one manifest file (conversion and schema included; DamagedError naming it);
    parts: the names of the data parts a manifest references; part_of: the part a folder entry belongs to
    (None: not a data file of this store); keep, retire_grace, orphan_grace: see the module docstring."""
    store: str
    what: str
    read_file: Callable[[Path], dict]
    parts: Callable[[dict], set]
    part_of: Callable[[str], "str | None"]
    keep: int = 3
    retire_grace: float = 0.0
    orphan_grace: float = 0.0

    # ---- reading -------------------------------------------------------------------------------------------
    def files(self, folder) -> dict[int, Path]:
        """Generation number -> its file, of every ``manifest-<gen>.json`` in ``folder``."""
        out = {}
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return out
        for entry in entries:
            m = _GENERATION.match(entry.name)
            if m:
                out[int(m.group(1))] = Path(entry.path)
        return out

    def read(self, folder, name: str = MANIFEST) -> dict:
        """The manifest ``name`` of ``folder`` (default: the commit point). A missing commit point is
        FileNotFoundError in an empty or new folder and :class:`DamagedError` where generations or parts
        are."""
        file = Path(folder) / name
        if not file.is_file():
            if name != MANIFEST:
                raise DamagedError(file, "missing", self.store)
            self.refuse_lost(folder)
            raise FileNotFoundError(f"{folder}: no {self.what} here ({MANIFEST} missing)")
        return self.read_file(file)

    def lost(self, folder) -> str | None:
        """What a folder without ``manifest.json`` still holds of a store (None: nothing, or it has one)."""
        folder = Path(folder)
        if (folder / MANIFEST).exists() or not folder.is_dir():
            return None
        gens = self.files(folder)
        parts = {self.part_of(e.name) for e in os.scandir(folder)} - {None}
        found = []
        if gens:
            found.append(f"{len(gens)} manifest generation(s), the newest {generation_file(max(gens))}")
        if parts:
            found.append(f"{len(parts)} data part(s) such as {min(parts)}")
        return " and ".join(found) or None

    def refuse_lost(self, folder) -> None:
        """:class:`DamagedError` when the commit point of ``folder`` is gone but the store's data is not (a
        writer would start a new, empty store over it and collect the old data as garbage)."""
        lost = self.lost(folder)
        if lost:
            raise DamagedError(Path(folder) / MANIFEST, f"missing, while the folder holds {lost} (no new "
                               f"{self.what} is started over them)", self.store)

    def open(self, folder, opener: Callable[[dict], object], attempts: int = 20):
        """``opener(manifest)`` of the current generation, for a reader that takes no lock: when it finds a
        file of its generation damaged and a newer generation has been committed meanwhile (whose garbage
        collection may have removed the file), it retries with the newer one."""
        for attempt in range(attempts):
            manifest = self.read(folder)
            try:
                return opener(manifest)
            except DamagedError:
                if attempt == attempts - 1:
                    raise
                try:
                    moved = self.read(folder)["generation"] != manifest["generation"]
                except (OSError, ValueError):
                    moved = False
                if not moved:
                    raise
                time.sleep(0.01)
        raise AssertionError("unreachable")

    # ---- writing (the lock holder only) -------------------------------------------------------------------
    def commit(self, folder, manifest: dict) -> None:
        """Write generation ``manifest["generation"]``: its own file first, then ``manifest.json`` (the
        commit). An OSError names the file."""
        folder = Path(folder)
        _io.write_json(folder / generation_file(manifest["generation"]), manifest)
        _io.write_json(folder / MANIFEST, manifest)

    def restore(self, folder) -> str | None:
        """Make the newest generation file that reads as a manifest the commit point again (generation files
        newer than it, all unreadable, are removed); returns its name, None when no generation is readable."""
        folder = Path(folder)
        gens = sorted(self.files(folder).items(), reverse=True)
        for k, (g, file) in enumerate(gens):
            try:
                manifest = self.read_file(file)
            except (ValueError, OSError):
                continue
            if int(manifest["generation"]) != g:
                continue
            _io.write_json(folder / MANIFEST, manifest)
            for _, newer in gens[:k]:
                newer.unlink(missing_ok=True)
            return file.name
        return None

    def recover(self, folder, report: dict, check: Callable) -> bool:
        """The first step of a repair (under the writer lock): a missing or damaged commit point is replaced
        by the newest readable generation (``report["manifest_restored_from"]``). False when none is readable:
        ``report`` then holds ``check(folder)`` as ``damaged`` and the manifest as ``unrepairable``."""
        try:
            self.read(folder)
            return True
        except (DamagedError, FileNotFoundError):
            restored = self.restore(folder)
        if restored is None:
            report["damaged"] = check(folder)
            report["unrepairable"].append(f"{MANIFEST} (no readable generation left)")
            return False
        report["manifest_restored_from"] = restored
        return True

    def collect_garbage(self, folder, current: dict, protect=()) -> list[str]:
        """Delete the parts and generation files no kept generation needs, and stale temporary files; returns
        the names deleted. Parts listed only by generations that are no longer kept go at once; parts no
        generation lists go once older than ``orphan_grace``. A kept generation that cannot be read stops the
        collection (nothing is deleted this time)."""
        folder = Path(folder)
        gen = int(current["generation"])
        now = time.time()
        files = self.files(folder)
        keep = set(self.parts(current)) | set(protect)
        doomed: set = set()
        expired = []
        for g, file in sorted(files.items()):
            if g >= gen:
                continue
            successor = files.get(g + 1)
            recent = successor is not None and now - _mtime(successor) < self.retire_grace
            live = g > gen - self.keep or recent
            try:
                names = self.parts(self.read_file(file))
            except (ValueError, OSError) as exc:
                if live:
                    log.warning("%s: garbage collection skipped: %s", folder, exc)
                    return []
                names = set()
            if live:
                keep |= names
            else:
                doomed |= names
                expired.append(file)
        doomed -= keep
        deleted = []
        for entry in os.scandir(folder):
            part = self._tmp_part(entry.name)
            if part is not None:  # a temporary file: of a part (it may be a worker's) or of the writer itself
                old = part is False or part in doomed or now - _mtime(entry) >= self.orphan_grace
            else:
                part = self.part_of(entry.name)
                if part is None or part in keep:
                    continue
                old = part in doomed or now - _mtime(entry) >= self.orphan_grace
            if old and _remove(entry):
                deleted.append(entry.name)
        for file in expired:
            if _remove(file):
                deleted.append(file.name)
        return deleted

    def _tmp_part(self, name: str):
        """For a temporary entry (``.<name>.tmp`` or ``.<name>.<random>.tmp``): the part it belongs to, or
        False when it is the writer's own (a manifest); None when ``name`` is not a temporary entry."""
        if not (name.startswith(".") and name.endswith(".tmp")) or len(name) < 6:
            return None
        inner = name[1:-4]
        for candidate in (inner, inner.rsplit(".", 1)[0]):
            part = self.part_of(candidate)
            if part is not None:
                return part
        return False


def _mtime(entry) -> float:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _remove(entry) -> bool:
    path = Path(entry.path if isinstance(entry, os.DirEntry) else entry)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.debug("could not remove %s: %s", path, exc)
        return False
