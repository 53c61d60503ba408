"""Inverted-file database: regional aggregation and regional search, persistent and memory-mapped."""

from d2r.index.config import DatabaseConfig
from d2r.index.database import Database, Ranking
from d2r.index.merge import MergePolicy
from d2r.storage import DamagedError

__all__ = ["Database", "DatabaseConfig", "DamagedError", "MergePolicy", "Ranking"]
