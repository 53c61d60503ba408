"""The engine's configuration: one dataclass with every section, and the defaults table per feature type.

``engine.json`` holds the format, its version and the resolved :class:`EngineConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r._io import read_json
from d2r.codebook.config import CodebookConfig
from d2r.config import Config
from d2r.detect.config import RegionsConfig
from d2r.features.config import FeaturesConfig
from d2r.index.database import DatabaseConfig
from d2r.query.expand import ExpansionConfig
from d2r.query import lightglue
from d2r.query.verify import RerankConfig
from d2r.detect.proposers import PROPOSERS
from d2r.features import EXTRACTORS
from d2r.features.config import config_class
from d2r.query.expand import check_method

FORMAT = "d2r-engine"
FORMAT_VERSION = 1


# Defaults that depend on the feature type, applied where a config does not set them (and followed when the
# feature type changes by override). GV putative-match distance: 0.4 separates true RootSIFT matches best
# (benchmarks/results/dev_results.md); 0.9 is the official DELF value. Learned features (ALIKED, DISK): plain
# mutual nearest neighbours (ratio 1: no ratio test) and the LightGlue weights trained for them; ``min_inliers``
# calibrated per feature type and correspondence method by the project's rule, the smallest count above every
# chance count of the non-matching dev pairs (benchmarks/results/learned.md). A key "rerank.method=M" holds the
# defaults that apply with that verification method only (and win over the feature type's own).
FEATURE_DEFAULTS: dict[str, dict] = {
    "rootsift": {"rerank.descriptor_distance": 0.4},
    "delf": {"rerank.descriptor_distance": 0.9},
    "aliked": {"rerank.ratio": 1.0, "rerank.min_inliers": 52, "rerank.lightglue": "aliked",
               "rerank.method=lightglue": {"rerank.min_inliers": 14}},
    "disk": {"rerank.ratio": 1.0, "rerank.min_inliers": 52, "rerank.lightglue": "disk",
             "rerank.method=lightglue": {"rerank.min_inliers": 14}},
}


def feature_defaults(name: str, method: str) -> dict:
    """The dotted defaults of feature type ``name`` verified with ``method`` (:data:`FEATURE_DEFAULTS`)."""
    table = FEATURE_DEFAULTS.get(name, {})
    out = {k: v for k, v in table.items() if "=" not in k}
    out.update(table.get(f"rerank.method={method}", {}))
    return out


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


_MISSING = object()


def _plain(value):
    """A copy of nested dicts and lists with numpy scalars as Python ones (np.int64(8) is 8, not '8') and
    paths as strings."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value.item() if isinstance(value, np.generic) else value


