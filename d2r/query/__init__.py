"""The query path: search, verification, expansion (:mod:`d2r.query.pipeline`, the one entry point)."""

from d2r.query.config import ExpansionConfig, RerankConfig
from d2r.query.pipeline import Query, QueryResult, Stage, prepare_query, search_query

__all__ = ["ExpansionConfig", "Query", "QueryResult", "RerankConfig", "Stage", "prepare_query", "search_query"]
