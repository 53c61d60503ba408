"""Checking and repairing a feature store folder without opening it for use: :func:`check_store` lists every
damaged file, :func:`repair_store` restores a lost or damaged manifest from its generations and drops the
shards that hold a damaged file (their images must be extracted again)."""

from __future__ import annotations

import json
from pathlib import Path

from d2r._lock import WriterLock
from d2r.features.store import format as fmt
from d2r.features.store.format import MANIFEST, keys, load_shard, read_manifest, shard_file
from d2r.storage import DamagedError, check_file


def check_manifest(folder: Path, manifest: dict, digests: bool = True) -> list[dict]:
    """Damaged files of the generation ``manifest`` of the store at ``folder``: ``[{"file", "problem"}]``,
    each shard's files checked for size and (``digests``) BLAKE2b digest, then its structure and that no image
    is stored twice."""
    damage = []
    seen: dict[str, str] = {}
    for rec in manifest["shards"]:
        bad = []

        def note(file, problem):
            bad.append({"file": str(file), "problem": problem})

        for key in keys(rec):
            path = shard_file(folder, rec["name"], key)
            record = (rec.get("files") or {}).get(key)
            if record is not None:
                check_file(path, record, note, digests)
            elif not path.is_file():
                note(path, "missing (listed in the store manifest)")
        if not bad:
            try:
                shard = load_shard(folder, rec, manifest["dim"])
                skip = set(rec.get("skip", []))
                for row, image_id in enumerate(shard.ids.tolist()):
                    if row not in skip and seen.setdefault(image_id, rec["name"]) != rec["name"]:
                        raise fmt.damaged(shard_file(folder, rec["name"], "ids"),
                                          f"image {image_id!r} is also in shard {seen[image_id]}")
                del shard
            except DamagedError as exc:
                note(exc.file, exc.problem)
        damage.extend(bad)
    return damage


def check_store(path, digests: bool = True) -> list[dict]:
    """Check the feature store at ``path`` without opening it for use: ``[{"file", "problem"}]`` for every
    damaged file (a damaged or lost manifest is one entry); empty when healthy. ``digests=False`` skips the
    BLAKE2 checksums (sizes and structure only: cheap enough for ``index info``)."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except DamagedError as exc:
        return [{"file": exc.file, "problem": exc.problem}]
    except FileNotFoundError as exc:
        return [{"file": str(path / MANIFEST), "problem": str(exc)}]
    return check_manifest(path, manifest, digests)


def repair_store(path, lock_timeout: float | None = 0.0) -> dict:
    """Make a damaged feature store usable again, under its writer lock: a lost or damaged ``manifest.json``
    is replaced by the newest readable generation, then every shard with a damaged file is dropped and a new
    generation committed. Returns a JSON-ready report: ``dropped_shards`` [{name, images}], ``damaged``,
    ``manifest_restored_from`` (when it was), ``unrepairable``."""
    path = Path(path)
    report = {"path": str(path), "dropped_shards": [], "damaged": [], "unrepairable": []}
    with WriterLock(path, lock_timeout, what="feature store"):
        if not fmt.generations().recover(path, report, check_store):
            return report
        manifest = read_manifest(path)
        damage = check_manifest(path, manifest)
        report["damaged"] = damage
        if not damage:
            return report
        bad = {d["file"] for d in damage}
        keep = []
        for rec in manifest["shards"]:
            if any(str(shard_file(path, rec["name"], k)) in bad for k in keys(rec)):
                report["dropped_shards"].append({"name": rec["name"],
                                                 "images": rec["num_images"] - len(rec.get("skip", []))})
            else:
                keep.append(rec)
        manifest = json.loads(json.dumps(dict(manifest, shards=keep)))
        fmt.commit(path, manifest)
    return report