@dataclass
class EngineConfig(Config):
    """Everything an engine does, in one place; saved with the index. Defaults: RootSIFT, whole image + no boxes
    (set ``regions.proposer`` to a detector path, "grid" or "density"), ASMK* aggregation, GV re-ranking."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    index: DatabaseConfig = field(default_factory=DatabaseConfig)
    # per feature type (FEATURE_DEFAULTS): 0.4 for RootSIFT (the default features), 0.9 for DELF
    rerank: RerankConfig = field(default_factory=lambda: RerankConfig(descriptor_distance=0.4, method="usac"))
    # "none" | "aqe" | "hqe" (d2r.expand), parameters in ``qe``; aqe over verified images: best on the dev table.
    _index_time_dba: typing.ClassVar[bool] = False  # qe.dba_top: the bench runner only (d2r.bench)
    query_expansion: str = "aqe"
    qe: ExpansionConfig = field(default_factory=ExpansionConfig)
    batch_size: int = 64
    workers: int = 2

    @classmethod
    def from_dict(cls, data: dict | None, _where: str = ""):
        """As :meth:`Config.from_dict`, with the feature type's defaults (:data:`FEATURE_DEFAULTS`), then the
        engine's own section defaults (:func:`_engine_defaults`: ``rerank.method`` "usac"...), for the options
        ``data`` does not set: a partial dict gives what ``EngineConfig()`` gives."""
        data = _plain(data or {}) if isinstance(data, dict) else data
        if isinstance(data, dict):
            name = _get(data, "features.name")
            engine = _engine_defaults()
            method = _get(data, "rerank.method")
            method = method if method is not _MISSING else engine.get("rerank.method", "official")
            defaults = feature_defaults(name if name is not _MISSING else "rootsift", method)
            for key, value in engine.items():
                defaults.setdefault(key, value)
            for key, value in defaults.items():
                section = key.split(".")[0]
                if section in data and data[section] is None:
                    data[section] = {}
                if _get(data, key) is _MISSING and isinstance(data.get(section, {}), dict):
                    _set(data, key, value)
        return super().from_dict(data, _where)

    def override(self, dotted: dict):
        """As :meth:`Config.override`; when ``features.name`` or ``rerank.method`` changes, options still at the old
        (feature type, method) default take the new one's (unless overridden too)."""
        new_name = dotted.get("features.name") or self.features.name
        new_method = dotted.get("rerank.method") or self.rerank.method
        if (new_name, new_method) != (self.features.name, self.rerank.method):
            current, base = self.to_dict(), EngineConfig().to_dict()
            dotted = dict(dotted)
            old = feature_defaults(self.features.name, self.rerank.method)
            new = feature_defaults(new_name, new_method)
            for key in {**old, **new}:
                old_value = old.get(key, _get(base, key))
                if dotted.get(key) is None and _get(current, key) == old_value:
                    dotted[key] = new.get(key, _get(base, key))
        return super().override(dotted)

    def check(self) -> "EngineConfig":
        """Refuse a bad config before anything is extracted or written (ValueError naming the option)."""
        if self.features.name not in EXTRACTORS:
            raise ValueError(f"features.name must be one of {list(EXTRACTORS)}, got {self.features.name!r}")

        config_class(self.features.name).from_dict(self.features.options, _where="features.options.")
        try:
            self.index.check()
        except ValueError as exc:
            raise ValueError(f"index.{exc}") from None
        c = self.codebook  # its training runs after every image is extracted: checked here, before
        for name, value in [("batch_size", self.batch_size), ("workers", self.workers),
                            ("codebook.size", c.size), ("codebook.iterations", c.iterations),
                            ("codebook.sample_per_image", c.sample_per_image),
                            ("codebook.max_samples", c.max_samples)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # True is no count
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
            raise ValueError(f"codebook.seed must be a non-negative integer, got {c.seed!r}")
        if self.codebook.method not in ("lloyd", "minibatch"):
            raise ValueError(f"codebook.method must be 'lloyd' or 'minibatch', got {self.codebook.method!r}")
        self.rerank.validate()
        lightglue.check(self.rerank.method, self.features.name, self.rerank.lightglue)

        check_method(self.query_expansion)
        self.qe.validate()
        if self.query_expansion == "hqe" and self.index.kernel == "vlad":
            raise ValueError("query_expansion 'hqe' needs an ASMK kernel (index.kernel asmk or asmk_star)")
        if self.qe.dba_top and not self._index_time_dba:
            raise ValueError("qe.dba_top (database-side augmentation) is a benchmark-runner setting; "
                             "Engine indexes do not support it")
        if self.qe.dba_top and self.index.mode != "aggregation":
            raise ValueError("qe.dba_top needs index.mode 'aggregation'")
        return self


def _engine_defaults() -> dict:
    """Dotted options whose :class:`EngineConfig` default differs from their section class's own default
    (``{"rerank.method": "usac", ...}``): sections built from a partial mapping must keep them."""
    out = {}
    for f in dataclasses.fields(EngineConfig):
        if f.default_factory is dataclasses.MISSING:
            continue
        engine_value = f.default_factory()
        if not isinstance(engine_value, Config):
            continue
        own = type(engine_value)().to_dict()
        for key, value in engine_value.to_dict().items():
            if own.get(key) != value:
                out[f"{f.name}.{key}"] = value
    return out


def absolute_paths(config: EngineConfig) -> EngineConfig:
    """``config`` with its model, PCA and detector folders made absolute: the engine saves them and later
    commands run from any folder."""
    changes = {}
    for key, value in (("features.model", config.features.model), ("features.pca", config.features.pca),
                       ("regions.proposer", config.regions.proposer)):
        if not value or key == "regions.proposer" and str(value).lower() in {"none", *PROPOSERS}:
            continue
        path = Path(str(value)).expanduser()
        if not path.is_absolute() and path.exists():
            changes[key] = os.path.abspath(path)
    return config.override(changes) if changes else config


def engine_config(path: Path) -> EngineConfig:
    """The config of the engine folder ``path`` from its ``engine.json`` (checked: format, version, config)."""
    meta_path = path / "engine.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no d2r engine here (engine.json missing)")
    meta = read_json(meta_path, None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a d2r engine file")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {version!r} is not one this d2r reads")
    try:
        return EngineConfig.from_dict(meta.get("config"))
    except ValueError as exc:
        raise ValueError(f"{meta_path}: bad config: {exc}") from None
