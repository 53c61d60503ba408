"""The index manifest on :mod:`d2r.storage`: its schema, its generations, and what checks and repairs a
database folder (:func:`check_database`, :func:`repair_database`).

``manifest.json`` is the commit point (the newest generation; ``manifest-<gen>.json`` keeps the last
:data:`KEEP_GENERATIONS`). It lists the segments with, per file, its size and BLAKE2b-128 digest, the removal
table (bool per image) likewise, the codebook's fingerprint and file record, and the database config.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np

from d2r._lock import WriterLock
from d2r.codebook import Codebook
from d2r.index.config import DatabaseConfig
from d2r.index.segment import Segment, file_names
from d2r.storage import (DIGEST, MANIFEST, RECORD, DamagedError, Generations, Int, Map, OneOf, Opt, Text,
                         check_file, load_json, save_array, validate)

FORMAT = "d2r-database"
FORMAT_VERSION = 3  # 3: posting item ids uint16 in blocks of 65,536 items (2: uint32)
KEEP_GENERATIONS = 3  # the current one and the two before it
SEGMENT_NAME = r"seg-[0-9a-f-]+"
REMOVED_NAME = r"removed-[0-9a-f-]+\.npy"
SCHEMA = {
    "format": FORMAT,
    "format_version": Opt(Int(1, FORMAT_VERSION)),
    "generation": int,
    "config": dict,
    "codebook": {"fingerprint": str, "k": Opt(Int(1)), "dim": Opt(Int(1)), "file": Opt(RECORD)},
    "segments": [{"name": Text(SEGMENT_NAME), "images": Opt(int), "items": Opt(int), "entries": Opt(int),
                  "bytes": Opt(int), "files": Opt(Map(RECORD))}],
    "removed": Opt({"name": Text(REMOVED_NAME), "size": Opt(int), "blake2b": Opt(DIGEST)}),
    "id_type": Opt(OneOf(("int", "str"))),
    "counts": Opt(Map(int)),
}


def read_file(file: Path) -> dict:
    """Parse and check one index manifest; a version-1 manifest (segment and removal-table names only) is
    converted. :class:`DamagedError` naming the file for anything malformed (wrong types, negative counts)."""
    m = load_json(file, "index")
    if m.get("format") != FORMAT:
        raise DamagedError(file, "not a d2r database manifest")
    version = m.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ValueError(f"{file}: format version {version} is newer than this d2r supports "
                         f"({FORMAT_VERSION})")
    if isinstance(m.get("segments"), list):
        m["segments"] = [{"name": s} if isinstance(s, str) else s for s in m["segments"]]
    if isinstance(m.get("removed"), str):
        m["removed"] = {"name": m["removed"]}
    return validate(file, m, SCHEMA, "index")


def referenced(manifest: dict) -> set[str]:
    """The data parts (segment folders, removal table) a manifest lists."""
    names = {s["name"] for s in manifest["segments"]}
    if manifest.get("removed"):
        names.add(manifest["removed"]["name"])
    return names


def _part_of(name: str) -> str | None:
    return name if re.fullmatch(SEGMENT_NAME, name) or re.fullmatch(REMOVED_NAME, name) else None


# Only the writer-lock holder writes segments: parts no generation lists are garbage at once, and memory maps
# keep a reader's files alive after they are deleted.
GENERATIONS = Generations(store="index", what="d2r database", read_file=read_file, parts=referenced,
                          part_of=_part_of, keep=KEEP_GENERATIONS)


def read_manifest(path, name: str = MANIFEST) -> dict:
    """The manifest ``name`` (default: the commit point) of the database at ``path``."""
    return GENERATIONS.read(Path(path), name)


def write_removed(path: Path, generation: int, removed: np.ndarray) -> dict | None:
    """Write the removal table of a new generation (None when nothing is removed); its manifest record."""
    if not removed.any():
        return None
    name = f"removed-{generation:08d}-{uuid.uuid4().hex[:8]}.npy"
    return {"name": name, **save_array(path / name, removed, atomic=True)}


def load_codebook(path: Path, manifest: dict) -> Codebook:
    file = path / "codebook.npz"
    rec = manifest["codebook"].get("file")
    if rec and file.is_file() and file.stat().st_size != rec["size"]:
        raise DamagedError(file, f"{file.stat().st_size} bytes, the manifest says {rec['size']}")
    try:
        return Codebook.load(file)
    except FileNotFoundError:
        raise DamagedError(file, "missing") from None
    except Exception as exc:
        raise DamagedError(file, f"unreadable codebook ({str(exc).split(': ', 1)[-1][:160]})") from None


def check_database(path, digests: bool = True) -> list[dict]:
    """Damaged files of the database at ``path``, ``[{"file": path relative to it, "problem"}]`` (empty when
    healthy); never raises for damage. ``digests=False`` checks sizes and structure only (no full read)."""
    path = Path(path)
    damaged: list[dict] = []

    def bad(file, problem):
        inside = str(file).startswith(str(path))
        damaged.append({"file": str(Path(file).relative_to(path)) if inside else str(file), "problem": problem})

    try:
        manifest = read_manifest(path)
    except DamagedError as exc:
        bad(exc.file, exc.problem)
        return damaged
    book = None
    cb = manifest["codebook"]
    if cb.get("file"):
        check_file(path / "codebook.npz", cb["file"], bad, digests)
    if not damaged:
        try:
            book = load_codebook(path, manifest)
        except (ValueError, OSError) as exc:
            bad(path / "codebook.npz", str(exc).split(": ", 1)[-1])
    try:
        config = DatabaseConfig.from_dict(manifest["config"])
    except (ValueError, TypeError) as exc:
        bad(path / MANIFEST, f"bad config ({exc})")
        return damaged
    total = 0
    for rec in manifest["segments"]:
        d = path / rec["name"]
        before = len(damaged)
        files = rec.get("files") or {}
        for fname in file_names(config.kernel):
            if fname in files:
                check_file(d / fname, files[fname], bad, digests)
            elif not (d / fname).is_file():
                bad(d / fname, "missing")
        if len(damaged) == before and book is not None:
            try:
                total += Segment.read(path, rec, config.kernel, config.mode, book.size, book.dim).num_images
                continue
            except DamagedError as exc:
                bad(exc.file, exc.problem)
        if rec.get("images") is None:
            total = None  # unknown: the removal table's length cannot be checked
        elif total is not None:
            total += int(rec["images"])
    rec = manifest.get("removed")
    if rec:
        file = path / rec["name"]
        before = len(damaged)
        if rec.get("blake2b"):
            check_file(file, rec, bad, digests)
        if len(damaged) == before:
            try:
                removed = np.load(file, allow_pickle=False)
                if removed.dtype != np.bool_ or removed.ndim != 1 or total not in (None, removed.shape[0]):
                    bad(file, f"removal table is {removed.dtype} {removed.shape}, expected bool ({total},)")
            except Exception as exc:
                bad(file, f"unreadable ({str(exc).splitlines()[0][:120]})")
    return damaged


def repair_database(path, lock_timeout: float | None = 0.0) -> dict:
    """Make a damaged database at ``path`` usable again: under the writer lock, a missing or damaged
    ``manifest.json`` is replaced by the newest readable generation, then every segment with a damaged file is
    dropped (its images are lost and must be indexed again) and a new generation committed; a damaged removal
    table is reset (removed images come back). Returns a JSON-ready report; ``unrepairable`` names what cannot
    be fixed here (e.g. the codebook)."""
    path = Path(path)
    report = {"path": str(path), "dropped_segments": [], "removal_table_reset": False, "unrepairable": [],
              "damaged": []}
    with WriterLock(path, lock_timeout, what="index"):
        if not GENERATIONS.recover(path, report, check_database):
            return report
        damage = check_database(path)
        report["damaged"] = damage
        if not damage:
            return report
        bad = {d["file"] for d in damage}
        manifest = read_manifest(path)
        if "codebook.npz" in bad:
            report["unrepairable"].append("codebook.npz (restore it from the engine folder or re-index)")
            return report
        removed_rec = manifest.get("removed")
        removed = None
        if removed_rec and removed_rec["name"] not in bad:
            removed = np.load(path / removed_rec["name"], allow_pickle=False)
        elif removed_rec:
            report["removal_table_reset"] = True
        keep, flags, pos = [], [], 0
        for rec in manifest["segments"]:
            n = rec.get("images")
            if any(f.startswith(rec["name"] + "/") for f in bad):
                report["dropped_segments"].append({"name": rec["name"], "images": n})
            else:
                if n is None:
                    n = int(np.load(path / rec["name"] / "image_ids.npy", mmap_mode="r").shape[0])
                keep.append(rec)
                flags.append(removed[pos:pos + n] if removed is not None else np.zeros(n, bool))
            if n is None:  # a dropped old-format segment of unknown size: the removal flags cannot be aligned
                removed, report["removal_table_reset"] = None, bool(removed_rec)
            pos += n or 0
        generation = int(manifest["generation"]) + 1
        table = np.concatenate(flags) if flags else np.zeros(0, bool)
        images = sum(int(r.get("images") or 0) for r in keep)
        manifest = dict(manifest, generation=generation, segments=keep, format=FORMAT,
                        removed=write_removed(path, generation, table), format_version=FORMAT_VERSION,
                        counts={"images": images - int(table.sum()), "images_total": images,
                                "items": sum(int(r.get("items") or 0) for r in keep),
                                "entries": sum(int(r.get("entries") or 0) for r in keep)})
        GENERATIONS.commit(path, manifest)
        GENERATIONS.collect_garbage(path, manifest)
    return report
