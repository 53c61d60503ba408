"""The whole pipeline behind one object: :class:`Engine` (index a folder of photos, search it with a photo) and its
one config, :class:`EngineConfig`."""

from d2r.engine.check import check_engine
from d2r.engine.config import FEATURE_DEFAULTS, EngineConfig
from d2r.engine.engine import Engine, Hit, IndexReport

__all__ = ["Engine", "EngineConfig", "FEATURE_DEFAULTS", "Hit", "IndexReport", "check_engine"]
