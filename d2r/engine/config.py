"""The engine's configuration: one dataclass with every section, and THE defaults table per feature type.

Every option's default is its section's dataclass default (what d2r ships), except the options listed for a
feature type in :data:`FEATURE_DEFAULTS`; :class:`EngineConfig`, ``d2r index create``, ``d2r search`` and
``d2r bench`` (whose :class:`~d2r.bench.BenchConfig` only adds protocol options) all read that one table, so
"what does d2r run by default?" has one answer. ``engine.json`` holds the format, its version and the resolved
:class:`EngineConfig`; files of format version 1 (and configs in the old shape) are converted on read
(:func:`convert_config`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from d2r._io import read_json
from d2r.aggregate import get_kernel
from d2r.codebook.config import CodebookConfig
from d2r.config import Config
from d2r.detect.config import RegionsConfig
from d2r.features.config import FeaturesConfig
from d2r.index.database import DatabaseConfig
from d2r.query import lightglue
from d2r.query.config import ExpansionConfig, GlobalStageConfig, RerankConfig
from d2r.detect.proposers import PROPOSERS
from d2r.features import EXTRACTORS
from d2r.features.config import config_class
from d2r.globaldesc.extractor import BACKBONES

log = logging.getLogger(__name__)

FORMAT = "d2r-engine"
# 2: the query sections as they are now (qe.method, rerank.enabled, rerank.query_num_assignments);
# 1 (the previous release): converted on read by convert_config.
FORMAT_VERSION = 2


# THE defaults table: the options whose default depends on the feature type, applied where a config does not
# set them (and followed when the feature type or the verification method changes by override); every other
# default is its section's. GV putative-match distance ("official" verification): 0.4 separates true RootSIFT
# matches best (benchmarks/results/dev_results.md); 0.9 is the official DELF value. Learned features (ALIKED,
# DISK): plain mutual nearest neighbours (ratio 1: no ratio test) and the LightGlue weights trained for them;
# ``min_inliers`` calibrated per feature type and correspondence method by the project's rule, the smallest count
# above every chance count of the non-matching dev pairs (benchmarks/results/learned.md). A key
# "rerank.method=M" holds the defaults that apply with that verification method only (and win over the feature
# type's own).
FEATURE_DEFAULTS: dict[str, dict] = {
    "rootsift": {"rerank.descriptor_distance": 0.4},
    "delf": {"rerank.descriptor_distance": 0.9},
    "aliked": {"rerank.ratio": 1.0, "rerank.min_inliers": 71, "rerank.lightglue": "aliked",
               "rerank.method=lightglue": {"rerank.min_inliers": 37}},
    "disk": {"rerank.ratio": 1.0, "rerank.min_inliers": 23, "rerank.lightglue": "disk",
             "rerank.method=lightglue": {"rerank.min_inliers": 99}},
}


def feature_defaults(name: str, method: str) -> dict:
    """The dotted defaults of feature type ``name`` verified with ``method`` (:data:`FEATURE_DEFAULTS`)."""
    table = FEATURE_DEFAULTS.get(name, {})
    out = {k: v for k, v in table.items() if "=" not in k}
    out.update(table.get(f"rerank.method={method}", {}))
    return out

# Options renamed since format version 1 (old dotted key -> new), read by convert_config and override.
RENAMED = {
    "query_expansion": "qe.method",
    "verify": "rerank.enabled",
    "rerank.query_assignments": "rerank.query_num_assignments",
}
# Options removed (they lost on the dev table, benchmarks/results/dev_results.md): accepted at their "off"
# value for old files, refused otherwise.
REMOVED = {
    "qe.dba_top": (0, "index-time database-side augmentation (DBA) was removed "
                      "(-15.8 Medium on the dev table)"),
    "diffusion": (None, "diffusion was removed (-4.8 Medium / -11.6 Hard on the dev table)"),
}


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
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ValueError(f"{'.'.join(parts[:i + 1])}: expected a section (a mapping), got {node[part]!r}")
        node = node[part]
    node[parts[-1]] = value


def _pop(data: dict, dotted: str):
    parts = dotted.split(".")
    node = _get(data, ".".join(parts[:-1])) if len(parts) > 1 else data
    if not isinstance(node, dict) or parts[-1] not in node:
        return _MISSING
    return node.pop(parts[-1])


_MISSING = object()


def convert_config(data: dict, version: int | None = None) -> dict:
    """A config mapping in the current shape from one in an older shape (a copy; current ones come back equal).

    Renamed options (:data:`RENAMED`: ``query_expansion`` -> ``qe.method``, ``verify`` -> ``rerank.enabled``,
    ``rerank.query_assignments`` -> ``rerank.query_num_assignments``) move; ``rerank.num_to_rerank: 0`` (the old
    "off") becomes ``rerank.enabled: false``; removed options (:data:`REMOVED`) are dropped when off, else
    refused. ``version``: the ``engine.json`` format version the mapping comes from; an engine of version 1
    searched with expansion only when it verified, so one without verification gets ``qe.method: none``.
    """
    data = _plain(data)
    for old, new in RENAMED.items():
        value = _pop(data, old)
        if value is _MISSING:
            continue
        if _get(data, new) is not _MISSING:
            raise ValueError(f"{old} and {new} are the same option (it is {new} now); set only {new}")
        _set(data, new, value)
    if _get(data, "rerank.num_to_rerank") == 0:
        if _get(data, "rerank.enabled") is True:
            raise ValueError("rerank.enabled is true but rerank.num_to_rerank is 0; set rerank.enabled: false")
        _set(data, "rerank.enabled", False)
        _pop(data, "rerank.num_to_rerank")
    for key, (off, why) in REMOVED.items():
        value = _pop(data, key)
        if value is _MISSING or value == off or (isinstance(value, dict) and not value.get("enabled", False)):
            continue
        raise ValueError(f"{key}: {why}; see benchmarks/results/dev_results.md (it is in git history)")
    if version is not None and version < 2 and _get(data, "rerank.enabled") is False:
        _set(data, "qe.method", "none")
    return data


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
    (set ``regions.proposer`` to a detector path, "grid" or "density"), ASMK* aggregation, verification of the
    top 100 (usac) and αQE over the verified images (``qe.method: aqe``): best on the dev table."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    index: DatabaseConfig = field(default_factory=DatabaseConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    qe: ExpansionConfig = field(default_factory=ExpansionConfig)
    global_: GlobalStageConfig = field(default_factory=GlobalStageConfig)  # the "global" section (a keyword)
    batch_size: int = 64
    workers: int = 2

    @classmethod
    def from_dict(cls, data: dict | None, _where: str = ""):
        """As :meth:`Config.from_dict`, after :func:`convert_config` (older shapes) and with the feature type's
        defaults (:data:`FEATURE_DEFAULTS`) for the options ``data`` does not set. The section ``global`` is
        the field ``global_``; a ``global`` section that does not say ``enabled`` turns the stage on."""
        if isinstance(data, dict):
            data = convert_config(data)
            if "global_" in data:
                raise ValueError("global_: unknown option; the section is called 'global'")
            if "global" in data:
                section = data.pop("global")
                if isinstance(section, dict) and "enabled" not in section:
                    section = {**section, "enabled": True}
                data["global_"] = section
            name = _get(data, "features.name")
            method = _get(data, "rerank.method")
            method = method if method is not _MISSING else RerankConfig.method
            for key, value in feature_defaults(name if name is not _MISSING else "rootsift", method).items():
                section = key.split(".")[0]
                if isinstance(data.get(section) or {}, dict) and _get(data, key) is _MISSING:
                    _set(data, key, value)
        return super().from_dict(data, _where)

    def override(self, dotted: dict):
        """As :meth:`Config.override` (old option names of :data:`RENAMED` accepted); when ``features.name`` or
        ``rerank.method`` changes, options still at the old (feature type, method) default take the new one's
        (unless overridden too)."""
        dotted = {RENAMED.get(k, k): v for k, v in dotted.items()}
        new_name = dotted.get("features.name") or self.features.name
        new_method = dotted.get("rerank.method") or self.rerank.method
        if (new_name, new_method) != (self.features.name, self.rerank.method):
            current, base = self.to_dict(), EngineConfig().to_dict()
            old = feature_defaults(self.features.name, self.rerank.method)
            new = feature_defaults(new_name, new_method)
            for key in {**old, **new}:
                old_value = old.get(key, _get(base, key))
                if dotted.get(key) is None and _get(current, key) == old_value:
                    dotted[key] = new.get(key, _get(base, key))
        if any(k.startswith("global.") for k in dotted) and "global.enabled" not in dotted:
            dotted["global.enabled"] = True  # setting a global option asks for the stage
        return super().override(dotted)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["global"] = out.pop("global_")
        return out

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
        self.rerank.check()
        lightglue.check(self.rerank.method, self.features.name, self.rerank.lightglue)
        self.qe.check()
        self.global_.check()
        if self.qe.method == "hqe" and not get_kernel(self.index.kernel).per_word:
            raise ValueError("qe.method 'hqe' needs an ASMK kernel (index.kernel asmk or asmk_star)")
        return self


def absolute_paths(config: EngineConfig) -> EngineConfig:
    """``config`` with its model, PCA and detector folders made absolute: the engine saves them and later
    commands run from any folder."""
    changes = {}
    g = config.global_
    paths = [("features.model", config.features.model), ("features.pca", config.features.pca),
             ("regions.proposer", config.regions.proposer)]
    if g.enabled:
        paths += [("global.weights", g.weights), ("global.whitening", g.whitening)]
        if g.backbone not in BACKBONES:
            paths.append(("global.backbone", g.backbone))
    for key, value in paths:
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
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {version!r} is not one this d2r reads")
    config = meta.get("config")
    try:
        return EngineConfig.from_dict(convert_config(config, version) if isinstance(config, dict)
                                      else config).check()  # D13: out-of-range settings were accepted at open
    except ValueError as exc:
        raise ValueError(f"{meta_path}: bad config: {exc}") from None
