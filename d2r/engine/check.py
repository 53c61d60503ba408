"""``d2r index check`` of an engine folder: every file it holds, without opening the engine."""

from __future__ import annotations

from pathlib import Path

from d2r._io import read_json
from d2r.engine.config import engine_config
from d2r.engine.sources import LOG, read_sources
from d2r.features.store import check_store
from d2r.index.database import check
from d2r.features.store import check_store
from d2r.index.database import check


def check_engine(path, digests: bool = True) -> list[dict]:
    """:meth:`Engine.check` of the engine folder ``path`` without opening it (a damaged index cannot be
    opened but can be checked); an engine with no feature store or no index yet has nothing to check there.
    ``engine.json``, ``sources.json``, ``sources.log`` and ``failures.json`` must parse (commands read
    them)."""
    path = Path(path)
    damaged = []
    for name, read in (("engine.json", lambda: engine_config(path)),
                       ("sources.json", lambda: read_json(path / "sources.json", {})),
                       (LOG, lambda: _sources_log_damage(path)),
                       ("failures.json", lambda: read_json(path / "failures.json", {}))):
        try:
            read()
        except (OSError, ValueError) as exc:
            problem = str(exc)
            damaged.append({"file": name, "problem": problem.split(": ", 1)[-1] if problem.startswith(str(path))
                            else problem})
    features = path / "features"
    if features.is_dir() and any(p.name != ".lock" for p in features.iterdir()):  # not just a lock file
        damaged += check_store(features, digests=digests)
    if (path / "index").is_dir():
        damaged += [dict(d, file=f"index/{d['file']}") for d in check(path / "index", digests=digests)]
    return damaged


def _sources_log_damage(path: Path) -> None:
    """ValueError naming ``sources.log`` when it is damaged (a damaged ``sources.json`` is reported apart)."""
    try:
        read_sources(path)
    except ValueError as exc:
        if str(exc).startswith(str(path / LOG)):
            raise
