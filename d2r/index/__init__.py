"""Inverted-file database: regional aggregation and regional search, persistent and memory-mapped."""

from d2r.index.database import Database, DatabaseConfig, Ranking

__all__ = ["Database", "DatabaseConfig", "Ranking"]
