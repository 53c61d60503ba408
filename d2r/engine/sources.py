"""An engine's sources table (image id → file), kept as a snapshot plus an append-only journal.

``sources.json`` is the snapshot: a plain ``{id: path}`` JSON object (what older d2r versions wrote and
read). ``sources.log`` holds the changes since: one JSON record a line, ``{"set": {id: path, ...}}`` and/or
``{"del": [id, ...]}``, appended, flushed and fsynced by each save, so a save writes only its changes. When
the log outgrows the snapshot (and :data:`COMPACT_FLOOR`), the save writes a new snapshot atomically, then
replaces the log by an empty one (a new file: readers holding the old one still read it whole), so bytes
written stay linear in the changes. The old log replayed over the new snapshot gives the new snapshot, so a
reader that opens the snapshot before the log and checks that the snapshot was not replaced meanwhile
always gets the table of some save. A torn last line (a crash mid-append) is ignored and cut off by the
next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import MutableMapping
from pathlib import Path

from d2r import _io
from d2r._io import parse_json

SNAPSHOT = "sources.json"
LOG = "sources.log"
COMPACT_FLOOR = 4 << 20  # bytes: the log is compacted once larger than this and than the snapshot
_RETRIES = 200


def _record(path: Path, number: int, line: bytes):
    """One log line as ``(set, del)``; None when not JSON; ValueError naming the file when of a wrong
    shape."""
    try:
        rec = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    sets = rec.get("set", {}) if isinstance(rec, dict) else None
    dels = rec.get("del", []) if isinstance(rec, dict) else None
    if (not isinstance(sets, dict) or not isinstance(dels, list) or set(rec) - {"set", "del"}
            or not all(isinstance(v, str) for v in sets.values())
            or not all(isinstance(i, str) for i in dels)):
        raise ValueError(f"{path}: line {number} is not a sources record (corrupted?)")
    return sets, dels


def replay(path: Path, raw: bytes, table: dict, lost: list | None = None) -> int:
    """Apply the log bytes ``raw`` (of ``path``) to ``table`` in order; returns the length of its good part.
    A torn last line (no newline, or not JSON) is ignored; any other damage is a ValueError naming the
    file, or, with ``lost``, a skipped line whose number is appended to it (salvage)."""
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" when the log ends with a newline
    end = 0
    for number, line in enumerate(lines, 1):
        try:
            rec = _record(path, number, line)
            if rec is None:
                if number == len(lines) and not torn:
                    break  # an unparsable last line: torn too
                raise ValueError(f"{path}: line {number} is not valid JSON (corrupted?)")
        except ValueError:
            if lost is None:
                raise
            lost.append(number)
            continue
        for image_id in rec[1]:
            table.pop(image_id, None)
        table.update(rec[0])
        end += len(line) + 1
    return end


def _same_file(a, b) -> bool:
    return (a is None) == (b is None) and (a is None or (a.st_ino, a.st_dev, a.st_mtime_ns, a.st_size)
                                           == (b.st_ino, b.st_dev, b.st_mtime_ns, b.st_size))


def read_sources(folder) -> tuple[dict, int, int]:
    """The sources table of the engine folder ``folder``, consistent while another process saves or compacts
    it: ``(table, good bytes of the log, snapshot bytes)``. Never blocks the writer; retries when the snapshot
    was replaced while reading."""
    folder = Path(folder)
    snap, log = folder / SNAPSHOT, folder / LOG
    for _ in range(_RETRIES):
        with contextlib.ExitStack() as stack:
            try:  # the snapshot stays open until checked: its inode cannot be reused meanwhile
                f = stack.enter_context(open(snap, "rb"))
                before, raw = os.fstat(f.fileno()), f.read()
            except FileNotFoundError:
                before, raw = None, b""
            try:
                with open(log, "rb") as g:
                    journal = g.read()
            except FileNotFoundError:
                journal = b""
            try:
                after = snap.stat()
            except FileNotFoundError:
                after = None
            if _same_file(before, after):
                table = parse_json(snap, raw, {}) if before is not None else {}
                return table, replay(log, journal, table), len(raw)
        time.sleep(0.001)
    raise OSError(f"{snap}: replaced {_RETRIES} times while being read (another process compacting it?)")


def salvage_sources(folder) -> tuple[dict, dict]:
    """What can be read of a damaged sources table of the engine folder ``folder`` (D7: a garbled
    ``sources.log`` line made ``repair`` refuse): the snapshot unless unreadable, then every good log line in
    order, skipping the bad ones. Returns ``(table, lost)``, ``lost``: ``{"log_lines": [numbers skipped]}``
    and ``"snapshot": True`` when ``sources.json`` could not be read."""
    folder = Path(folder)
    lost: dict = {"log_lines": []}
    try:
        table = parse_json(folder / SNAPSHOT, (folder / SNAPSHOT).read_bytes(), {})
    except FileNotFoundError:
        table = {}
    except ValueError:
        table, lost["snapshot"] = {}, True
    table = {k: v for k, v in table.items() if isinstance(v, str)}
    try:
        raw = (folder / LOG).read_bytes()
    except FileNotFoundError:
        raw = b""
    replay(folder / LOG, raw, table, lost=lost["log_lines"])
    return table, lost


class SourcesTable(MutableMapping):
    """The sources table of an engine folder, read on first access; changes are kept until :meth:`save`
    (by the engine's one writer, under its lock)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._table: dict | None = None
        self._changed: dict = {}  # id → path, or None when deleted, since the last save
        self._log_end = self._snapshot_size = 0

    def load(self) -> dict:
        if self._table is None:
            self._table, self._log_end, self._snapshot_size = read_sources(self.folder)
        return self._table

    def reload(self) -> None:
        """Forget what was read (and unsaved changes): the next access reads the files again."""
        self._table, self._changed = None, {}

    def __getitem__(self, image_id):
        return self.load()[image_id]

    def __setitem__(self, image_id, path):
        self.load()[image_id] = self._changed[image_id] = str(path)

    def __delitem__(self, image_id):
        del self.load()[image_id]
        self._changed[image_id] = None

    def __iter__(self):
        return iter(self.load())

    def __len__(self):
        return len(self.load())

    def __contains__(self, image_id):
        return image_id in self.load()

    def get(self, image_id, default=None):
        return self.load().get(image_id, default)

    def rewrite(self, table: dict) -> None:
        """Replace the whole table by ``table``: a new snapshot, then an empty log (as a compaction), e.g. when
        ``repair`` rebuilt a damaged one."""
        self._table, self._changed = dict(table), {}
        self._compact()

    def _compact(self) -> None:
        """A new snapshot of the table, then an empty log (a new file: readers holding the old log still read it
        whole)."""
        data = (json.dumps(self._table, indent=0) + "\n").encode()
        _io.write_bytes(self.folder / SNAPSHOT, data)
        _io.write_bytes(self.folder / LOG, b"")
        self._log_end, self._snapshot_size = 0, len(data)

    def save(self) -> None:
        """Append the changes since the last save to the log (fsynced); compact when it outgrew the
        snapshot: a new snapshot, then an empty log."""
        if not self._changed:
            return
        rec = {}
        sets = {i: p for i, p in self._changed.items() if p is not None}
        dels = [i for i, p in self._changed.items() if p is None]
        if sets:
            rec["set"] = sets
        if dels:
            rec["del"] = dels
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        log = self.folder / LOG
        new = not log.exists()
        with open(log, "ab") as f:
            if f.tell() != self._log_end:  # a torn last line (or garbage after it): cut off
                f.truncate(self._log_end)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            _io.fsync_dir(self.folder)
        self._log_end += len(line)
        if self._log_end > max(self._snapshot_size, COMPACT_FLOOR):
            self._compact()  # the log first holds every change of the new snapshot: replayed, it gives it again
        self._changed = {}


# ---- the engine's image-id policy ------------------------------------------------------------------------
def assign_ids(pairs, sources, failures: dict, id_prefix: str = "") -> tuple[list, int, dict]:
    """The engine's image-id policy over listed ``(image_id, path)`` pairs (from
    :func:`d2r.features.image.listed_images`): ``(kept pairs, skipped, failed {path: reason})``.

    An id is ``id_prefix`` + the listed id. A file is known by its canonical path (absolute, symbolic links
    resolved), which the sources table ``sources`` records for each new id: the same id and file listed twice
    (or spelled two ways) is kept once, counted as skipped; an id that the table (or an earlier pair)
    gives to another file is that pair's failure, never a silent mix-up (``--id-prefix`` resolves it). A
    symbolic-link loop is no error here: the file is kept under its own path, and fails when read.
    ``failures`` (the engine's table, by path) gets the id conflicts, and loses the conflicts now resolved.
    Failure keys are absolute paths."""
    kept, seen, failed, skipped = [], {}, {}, 0
    for image_id, p in pairs:
        image_id, p = id_prefix + str(image_id), Path(os.path.abspath(p))
        try:
            source = str(p.resolve())
        except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13): read, it fails
            source = str(p)
        known = sources.get(image_id, seen.get(image_id))
        if known is not None and known != source:  # same id, another file: never skip or mix them up
            failed[str(p)] = failures[str(p)] = f"image id {image_id!r} is already used by {known}"
            continue
        if seen.get(image_id) == source:  # the same file listed twice: once is enough
            skipped += 1
            continue
        seen[image_id] = source
        if failures.get(str(p), "").startswith("image id "):  # id conflict resolved (--id-prefix)
            del failures[str(p)]
        kept.append((image_id, p))
    for image_id, source in seen.items():
        sources.setdefault(image_id, source)
    return kept, skipped, failed


FAILURES = "failures.json"


def read_failures(folder) -> dict[str, str]:
    """The engine's ``failures.json``: ``{image file: reason}``, both strings ({} when absent). Anything else
    is a ValueError naming the file (D15: a list or number as a reason passed ``check``, then crashed ``index
    add`` with an AttributeError)."""
    file = Path(folder) / FAILURES
    table = _io.read_json(file, None)
    if table is None and not file.exists():
        return {}
    if not isinstance(table, dict):
        raise ValueError(f"{file}: not a JSON object of image file -> reason, got {_json_kind(table)}")
    for key, reason in table.items():
        if not isinstance(reason, str):
            raise ValueError(f"{file}: the reason for {key!r} is {_json_kind(reason)}, not a string")
    return table


def _json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words ("a number", not "a int")."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kinds = {list: "a list", dict: "an object", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")

