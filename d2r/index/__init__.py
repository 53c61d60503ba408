"""Inverted-file database: regional aggregation and regional search, persistent and memory-mapped."""

from d2r.index.database import Database, DatabaseConfig, Ranking
from d2r.storage import DamagedError
from d2r.index.store import MergePolicy

__all__ = ["Database", "DatabaseConfig", "DamagedError", "MergePolicy", "Ranking"]
